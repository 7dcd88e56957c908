"""`peftcli merge RUN --out DIR`: fold an adapter into full weights, verify, save a plain model.

A quantized (QLoRA) run is merged into the base reloaded *unquantized* in the output dtype: folding
an update into 4-bit weights either fails or silently degrades the model, and is the most reported
merge failure in peer tools. The saved folder is then reloaded from disk with plain
`AutoModelForCausalLM.from_pretrained` and its logits compared with the adapter model's on a probe
batch; a drift beyond the dtype's tolerance fails the command (exit 1) and nothing is left behind.
Several runs combined into one adapter or model: see combine.py.
"""

from __future__ import annotations

from pathlib import Path

from peftcli import console
from peftcli.errors import CheckFailed, UserError
from peftcli.methods import method_of
from peftcli.model.checks import check_model_source
from peftcli.model.device import compute_dtype
from peftcli.model.load import quiet_libraries
from peftcli.recipe import recipe_to_yaml
from peftcli.redact import redact
from peftcli.rundir import MARKER, atomic_dir, atomic_write_json, check_replaceable, open_run
from peftcli.rundir.lock import RunLock
from peftcli.rundir.run import load_run

# Max |merged - adapter| logit difference, relative to the largest |logit| (at least 1).
TOLERANCE = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 4e-2}
PROBE_TEXTS = (
    "The quick brown fox jumps over the lazy dog.",
    "Question: what comes after Monday? Answer:",
    "1 2 3 4 5 6 7 8 9 10",
)


OUTPUT_KINDS = ("merged-model", "combined-adapter")


def check_out_dir(out: Path, force: bool, runs=()) -> None:
    """--out must be new, empty, or (with --force) an earlier merge's output; never part of a run."""
    for run in runs or [None]:
        check_replaceable(out, force, "--out", OUTPUT_KINDS, protect=run)


def write_marker(folder: Path, kind: str, max_diff: float) -> None:
    """What this folder is and which files peftcli wrote in it, for people and for a later `--force`
    (which replaces only peftcli's output, and refuses while other files are in the folder)."""
    from peftcli import __version__

    files = sorted(entry.name for entry in folder.iterdir())
    marker = {"kind": kind, "peftcli": __version__, "max_logit_diff": max_diff, "files": files}
    atomic_write_json(folder / MARKER, marker)


def probe_batch(tokenizer, device):
    texts = list(PROBE_TEXTS)
    if tokenizer.chat_template:
        messages = [{"role": "user", "content": "Say hello."}, {"role": "assistant", "content": "Hello!"}]
        texts.append(tokenizer.apply_chat_template(messages, tokenize=False))
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    return {k: v.to(device) for k, v in batch.items()}


def logits(model, probe):
    import torch

    with torch.no_grad():
        return model(**probe).logits.float().cpu()


def compare(got, expected, probe, dtype_name: str) -> tuple[float, float]:
    """Max |got - expected| over real (unpadded) positions, and the tolerance it must meet."""
    mask = probe["attention_mask"].cpu().bool()
    max_diff = float((got - expected).abs()[mask].max())
    scale = max(1.0, float(expected.abs()[mask].max()))
    return max_diff, TOLERANCE[dtype_name] * scale


def model_card(title: str, base: str, tags: list[str], body: list[str], recipe_yaml: str | None) -> str:
    lines = [
        "---",
        f"base_model: {base}",
        "library_name: transformers",
        f"tags: [peftcli, {', '.join(tags)}]",
        "---",
        "",
        f"# {title}",
        "",
        *body,
        "",
        "Load it with plain transformers:",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        'model = AutoModelForCausalLM.from_pretrained("<this folder>")',
        'tokenizer = AutoTokenizer.from_pretrained("<this folder>")',
        "```",
        "",
    ]
    if recipe_yaml:
        lines += ["## Recipe", "", "```yaml", recipe_yaml.rstrip(), "```", ""]
    return "\n".join(lines)


def save_verified(merged, tokenizer, probe, expected, out: Path, torch_dtype, card: str) -> tuple[float, float]:
    """Save `merged` (+ tokenizer, card) atomically, after checking that the saved folder, reloaded
    the way a user will load it, reproduces `expected` logits."""
    from transformers import AutoModelForCausalLM

    dtype_name = str(torch_dtype).removeprefix("torch.")
    device = probe["input_ids"].device
    with atomic_dir(out) as tmp:
        with console.err.status(f"saving the merged model to {out}"):
            merged.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
        merged.to("cpu")  # make room: the reloaded copy is checked on the same device
        if device.type == "cuda":
            import torch

            torch.cuda.empty_cache()
        reloaded = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch_dtype).to(device).eval()
        max_diff, tolerance = compare(logits(reloaded, probe), expected, probe, dtype_name)
        del reloaded
        if not max_diff <= tolerance:  # also catches NaN
            raise CheckFailed(
                f"merged logits differ from the adapter model's by {max_diff:.3g} (tolerance {tolerance:.3g} "
                f"in {dtype_name}); nothing was written",
                hint="try --dtype float32; if it persists, report it with the run's recipe.yaml",
            )
        verified = (
            f"Verified after saving: max |merged - adapter| logit difference on a probe batch = {max_diff:.3g}.\n"
        )
        (tmp / "README.md").write_text(redact(card + "\n" + verified), encoding="utf-8")
        write_marker(tmp, "merged-model", max_diff)
    return max_diff, tolerance


def output_dtype(recipe, dtype: str):
    return compute_dtype(recipe.model.dtype if dtype == "auto" else dtype)


def run_merge(run_path: Path, out: Path, dtype: str = "auto", force: bool = False) -> float:
    run = open_run(run_path)
    recipe = run.recipe()
    method = method_of(recipe.peft)
    if not method.mergeable:
        raise UserError(f"peft.method '{method.name}' cannot be merged into the weights: {method.serve_hint}")
    out = Path(out).resolve()
    check_out_dir(out, force, [run.path])
    check_model_source(recipe.model)
    with RunLock(run.path):  # the run is not retrained (--overwrite) while it is merged
        return _merge(run, recipe, method, out, dtype)


def _merge(run, recipe, method, out: Path, dtype: str) -> float:
    quiet_libraries()
    torch_dtype = output_dtype(recipe, dtype)
    base = "dequantized" if method_of(recipe.peft).merges_into_dequantized(recipe.peft) else "full_precision"
    with console.err.status(f"loading the base model ({base.replace('_', ' ')}) and the adapter"):
        # (full/freeze runs already hold full weights: merge makes a verified copy in the chosen dtype)
        model, tokenizer = load_run(run, recipe, base=base, dtype=torch_dtype)
        model.eval()
    probe = probe_batch(tokenizer, next(model.parameters()).device)
    expected = logits(model, probe)
    merged = model if method.saves_full_model else model.merge_and_unload()
    dtype_name = str(torch_dtype).removeprefix("torch.")
    card = model_card(
        f"Merged {method.name} fine-tune of `{recipe.model.name}`",
        recipe.model.name,
        [method.name, "merged"],
        [f"The {method.name} update trained by peftcli, folded into the base weights and saved in {dtype_name}."],
        recipe_to_yaml(recipe),
    )
    max_diff, tolerance = save_verified(merged, tokenizer, probe, expected, out, torch_dtype, card)
    console.out.print(
        f"merged model written to {out} ({dtype_name}); verified after reload: "
        f"max |merged - adapter| logit diff {max_diff:.3g} (tolerance {tolerance:.3g})"
    )
    return max_diff
