"""`peftcli eval`: did it help, and what did it cost? Base vs tuned, side by side:

- loss, perplexity and token accuracy on the held-out data;
- with `--generate`: completions of the eval prompts by both models, scored against the references
  (exact match, normalised exact match, token F1, ROUGE-L, length) -> predictions.jsonl, eval.md;
- with `eval.reference` (or `--reference`): perplexity on general text the user wants to keep, and
  the rise as "forgetting %", flagged above `eval.forgetting_threshold`;
- with `--tasks`: standard benchmarks through lm-evaluation-harness (benchmarks.py), a drop above
  `eval.benchmark_threshold` flagged.

Both columns see the same weights, data, batches and precision: for adapter methods "base" is the
same loaded model with the adapter switched off.
"""

from __future__ import annotations

import math
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peftcli import console
from peftcli.data import IGNORE, Encoded, prepare_data
from peftcli.data.paths import not_a_file
from peftcli.errors import PATH_RULE, UserError
from peftcli.evaluation import scoring
from peftcli.evaluation.benchmarks import BenchmarkOptions, LoadedTasks, load_tasks, run_benchmarks
from peftcli.methods import method_of
from peftcli.model.checks import check_model_source
from peftcli.model.load import load_model, quiet_libraries
from peftcli.recipe import DataSource
from peftcli.rundir import open_run
from peftcli.rundir.eval_report import check_eval_out, write_eval, write_eval_out
from peftcli.rundir.lock import RunLock
from peftcli.rundir.report import add_eval
from peftcli.rundir.result import EvalResult, Forgetting, GenerationScores, Scores
from peftcli.rundir.run import load_run


@dataclass(frozen=True)
class GenerateOptions:
    max_new_tokens: int = 64
    temperature: float = 0.0
    num_samples: int = 1
    limit: int | None = None  # at most this many eval prompts

    def __post_init__(self) -> None:
        if self.num_samples > 1 and self.temperature == 0:
            raise UserError("--num-samples > 1 needs --temperature > 0 (greedy samples are identical)")


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


def score(model, items: list[Encoded], batch_size: int, pad_id: int) -> Scores:
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
    return Scores(
        loss=round(mean, 6),
        perplexity=round(math.exp(min(mean, 50.0)), 4),
        token_accuracy=round(correct / total_tokens, 6),
        tokens=total_tokens,
    )


class EvalModels:
    """The tuned model and its base, loaded once: for adapter methods one model with the adapter
    switched on or off; for `full`/`freeze` runs the base is loaded beside the tuned model."""

    def __init__(self, run, recipe):
        quiet_libraries()
        self.recipe = recipe
        self.full = method_of(recipe.peft).saves_full_model
        self.tuned, self.tokenizer = load_run(run, recipe)
        self._base = None

    @contextmanager
    def use(self, which: str):
        if which == "tuned":
            yield self.tuned
        elif not self.full:
            with self.tuned.disable_adapter():
                yield self.tuned
        else:
            if self._base is None:
                self._base = load_model(self.recipe.model, self.recipe.quantization)
            yield self._base

    def score_both(self, items: list[Encoded], batch_size: int, what: str) -> dict[str, Scores]:
        result = {}
        for which in ("base", "tuned"):
            with console.err.status(f"{what}: scoring {len(items)} examples ({which})"), self.use(which) as model:
                result[which] = score(model, items, batch_size, self.tokenizer.pad_token_id)
        return result


def check_reference(reference: str, key: str) -> None:
    """The reference text can be read, checked before any model loads. `key` names where it came
    from in errors: `--reference` on the command line, or the recipe's `eval.reference`."""
    path = Path(reference)
    problem = None if path.is_dir() else not_a_file(path)  # a folder of text files is read as data
    if problem is not None:
        raise UserError(f"{key}: {reference} is {problem}", hint="give a text or data file of general text")
    if not path.exists():
        raise UserError(f"{key}: {reference} not found", hint=PATH_RULE)


def forgetting(models: EvalModels, recipe, reference: str, batch_size: int, key: str = "eval.reference") -> Forgetting:
    """Perplexity of base and tuned on general text; the rise in % is the forgetting figure."""
    path = Path(reference)
    check_reference(reference, key)
    section = recipe.data.model_copy(
        update={
            "train_on": "all",
            "overlong": "truncate",
            "bad_rows": "skip",
            "eval": None,
            "eval_split": None,
            "format": "auto",
        }
    )
    items = prepare_data(section, models.tokenizer, 0, eval_only=[DataSource(path=str(path))], eval_key=key).eval
    scores = models.score_both(items, batch_size, "reference")
    base, tuned = scores["base"].perplexity, scores["tuned"].perplexity
    percent = round(100 * (tuned / base - 1), 3)
    threshold = recipe.eval.forgetting_threshold
    return Forgetting(str(path), len(items), base, tuned, percent, threshold, percent > threshold)


