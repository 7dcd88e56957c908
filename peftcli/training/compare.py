"""`peftcli compare RECIPE --methods lora,dora,ia3,...`: the same recipe once per method — same
data, seed and steps — and one table to choose from: trainable parameters, adapter size on disk,
peak memory, tokens/s, wall time, final train loss, eval loss, and, when the recipe names general
text in `eval.reference`, forgetting: how much worse each tuned model predicts that text than the
base does (`peftcli eval` on each finished run, whose eval.* files it writes there).

Each method trains in its own process (`peftcli train`), so peak memory is that method's alone and
one method failing does not stop the others.

Before anything trains or is written, every method is put through the checks `peftcli validate`
runs (the recipe with that method, then the model folder, context length and architecture): a method
that cannot run on this recipe stops the command with exit code 2, naming the method. A method that
still fails while training keeps its `failed` row in the reports, which are written as usual; the
command then names the failed methods and exits 2 if every failure was a user error, else 1.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

from peftcli import console
from peftcli.errors import EXIT_BUG, EXIT_USER, ReportedError, UserError
from peftcli.methods import REGISTRY
from peftcli.model.checks import check_environment
from peftcli.recipe import Recipe, recipe_to_yaml
from peftcli.recipe.load import RawRecipe, validate
from peftcli.recipe.schema import recipe_data
from peftcli.rundir import (
    MARKER,
    artifact_dir,
    atomic_save_figure,
    atomic_write_json,
    atomic_write_text,
    check_replaceable,
    read_marker,
    remove_owned,
)
from peftcli.rundir.eval_report import markdown_cell, markdown_text
from peftcli.rundir.lock import RunLock
from peftcli.rundir.metrics import read_metrics

COLUMNS = (
    ("method", "method", "{}"),
    ("trainable params", "trainable_params", "{:,}"),
    ("trainable %", "trainable_percent", "{:.3f}"),
    ("size on disk (MiB)", "artifact_mb", "{:.3f}"),
    ("peak memory (MiB)", "peak_memory_mb", "{:,.0f}"),
    ("tokens/s", "train_tokens_per_s", "{:,.0f}"),
    ("wall time (s)", "wall_s", "{:.1f}"),
    ("final train loss", "train_loss", "{:.4f}"),
    ("eval loss", "eval_loss", "{:.4f}"),
    ("forgetting %", "forgetting_percent", "{:+.1f}"),
)


def parse_methods(text: str) -> list[str]:
    names = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in names if m not in REGISTRY]
    if unknown:
        raise UserError(f"--methods: unknown method(s) {', '.join(unknown)}", hint=f"methods: {', '.join(REGISTRY)}")
    if len(set(names)) != len(names) or not names:
        raise UserError("--methods: give each method once, e.g. --methods lora,dora,ia3")
    return names


def variant(recipe: Recipe, method: str, out: Path) -> Recipe:
    """The recipe with another method: its own peft section if it already uses that method, else
    defaults; a learning rate the recipe left unset is each method's own."""
    data = recipe_data(recipe, method)
    data["output"]["dir"] = str(out / method)
    # e.g. a quantized recipe with a method that cannot train on a quantized base
    return validate(RawRecipe(data=data, path=Path(f"--methods {method}")))


def check_methods(recipe: Recipe, methods: list[str], out: Path) -> dict[str, Recipe]:
    """Each method's recipe, after the checks `peftcli validate` runs (no weights, no torch): every
    refusal happens here, before anything trains or is written."""
    variants: dict[str, Recipe] = {}
    refused: dict[str, UserError] = {}
    for method in methods:
        try:
            variants[method] = variant(recipe, method, out)
            check_environment(variants[method], deep=False)
        except UserError as exc:
            refused[method] = exc
    if not refused:
        return variants
    reasons = {method: exc.message.removeprefix(f"--methods {method}: ") for method, exc in refused.items()}
    first = next(iter(refused))
    if len(methods) > 1 and len(refused) == len(methods) and len(set(reasons.values())) == 1:
        raise UserError(reasons[first], hint=refused[first].hint)  # the recipe itself, not one method
    others = [m for m in refused if m != first]
    hint = "; ".join(filter(None, [refused[first].hint, f"also refused: {', '.join(others)}" if others else None]))
    raise UserError(f"--methods {first}: {reasons[first]}", hint=hint or f"drop {first} from --methods")


