"""`peftcli merge RUN_A RUN_B ... --weights ... --combination ...`: several adapters into one.

Uses PEFT's `add_weighted_adapter`. The result is either one adapter (`--as-adapter`) or a full
merged model, verified like a single merge: what is saved is reloaded and its logits compared with
the combined adapter's in memory.

Refused up front, before any weight loads: runs on different bases, methods PEFT cannot combine
(only LoRA and IA3 can; DoRA's magnitudes are not combined correctly), ranks that a combination
requires to be equal, and weights or densities that do not fit.
"""

from __future__ import annotations

import json
import shutil
from contextlib import ExitStack
from pathlib import Path

from peftcli import console
from peftcli.errors import CheckFailed, UserError
from peftcli.export.merge import (
    check_out_dir,
    compare,
    logits,
    model_card,
    output_dtype,
    probe_batch,
    save_verified,
    write_marker,
)
from peftcli.methods import REGISTRY, method_of
from peftcli.model.checks import check_model_source
from peftcli.model.load import attach_adapter, load_model, load_tokenizer, quiet_libraries
from peftcli.rundir import atomic_dir, open_run
from peftcli.rundir.lock import RunLock

COMBINATIONS = ("linear", "cat", "svd", "ties", "dare_linear", "dare_ties", "magnitude_prune")
NEEDS_DENSITY = ("ties", "dare_linear", "dare_ties", "magnitude_prune")
NEEDS_EQUAL_RANK = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")


def _check_runs(runs, recipes, combination: str, weights: list[float], density: float | None) -> str:
    """All the refusals; returns the adapters' common kind (the registry's `combines_as`)."""
    bases = {(r.model.name, r.model.revision) for r in recipes}
    if len(bases) > 1:
        listed = "; ".join(f"{run.path.name}: {rec.model.name}" for run, rec in zip(runs, recipes))
        raise UserError(
            f"the runs were trained on different base models ({listed})",
            hint="adapters can only be combined on the base they were trained on",
        )
    kinds = set()
    combinable = sorted(name for name, m in REGISTRY.items() if m.combines_as)
    for run, recipe in zip(runs, recipes):
        method = method_of(recipe.peft)
        if method.combines_as is None:
            raise UserError(
                f"{run.path.name} uses peft.method '{method.name}'; "
                f"only {', '.join(combinable)} adapters can be combined"
            )
        why = method.uncombinable(recipe.peft)
        if why:
            raise UserError(f"{run.path.name}: {why}", hint="merge such runs one at a time")
        kinds.add(method.combines_as)
    if len(kinds) > 1:
        raise UserError(
            f"cannot combine adapters of different kinds ({', '.join(sorted(kinds))})",
            hint="combine runs of one method",
        )
    kind = kinds.pop()
    if kind == "scaling" and combination != "linear":
        raise UserError(
            f"--combination {combination}: {recipes[0].peft.method} adapters combine only as a weighted sum (linear)"
        )
    if combination not in COMBINATIONS:
        raise UserError(f"--combination {combination!r}: expected one of {', '.join(COMBINATIONS)}")
    if len(weights) != len(runs):
        raise UserError(f"--weights has {len(weights)} values for {len(runs)} runs")
    if combination in NEEDS_DENSITY and not (density is not None and 0 < density <= 1):
        raise UserError(f"--combination {combination} needs --density in (0, 1] (the fraction of weights kept)")
    if combination not in NEEDS_DENSITY and density is not None:
        raise UserError(f"--density applies to {', '.join(NEEDS_DENSITY)} only")
    if kind == "low_rank" and combination in NEEDS_EQUAL_RANK:
        ranks = {_rank(run.adapter / "adapter_config.json") for run in runs}
        if len(ranks) > 1:
            raise UserError(
                f"--combination {combination} needs adapters of equal rank (got r = {sorted(ranks)})",
                hint="use --combination cat or svd for different ranks",
            )
    return kind