def generation_eval(
    models: EvalModels, examples, options: GenerateOptions, seed: int
) -> tuple[GenerationScores, list[dict]]:
    from peftcli.evaluation.generation import generate, prompt_from_example

    prompts = [p for p in (prompt_from_example(models.tokenizer, e) for e in examples) if p is not None]
    if not prompts:
        raise UserError("--generate: the eval data has no prompts with references (plain text rows have none)")
    prompts = prompts[: options.limit] if options.limit else prompts
    outputs = {}
    for which in ("base", "tuned"):
        with console.err.status(f"generating {len(prompts)} completions ({which})"), models.use(which) as model:
            outputs[which] = generate(
                model,
                models.tokenizer,
                prompts,
                max_new_tokens=options.max_new_tokens,
                temperature=options.temperature,
                num_samples=options.num_samples,
                seed=seed,
            )
    rows: list[dict] = []
    per_model: dict[str, list[dict[str, float]]] = {"base": [], "tuned": []}
    for i, prompt in enumerate(prompts):
        row: dict[str, Any] = {"origin": prompt.origin, "prompt": prompt.shown, "reference": prompt.reference}
        scores = {}
        for which in ("base", "tuned"):
            samples = outputs[which][i]
            row[which] = samples if options.num_samples > 1 else samples[0]
            scores[which] = scoring.average([scoring.score(s, prompt.reference or "") for s in samples])
            per_model[which].append(scores[which])
        rows.append({**row, "scores": scores})
    summary = GenerationScores(
        examples=len(prompts),
        max_new_tokens=options.max_new_tokens,
        temperature=options.temperature,
        num_samples=options.num_samples,
        base=scoring.average(per_model["base"]),
        tuned=scoring.average(per_model["tuned"]),
    )
    return summary, rows


def _eval_data(recipe, tokenizer, eval_only, data_path: Path | None):
    """Prepare the eval examples; another file (--data) gets its format detected from its own columns.

    If detection fails, the file is probably in the run's own custom schema: fall back to the format
    and column mapping of the run's (first) training source, or of its data section; if that fails
    too, the detection error is the one to show."""
    section, seed = recipe.data, recipe.training.seed
    if data_path is None:
        return prepare_data(section, tokenizer, seed, eval_only=eval_only)
    path = os.path.abspath(data_path)  # not resolve(): a symlink loop is an error that names it, not a crash
    try:
        detected = [DataSource(path=path, format="auto", columns={})]
        return prepare_data(section, tokenizer, seed, eval_only=detected, eval_key="--data")
    except UserError as detection_error:
        trained = section.train[0]
        like_training = [DataSource(path=path, format=trained.format, columns=trained.columns)]
        try:
            return prepare_data(section, tokenizer, seed, eval_only=like_training, eval_key="--data")
        except UserError:
            raise detection_error from None


def run_eval(
    run_path: Path,
    data_path: Path | None = None,
    batch_size: int = 8,
    generate: GenerateOptions | None = None,
    reference: str | None = None,
    out: Path | None = None,
    overwrite: bool = False,
    benchmarks: BenchmarkOptions | None = None,
) -> EvalResult:
    """Base vs tuned, written into the run (eval.*, and its report and model card refreshed), or,
    with `out`, into that folder alone: the run's own files are then left as they are."""
    run = open_run(run_path)
    if out is not None:
        check_eval_out(out, run.path, overwrite)  # before any model loads
    recipe = run.recipe()
    check_model_source(recipe.model)
    if data_path is not None:
        eval_only = None  # _eval_data builds the source
    elif recipe.data.eval is not None:
        eval_only = recipe.data.eval
    elif recipe.data.eval_split is not None:
        eval_only = None  # re-derive the same seeded split from the training data
    else:
        raise UserError(
            f"{run_path}: the run has no eval data (no data.eval or data.eval_split)", hint="pass --data FILE"
        )
    reference_key = "--reference" if reference else "eval.reference"
    reference = reference or recipe.eval.reference
    if reference:
        check_reference(reference, reference_key)  # before any model loads
    tasks = load_tasks(benchmarks) if benchmarks is not None else None  # before any model loads
    with RunLock(run.path):  # no train --overwrite / --resume in this run while it is read and written to
        result = _evaluate(
            run, recipe, eval_only, data_path, batch_size, generate, (reference, reference_key), benchmarks, tasks
        )
        if out is None:
            write_eval(run.path, result)
            add_eval(run, result)
            return result
    write_eval_out(out, run.path, overwrite, result)
    return result


def _evaluate(
    run,
    recipe,
    eval_only,
    data_path,
    batch_size: int,
    generate,
    reference: tuple[str | None, str],  # the path, and the key that named it
    benchmarks: BenchmarkOptions | None = None,
    tasks: LoadedTasks | None = None,
) -> EvalResult:
    models = EvalModels(run, recipe)
    data = _eval_data(recipe, models.tokenizer, eval_only, data_path)
    scores = models.score_both(data.eval, batch_size, "eval data")
    path, key = reference
    lost = forgetting(models, recipe, path, batch_size, key) if path else None
    generation = None
    predictions: list[dict] = []
    if generate is not None:
        scored = {item.origin for item in data.eval}  # the same examples as the loss figures
        examples = [e for e in data.eval_examples if e.origin in scored]
        generation, predictions = generation_eval(models, examples, generate, recipe.training.seed)
    measured = None
    if benchmarks is not None and tasks is not None:
        threshold = recipe.eval.benchmark_threshold
        measured = run_benchmarks(models.use, models.tokenizer, tasks, benchmarks, batch_size, threshold)
    return EvalResult(
        run=str(run.path),
        data=str(data_path) if data_path else "run eval data",
        examples=len(data.eval),
        base=scores["base"],
        tuned=scores["tuned"],
        forgetting=lost,
        generation=generation,
        benchmarks=measured,
        predictions=predictions,
    )