class MethodsFailed(ReportedError):
    """Some methods failed while training: the reports are written, the exit code says so."""

    def __init__(self, message: str, hint: str, exit_code: int):
        super().__init__(message, hint)
        self.exit_code = exit_code


COMPARE_KIND = "compare"
OUTPUTS = ("compare.json", "compare.md", "compare.png", MARKER)


def _owned_by(out: Path):
    """What a comparison folder holds of peftcli's: its reports, and a recipe and run per method."""
    methods = [m for m in (read_marker(out) or {}).get("methods") or [] if isinstance(m, str)]
    names = set(OUTPUTS) | {f"{m}.yaml" for m in methods} | set(methods)
    return lambda name: name in names


def _artifact_mb(run_dir: Path, method: str) -> float:
    folder = artifact_dir(run_dir, REGISTRY[method])
    return sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 2**20


def _peftcli(*args: str) -> subprocess.CompletedProcess:
    """One peftcli command in its own process (its peak memory is its own), output captured."""
    return subprocess.run(
        [sys.executable, "-m", "peftcli", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def _failure(proc: subprocess.CompletedProcess) -> str:
    """The command's `error:` line, or the end of its stderr when it died without one."""
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    return errors[0] if errors else proc.stderr.strip()[-300:]


# The figures of a finished run (RunResult fields, metrics.json keys) that a comparison row keeps.
KEPT_METRICS = (
    "trainable_params",
    "total_params",
    "trainable_percent",
    "peak_memory_mb",
    "train_tokens_per_s",
    "train_runtime_s",
    "train_loss",
    "eval_loss",
    "loss_history",
    "device",
)


def _run_one(recipe_file: Path, recipe: Recipe, method: str) -> dict:
    started = time.perf_counter()
    proc = _peftcli("train", str(recipe_file), "--overwrite")
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        return {"status": "failed", "error": _failure(proc), "exit_code": proc.returncode, "wall_s": wall}
    result = read_metrics(recipe.run_dir, recipe)
    return {
        "status": "completed",
        "wall_s": wall,
        "artifact_mb": _artifact_mb(recipe.run_dir, method),
        **{key: getattr(result, key) for key in KEPT_METRICS},
    }


def measures_forgetting(recipe: Recipe) -> bool:
    """`peftcli eval` needs eval data; forgetting needs general text to score."""
    has_eval = recipe.data.eval is not None or recipe.data.eval_split is not None
    return recipe.eval.reference is not None and has_eval


def _forgetting(run_dir: Path) -> dict:
    """`peftcli eval` on a finished run: the rise in perplexity on `eval.reference`, base to tuned."""
    proc = _peftcli("eval", str(run_dir), "--json")
    if proc.returncode != 0:
        return {"forgetting_error": _failure(proc)}
    lost = json.loads(proc.stdout).get("forgetting") or {}
    return {
        "forgetting_percent": lost.get("forgetting_percent"),
        "reference_perplexity": {"base": lost.get("base_perplexity"), "tuned": lost.get("tuned_perplexity")},
    }


def _run_guarded(recipe_file: Path, recipe: Recipe, method: str) -> dict:
    """`_run_one`, with anything it raises (say, unreadable metrics) recorded as that method's failure."""
    started = time.perf_counter()
    try:
        return _run_one(recipe_file, recipe, method)
    except ReportedError as exc:
        error, code = f"error: {exc.message}", exc.exit_code
    except Exception as exc:  # noqa: BLE001 - one method's failure must not lose the others' results
        error, code = f"error: unexpected {exc.__class__.__name__}: {exc}", EXIT_BUG
    return {"status": "failed", "error": error, "exit_code": code, "wall_s": time.perf_counter() - started}


def _cell(value, fmt: str) -> str:
    return "—" if value is None else fmt.format(value)


def markdown_table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(c[0] for c in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        if row["status"] != "completed":
            lines.append(f"| {row['method']} | failed: {markdown_cell(row['error'])} |" + " |" * (len(COLUMNS) - 2))
            continue
        lines.append("| " + " | ".join(_cell(row.get(key), fmt) for _, key, fmt in COLUMNS) + " |")
    return "\n".join(lines)


BAR_PANELS = (
    ("trainable params", "trainable_params", True, "{:,.0f}"),
    ("eval loss", "eval_loss", False, "{:.4f}"),
    ("tokens/s", "train_tokens_per_s", False, "{:,.0f}"),
    ("peak memory (MiB)", "peak_memory_mb", False, "{:,.0f}"),
    ("forgetting % (lower is better)", "forgetting_percent", False, "{:+.1f}"),
)


def figure(rows: list[dict]):
    """Every finished method's training loss overlaid, then one bar chart per figure of the table."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from peftcli.rundir.report import whole_steps

    done = [r for r in rows if r["status"] == "completed"]
    # a forgetting panel only when it was measured (the recipe names eval.reference)
    panels = [p for p in BAR_PANELS if any(r.get(p[1]) is not None for r in done) or p[1] != "forgetting_percent"]
    fig = plt.figure(figsize=(6 + 3.6 * len(panels), 3.8), dpi=100)
    grid = fig.add_gridspec(1, 1 + len(panels), width_ratios=[1.7] + [1] * len(panels))
    curves = fig.add_subplot(grid[0, 0])
    for row in done:
        history = row.get("loss_history") or []
        steps, losses = [h["step"] for h in history], [h["loss"] for h in history]
        curves.plot(steps, losses, label=row["method"], linewidth=1.3, marker="." if len(history) < 30 else None)
    curves.set_title("training loss")
    curves.set_xlabel("optimizer step")
    curves.set_ylabel("loss")
    whole_steps(curves, [h["step"] for r in done for h in r.get("loss_history") or []])
    curves.grid(alpha=0.3)
    if any(row.get("loss_history") for row in done):
        curves.legend(fontsize=8)
    for index, (title, key, log, fmt) in enumerate(panels, start=1):
        ax = fig.add_subplot(grid[0, index])
        values = [r.get(key) for r in done]
        bars = ax.bar([r["method"] for r in done], [v or 0 for v in values], color="#4c72b0")
        ax.bar_label(bars, labels=[_cell(v, fmt) for v in values], padding=2, fontsize=7)
        ax.set_title(title)
        ax.tick_params(axis="x", rotation=45)
        if log and any(values):
            ax.set_yscale("log")
        else:  # no negative axis unless a value is negative (forgetting can be); room for the labels
            top = max((v for v in values if v), default=0)
            bottom = min((v for v in values if v), default=0)
            ax.set_ylim(min(bottom, 0) * 1.2, top * 1.2 if top > 0 else 1)
    fig.tight_layout()
    return fig


def plot(rows: list[dict], path: Path) -> None:
    atomic_save_figure(figure(rows), path)


def run_compare(
    recipe: Recipe, methods: list[str], out: Path, overwrite: bool = False, as_json: bool = False
) -> list[dict]:
    """Train every method and write the comparison; with `as_json`, compare.json's object is printed
    on stdout (also when some methods failed) and the table goes to stderr."""
    variants = check_methods(recipe, methods, out)  # every refusal before any training or writing
    check_replaceable(out, overwrite, "--out", (COMPARE_KIND,), flag="--overwrite", owns=_owned_by(out))
    if out.exists() and overwrite:
        remove_owned(out, _owned_by(out))
    out.mkdir(parents=True, exist_ok=True)
    # marks the folder as a comparison from the start, so a later --overwrite may replace it
    atomic_write_json(out / MARKER, {"kind": COMPARE_KIND, "methods": methods})
    atomic_write_json(out / "compare.json", {"methods": methods, "status": "running"})
    with RunLock(out):  # one comparison at a time in this folder
        return _compare(recipe, methods, variants, out, as_json)


def _verdict(row: dict) -> str:
    if row["status"] != "completed":
        return row["error"]
    text = f"train loss {_cell(row.get('train_loss'), '{:.4f}')}, eval loss {_cell(row.get('eval_loss'), '{:.4f}')}"
    if "forgetting_percent" in row:
        text += f", forgetting {_cell(row['forgetting_percent'], '{:+.1f}')} %"
    if "forgetting_error" in row:
        text += f" (forgetting not measured: {row['forgetting_error']})"
    return text


def _compare(recipe: Recipe, methods: list[str], variants: dict[str, Recipe], out: Path, as_json: bool) -> list[dict]:
    rows = []
    for index, (method, recipe_variant) in enumerate(variants.items(), start=1):
        recipe_file = out / f"{method}.yaml"
        atomic_write_text(recipe_file, recipe_to_yaml(recipe_variant))
        with console.err.status(f"[{index}/{len(methods)}] training with {method}"):
            row = {"method": method, **_run_guarded(recipe_file, recipe_variant, method)}
        if row["status"] == "completed" and measures_forgetting(recipe_variant):
            with console.err.status(f"[{index}/{len(methods)}] measuring forgetting with {method}"):
                row.update(_forgetting(out / method))
        rows.append(row)
        console.err.print(f"[{index}/{len(methods)}] {method}: {_verdict(row)} ({row['wall_s']:.1f} s)", markup=False)

    t = recipe.training
    failed = [r["method"] for r in rows if r["status"] != "completed"]
    summary = {"recipe": yaml.safe_load(recipe_to_yaml(recipe)), "methods": methods, "failed": failed, "rows": rows}
    atomic_write_json(out / "compare.json", summary)
    plot(rows, out / "compare.png")
    length = t.describe_length()
    device = next((r["device"] for r in rows if r.get("device")), "?")
    text = "\n".join(
        [
            f"# Method comparison on `{recipe.model.name}`",
            "",
            f"Same data, seed ({t.seed}) and length ({length}, batch {t.batch_size} x {t.gradient_accumulation}) for "
            f"every method; each trained in its own process. Device: {device}.",
            "Peak memory is CUDA memory allocated on a GPU, the process's resident memory on CPU.",
            *(
                [
                    f"Forgetting: how much the tuned model's perplexity on `{recipe.eval.reference}` rose over "
                    "the base's (lower is better; `peftcli eval` on each run, details in its eval.md)."
                ]
                if measures_forgetting(recipe)
                else []
            ),
            "",
            markdown_table(rows),
            "",
            "![comparison](compare.png)",
            "",
            f"Each method's run directory (adapter, metrics, report) is in `{out}/<method>/`, its recipe in "
            f"`{out}/<method>.yaml`.",
            "",
        ]
    )
    atomic_write_text(out / "compare.md", markdown_text(text))
    shown = console.err if as_json else console.out
    shown.print(markdown_table(rows), markup=False)
    shown.print(f"written to {out / 'compare.md'} (+ compare.json, compare.png)", markup=False)
    if as_json:
        print(json.dumps(summary, ensure_ascii=False))
    if failed:
        user = all(r.get("exit_code") == EXIT_USER for r in rows if r["status"] != "completed")
        raise MethodsFailed(
            f"{len(failed)} of {len(rows)} methods failed: {', '.join(failed)}",
            hint=f"each failure's reason is in its row of {out / 'compare.md'}; "
            f"rerun one with `peftcli train {out}/<method>.yaml --overwrite` to see its full output",
            exit_code=EXIT_USER if user else EXIT_BUG,
        )
    return rows
