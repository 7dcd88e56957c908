"""`peftcli eval`: base vs tuned on held-out data — loss, perplexity, token accuracy, side by side.

The base model is loaded once; "base" figures come from the same model with the adapter disabled,
so both columns see identical weights, data, batches and precision.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from pathlib import Path

from peftcli import console, modeling
from peftcli.data import IGNORE, Encoded, prepare_data
from peftcli.errors import UserError
from peftcli.methods import method_of
from peftcli.recipe import DataSource
from peftcli.rundir import EVAL, atomic_write_json, open_run


def batches(items: list[Encoded], batch_size: int, pad_id: int):
    """Right-padded tensors (input_ids, attention_mask, labels) for a list of encoded examples."""
    import torch

    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        width = max(len(i.input_ids) for i in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        labels = torch.full((len(chunk), width), IGNORE, dtype=torch.long)
        for row, item in enumerate(chunk):
            n = len(item.input_ids)
            ids[row, :n] = torch.tensor(item.input_ids)
            mask[row, :n] = 1
            labels[row, :n] = torch.tensor(item.labels)
        yield ids, mask, labels


def score(model, items: list[Encoded], batch_size: int, pad_id: int) -> dict:
    """Token-weighted loss, perplexity and next-token accuracy over the trained (label) tokens."""
    import torch

    device = next(p.device for p in model.parameters())
    total_loss, total_tokens, correct = 0.0, 0, 0
    model.eval()
    with torch.no_grad():
        for ids, mask, labels in batches(items, batch_size, pad_id):
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
            # Prompt-learning methods prepend virtual tokens to the output: keep the real positions.
            logits = logits[:, -ids.shape[1] :, :].float()
            target = labels[:, 1:].to(device)
            pred = logits[:, :-1, :]
            keep = target != IGNORE
            loss = torch.nn.functional.cross_entropy(
                pred.reshape(-1, pred.shape[-1]), target.reshape(-1), ignore_index=IGNORE, reduction="sum"
            )
            total_loss += float(loss)
            total_tokens += int(keep.sum())
            correct += int(((pred.argmax(-1) == target) & keep).sum())
    if total_tokens == 0:
        raise UserError("the eval data has no trained tokens to score")
    mean = total_loss / total_tokens
    return {
        "loss": round(mean, 6),
        "perplexity": round(math.exp(min(mean, 50.0)), 4),
        "token_accuracy": round(correct / total_tokens, 6),
        "tokens": total_tokens,
    }


def load_tuned(run, recipe):
    """The tuned model (base + the run's adapter, quantized as in training, or the run's full model)
    and the run's tokenizer, which carries the chat template used in training."""
    from peft import PeftModel

    modeling.quiet_libraries()
    method = method_of(recipe.peft)
    artifact = run.full_model if method.saves_full_model else run.adapter
    tokenizer = modeling.load_tokenizer(recipe.model, path=str(artifact))
    if method.saves_full_model:
        tuned = recipe.model.model_copy(update={"name": str(artifact), "revision": None})
        return modeling.load_model(tuned, None), tokenizer
    base = modeling.load_model(recipe.model, recipe.quantization)
    return PeftModel.from_pretrained(base, str(artifact)), tokenizer


@contextmanager
def base_model_of(model, recipe):
    """The base model to compare with: the same object with the adapter switched off, or (for runs
    that trained the weights themselves) the base loaded from the recipe."""
    if hasattr(model, "disable_adapter"):
        with model.disable_adapter():
            yield model
    else:
        yield modeling.load_model(recipe.model, recipe.quantization)


def run_eval(run_path: Path, data_path: Path | None = None, batch_size: int = 8) -> dict:
    run = open_run(run_path)
    recipe = run.recipe()
    modeling.check_model_source(recipe.model)
    if data_path is not None:
        eval_only = [DataSource(path=str(Path(data_path).resolve()))]
    elif recipe.data.eval is not None:
        eval_only = recipe.data.eval
    elif recipe.data.eval_split is not None:
        eval_only = None  # re-derive the same seeded split from the training data
    else:
        raise UserError(
            f"{run_path}: the run has no eval data (no data.eval or data.eval_split)", hint="pass --data FILE"
        )

    model, tokenizer = load_tuned(run, recipe)
    data = prepare_data(recipe.data, tokenizer, recipe.training.seed, eval_only=eval_only)
    items = data.eval
    with console.err.status(f"scoring {len(items)} examples with the tuned model"):
        tuned = score(model, items, batch_size, tokenizer.pad_token_id)
    with console.err.status(f"scoring {len(items)} examples without it"), base_model_of(model, recipe) as base_model:
        base = score(base_model, items, batch_size, tokenizer.pad_token_id)

    result = {
        "run": str(run.path),
        "data": str(data_path) if data_path else "run eval data",
        "examples": len(items),
        "base": base,
        "tuned": tuned,
        "delta": {k: round(tuned[k] - base[k], 6) for k in ("loss", "perplexity", "token_accuracy")},
    }
    atomic_write_json(run.path / EVAL, result)
    print_table(result)
    return result


def print_table(result: dict) -> None:
    from rich.table import Table

    table = Table(title=f"base vs tuned on {result['examples']} examples ({result['base']['tokens']:,} tokens)")
    table.add_column("metric")
    for column in ("base", "tuned", "change"):
        table.add_column(column, justify="right")
    for key, better in (("loss", "lower"), ("perplexity", "lower"), ("token_accuracy", "higher")):
        b, t = result["base"][key], result["tuned"][key]
        improved = (t < b) if better == "lower" else (t > b)
        change = f"{t - b:+.4f}"
        table.add_row(
            f"{key} ({better} is better)",
            f"{b:.4f}",
            f"{t:.4f}",
            f"[green]{change}[/]" if improved else f"[red]{change}[/]",
        )
    console.out.print(table)
    console.out.print(f"written to {Path(result['run']) / EVAL}")