def _rank(config_file: Path) -> int:
    try:
        return int(json.loads(config_file.read_text(encoding="utf-8"))["r"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(
            f"{config_file}: cannot read the adapter's rank r ({exc.__class__.__name__}: {exc})",
            hint="the file was edited or damaged; copy the run's adapter/ folder again, or retrain",
        ) from None


def parse_weights(text: str | None, n: int) -> list[float]:
    if text is None:
        return [1.0 / n] * n
    try:
        return [float(w) for w in text.split(",")]
    except ValueError:
        raise UserError(f"--weights {text!r}: expected comma-separated numbers, e.g. 0.7,0.3") from None


def run_combine(
    run_paths: list[Path],
    out: Path,
    *,
    weights: str | None,
    combination: str,
    density: float | None,
    as_adapter: bool,
    dtype: str = "auto",
    force: bool = False,
) -> float:
    runs = [open_run(p) for p in run_paths]
    recipes = [run.recipe() for run in runs]
    parsed = parse_weights(weights, len(runs))
    kind = _check_runs(runs, recipes, combination, parsed, density)
    out = Path(out).resolve()
    check_out_dir(out, force, [run.path for run in runs])
    check_model_source(recipes[0].model)
    with ExitStack() as locks:
        for path in sorted({run.path for run in runs}):  # no run is retrained while it is combined
            locks.enter_context(RunLock(path))
        return _combine(runs, recipes, kind, parsed, out, combination, density, as_adapter, dtype)


def _combine(
    runs, recipes, kind: str, parsed, out: Path, combination: str, density, as_adapter: bool, dtype: str
) -> float:
    recipe = recipes[0]
    import torch

    quiet_libraries()
    torch_dtype = output_dtype(recipe, dtype)
    tokenizer = load_tokenizer(recipe.model, path=str(runs[0].adapter))
    templates = {
        (run.adapter / "chat_template.jinja").read_text() if (run.adapter / "chat_template.jinja").exists() else None
        for run in runs
    }
    if len(templates) > 1:
        console.warn(f"the runs used different chat templates; the result keeps {runs[0].path.name}'s")
    names = [f"run{i}" for i in range(len(runs))]
    with console.err.status(f"loading the base model and {len(runs)} adapters"):
        model = load_model(recipe.model, quant=None, dtype=torch_dtype)
        # Through the one checked loader: PEFT alone loads an adapter of another base (or a file
        # missing its weights) in silence, and the combination would then leave that run out.
        for name, run in zip(names, runs):
            label = f"{run.path.name} ({run.adapter})"
            model = attach_adapter(model, str(run.adapter), recipe.model.name, adapter_name=name, label=label)
    torch.manual_seed(0)  # DARE drops weights at random: make the result reproducible
    # Only low-rank adapters take a combination type (scaling vectors are a weighted sum).
    kwargs = {"combination_type": combination, "density": density} if kind == "low_rank" else {}
    try:
        model.add_weighted_adapter(names, parsed, "combined", **kwargs)
    except (ValueError, TypeError) as exc:  # e.g. two adapters both saving the same module in full
        raise UserError(f"PEFT cannot combine these adapters: {exc}") from None
    model.set_adapter("combined")
    model.eval()
    probe = probe_batch(tokenizer, next(model.parameters()).device)
    expected = logits(model, probe)
    sources = [f"{run.path} (weight {w:g})" for run, w in zip(runs, parsed)]
    body = [f"Combined from {len(runs)} peftcli runs with `{combination}`:", *[f"- {s}" for s in sources]]
    dtype_name = str(torch_dtype).removeprefix("torch.")

    if as_adapter:
        max_diff, tolerance = _save_adapter(model, tokenizer, probe, expected, out, recipe, dtype_name, body)
        what = "combined adapter"
    else:
        merged = model.merge_and_unload(adapter_names=["combined"])
        card = model_card(
            f"Combined fine-tune of `{recipe.model.name}`",
            recipe.model.name,
            [recipe.peft.method, "merged", combination],
            body,
            None,
        )
        max_diff, tolerance = save_verified(merged, tokenizer, probe, expected, out, torch_dtype, card)
        what = "merged model"
    console.out.print(
        f"{what} written to {out}; verified after reload: max logit diff {max_diff:.3g} (tolerance {tolerance:.3g})"
    )
    return max_diff


def _save_adapter(model, tokenizer, probe, expected, out: Path, recipe, dtype_name: str, body: list[str]):
    from peft import PeftModel

    with atomic_dir(out) as tmp:
        # PEFT writes a non-default adapter into a subfolder named after it; lift it to the top.
        model.save_pretrained(tmp / "staging", selected_adapters=["combined"])
        for item in (tmp / "staging" / "combined").iterdir():
            shutil.move(str(item), tmp / item.name)
        shutil.rmtree(tmp / "staging")
        tokenizer.save_pretrained(tmp)
        fresh = load_model(recipe.model, quant=None, dtype=model.dtype)
        # Plain PEFT on purpose: the promise is that PEFT alone loads it; the logits below catch a
        # file that loaded short (attach_adapter would call our own output the user's mistake).
        reloaded = PeftModel.from_pretrained(fresh, str(tmp)).eval()
        max_diff, tolerance = compare(logits(reloaded, probe), expected, probe, dtype_name)
        if not max_diff <= tolerance:
            raise CheckFailed(f"the saved combined adapter drifts by {max_diff:.3g} (tolerance {tolerance:.3g})")
        (tmp / "README.md").write_text(
            "\n".join(
                [
                    f"# Combined adapter for `{recipe.model.name}`",
                    "",
                    *body,
                    "",
                    "Load it with `PeftModel.from_pretrained(base, <this folder>)`.",
                    "",
                ]
            ),
            encoding="utf-8",
        )
        write_marker(tmp, "combined-adapter", max_diff)
    return max_diff, tolerance
