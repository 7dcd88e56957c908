"""`peftcli merge`: fold an adapter into full weights, verify, save a plain transformers model.

A quantized (QLoRA) run is merged into the base reloaded *unquantized* in the output dtype: folding
an update into 4-bit weights either fails or silently degrades the model, and is the most reported
merge failure in peer tools. The saved folder is then reloaded from disk with plain
`AutoModelForCausalLM.from_pretrained` and its logits compared with the adapter model's on a probe
batch; a drift beyond the dtype's tolerance fails the command (exit 1) and nothing is left behind.
"""

from __future__ import annotations

from pathlib import Path

from peftcli import console, modeling
from peftcli.errors import CheckFailed, UserError
from peftcli.methods import method_of
from peftcli.recipe import recipe_to_yaml
from peftcli.rundir import atomic_dir, open_run

# Max |merged - adapter| logit difference, relative to the largest |logit| (at least 1).
TOLERANCE = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 4e-2}
PROBE_TEXTS = (
    "The quick brown fox jumps over the lazy dog.",
    "Question: what comes after Monday? Answer:",
    "1 2 3 4 5 6 7 8 9 10",
)


def check_out_dir(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise UserError(f"--out {out} is not empty", hint="choose another folder, or add --force to replace it")


def probe_batch(tokenizer, device):
    texts = list(PROBE_TEXTS)
    if tokenizer.chat_template:
        messages = [{"role": "user", "content": "Say hello."}, {"role": "assistant", "content": "Hello!"}]
        texts.append(tokenizer.apply_chat_template(messages, tokenize=False))
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    return {k: v.to(device) for k, v in batch.items()}


def model_card(recipe, dtype: str, max_diff: float) -> str:
    method = recipe.peft.method
    return "\n".join([
        "---",
        f"base_model: {recipe.model.name}",
        "library_name: transformers",
        f"tags: [peftcli, {method}, merged]",
        "---",
        "",
        f"# Merged {method} fine-tune of `{recipe.model.name}`",
        "",
        f"The {method} adapter trained by peftcli was folded into the base weights and saved in {dtype}.",
        f"Verified after saving: max |merged - adapter| logit difference on a probe batch = {max_diff:.3g}.",
        "Load it with plain transformers:",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        'model = AutoModelForCausalLM.from_pretrained("<this folder>")',
        'tokenizer = AutoTokenizer.from_pretrained("<this folder>")',
        "```",
        "",
        "## Recipe",
        "",
        "```yaml",
        recipe_to_yaml(recipe).rstrip(),
        "```",
        "",
    ])


def run_merge(run_path: Path, out: Path, dtype: str = "auto", force: bool = False) -> float:
    run = open_run(run_path)
    recipe = run.recipe()
    method = method_of(recipe.peft)
    if not method.mergeable:
        raise UserError(
            f"peft.method '{method.name}' cannot be merged into the weights: {method.serve_hint}",
        )
    out = Path(out).resolve()
    check_out_dir(out, force)
    modeling.check_model_source(recipe.model)

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    modeling.quiet_libraries()
    torch_dtype = modeling.compute_dtype(recipe.model.dtype if dtype == "auto" else dtype)
    dtype_name = str(torch_dtype).removeprefix("torch.")
    tokenizer = modeling.load_tokenizer(recipe.model, path=str(run.adapter))
    with console.err.status("loading the base model (unquantized) and the adapter"):
        base = modeling.load_model(recipe.model, quant=None, dtype=torch_dtype)
        model = PeftModel.from_pretrained(base, str(run.adapter))
        model.eval()
    device = next(model.parameters()).device
    probe = probe_batch(tokenizer, device)
    with torch.no_grad():
        expected = model(**probe).logits.float().cpu()
        merged = model.merge_and_unload()
    del model, base

    with atomic_dir(out) as tmp:
        with console.err.status(f"saving the merged model to {out}"):
            merged.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
        del merged
        # Verify what was written, exactly as a user will load it.
        reloaded = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch_dtype).to(device).eval()
        with torch.no_grad():
            got = reloaded(**probe).logits.float().cpu()
        del reloaded
        mask = probe["attention_mask"].cpu().bool()
        max_diff = float((got - expected).abs()[mask].max())
        scale = max(1.0, float(expected.abs()[mask].max()))
        tolerance = TOLERANCE[dtype_name] * scale
        if not max_diff <= tolerance:  # also catches NaN
            raise CheckFailed(
                f"merged logits differ from the adapter model's by {max_diff:.3g} (tolerance {tolerance:.3g} "
                f"in {dtype_name}); nothing was written",
                hint="try --dtype float32; if it persists, report it with the run's recipe.yaml",
            )
        (tmp / "README.md").write_text(model_card(recipe, dtype_name, max_diff), encoding="utf-8")
    console.out.print(
        f"merged model written to {out} ({dtype_name}); verified after reload: "
        f"max |merged - adapter| logit diff {max_diff:.3g} (tolerance {tolerance:.3g})"
    )
    return max_diff
