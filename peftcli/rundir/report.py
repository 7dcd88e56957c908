"""report.md, loss.png and the model card: a run described for people, rendered from its RunResult
(and, once `peftcli eval` has run, its EvalResult). metrics.json, the same result for scripts:
metrics.py. The model card is the artifact's README.md (PEFT's save writes an empty template
there): written after training, refreshed after each `peftcli eval` of the run."""

from __future__ import annotations

import json
from pathlib import Path

from peftcli.redact import redact
from peftcli.rundir.eval_report import markdown_text, summary_lines
from peftcli.rundir.io import atomic_save_figure, atomic_write_text
from peftcli.rundir.layout import ADAPTER, EVAL_PLOT, LOSS_PLOT, MODEL, REPORT
from peftcli.rundir.metrics import write_metrics
from peftcli.rundir.result import EvalResult, RunResult


def write_run(result: RunResult) -> None:
    """metrics.json, loss.png, report.md and the artifact's model card of a run (rank 0 only)."""
    write_metrics(result)
    has_plot = plot_loss(result)
    write_report(result, has_plot)
    if result.adapter_is is not None:  # this run kept an artifact (not an interrupted one)
        refresh_card(result)


def write_report(result: RunResult, has_plot: bool, evaluation: EvalResult | None = None) -> None:
    text = markdown_text(redact(render_report(result, has_plot, evaluation)))
    atomic_write_text(result.run_dir / REPORT, text)


def add_eval(run, evaluation: EvalResult) -> None:
    """Rewrite a run's report.md and model card with an eval section (`peftcli eval`), from its
    metrics.json."""
    from peftcli.rundir.metrics import from_metrics

    metrics = run.metrics()
    if metrics:  # an interrupted run may have none yet
        result = from_metrics(metrics, run.recipe(), run.path)
        write_report(result, (run.path / LOSS_PLOT).exists(), evaluation)
        if result.adapter_is is not None or result.status == "completed":  # (older runs lack adapter_is)
            refresh_card(result, evaluation)


def plot_title(result: RunResult) -> str:
    status = "" if result.status == "completed" else f" ({result.status})"
    base = result.base_model
    shown = Path(base).name if Path(base).is_absolute() else base
    steps = f"{result.steps} step" + ("" if result.steps == 1 else "s")
    # "$" would start matplotlib's math mode
    return f"{result.method} on {shown}: {steps}{status}".replace("$", r"\$")


def loss_figure(result: RunResult):
    """Train loss (and eval loss) per optimizer step, titled with the method, base and length."""
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on servers and CI
    import matplotlib.pyplot as plt

    history, eval_points = result.loss_history, result.eval_history
    fig, ax = plt.subplots(figsize=(6, 3.4), dpi=110)
    few = len(history) < 30  # a short run's points are worth seeing one by one
    ax.plot(
        [h["step"] for h in history],
        [h["loss"] for h in history],
        label="train loss",
        linewidth=1.4,
        marker="." if few else None,
    )
    if eval_points:
        ax.plot([p["step"] for p in eval_points], [p["eval_loss"] for p in eval_points], "o-", label="eval loss")
    ax.set_title(plot_title(result), fontsize=10)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    whole_steps(ax, [h["step"] for h in history])
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def whole_steps(ax, steps: list[int]) -> None:
    """Integer step ticks (no 2.5 on a 4-step run); around one or two steps, a window wide enough
    to hold whole ticks (matplotlib would otherwise tick 0.96, 0.98, ...)."""
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    if steps and max(steps) - min(steps) < 2:
        ax.set_xlim(max(0, min(steps) - 1), max(steps) + 1)


def plot_loss(result: RunResult) -> bool:
    if not result.loss_history:
        return False
    atomic_save_figure(loss_figure(result), result.run_dir / LOSS_PLOT)
    return True


def _loss_table(history: list[dict], rows: int = 12) -> list[str]:
    if not history:
        return ["(no loss was logged)"]
    step = max(1, len(history) // rows)
    picked = history[::step]
    if picked[-1] is not history[-1]:
        picked.append(history[-1])
    return ["| step | loss |", "|---:|---:|", *(f"| {h['step']} | {h['loss']:.4f} |" for h in picked)]


def render_report(r: RunResult, has_plot: bool, evaluation: EvalResult | None = None) -> str:
    recipe = r.recipe
    t, d = recipe.training, recipe.data
    data = r.data
    lines = [
        f"# peftcli run: {r.status}",
        "",
        "## Recipe",
        f"- base model: `{recipe.model.name}` ({r.dtype}, quantization: {r.quantization or 'none'})",
        f"- method: **{r.method}** — {_method_digest(recipe.peft)}",
        f"- data: {data.train.rows} training rows, {data.eval.rows} eval rows, max_length {d.max_length}, "
        f"chat template: {data.chat_template or 'none'}",
        f"- training: {t.describe_length()}, batch {_batch(r)} accumulation, "
        f"lr {t.learning_rate:g} ({t.lr_scheduler}), seed {t.seed}",
        "",
        "## Parameters",
        f"- trainable: {r.trainable_params:,} of {r.total_params:,} ({r.trainable_percent:.4f} %)",
        "",
        "## Loss",
        f"- final train loss: {_fmt(r.train_loss)}; eval loss: {_fmt(r.eval_loss)}",
        *_eval_lines(r),
        "",
        *_loss_table(r.loss_history),
        "",
    ]
    if has_plot:
        lines += [f"![loss curve]({LOSS_PLOT})", ""]
    mfu = (
        f", MFU {100 * r.mfu:.1f} % of the {r.device_peak_tflops:g} TFLOP/s bf16 peak"
        if r.mfu is not None and r.device_peak_tflops
        else " (no peak figure for this device, so no MFU)"
    )
    lines += [
        "## Time and memory",
        f"- {r.steps} steps in {r.train_runtime_s:.1f} s on {r.device}; {_fmt(r.train_tokens_per_s, '.0f')} "
        f"tokens/s ({r.train_tokens:,} tokens, {100 * data.padding_fraction:.1f} % of the batch was padding)",
        f"- compute: {r.tflops:.2f} TFLOP/s per device{mfu}; {r.world_size} process(es)",
        f"- peak memory: {r.peak_memory_mb:.0f} MiB ({r.peak_memory_kind})",
        "- settings: " + ", ".join(f"{k}={v}" for k, v in r.settings.items()),
        f"- data: {data.train.truncated} truncated, {data.train.dropped} dropped, "
        f"{data.train.skipped} bad rows skipped",
        "",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in r.versions.items()),
        "",
    ]
    if evaluation is not None:
        lines += [
            "## Eval (`peftcli eval`)",
            "",
            *summary_lines(evaluation),
            "",
            f"![eval]({EVAL_PLOT})",
            "",
            "Details: `eval.json`, `eval.md`" + (", `predictions.jsonl`." if evaluation.generation else "."),
            "",
        ]
    return "\n".join(lines)


def _eval_lines(r: RunResult) -> list[str]:
    if not r.eval_history:
        return []
    history = ", ".join(f"{h['eval_loss']:.4f} @ {h['step']}" for h in r.eval_history)
    lines = [f"- eval loss during training: {history}"]
    if r.adapter_is == "best":
        stopped = "stopped early; " if r.stopped_early else ""
        lines.append(
            f"- {stopped}adapter/ is the best one seen: step {r.best_step}, eval loss {_fmt(r.best_eval_loss)}"
        )
    return lines


def _method_digest(peft) -> str:
    values = peft.model_dump(exclude={"method"}, exclude_defaults=False)
    return ", ".join(f"{k}={v}" for k, v in values.items() if v not in (None, [], {}))


def _batch(r: RunResult) -> str:
    """The batch that trained, "8 x 2" (batch_size: auto: what the settings say it picked)."""
    t, chosen = r.recipe.training, r.settings or {}
    if t.batch_size == "auto" and chosen.get("batch_size"):
        return f"{chosen['batch_size']} (auto) x {chosen['gradient_accumulation']}"
    return f"{t.batch_size} x {t.gradient_accumulation}"


def _fmt(value, spec: str = ".4f") -> str:
    return "n/a" if value is None else format(value, spec)


CARD = "README.md"


def _artifact_folder(run_dir: Path) -> Path | None:
    """The run's kept adapter/ (or model/ of a full fine-tune), if it is there."""
    for folder, config in ((run_dir / ADAPTER, "adapter_config.json"), (run_dir / MODEL, "config.json")):
        if (folder / config).is_file():
            return folder
    return None


def write_card(folder: Path, recipe, result: RunResult | None = None, evaluation: EvalResult | None = None) -> None:
    """The model card, README.md in the artifact folder (replacing PEFT's empty template): from the
    recipe alone right after the save (training/artifact.py), then with the training figures, then
    with the eval."""
    atomic_write_text(folder / CARD, markdown_text(redact(render_card(recipe, result, evaluation))))


def refresh_card(result: RunResult, evaluation: EvalResult | None = None) -> None:
    folder = _artifact_folder(result.run_dir)
    if folder is not None:
        write_card(folder, result.recipe, result, evaluation)


def _source_name(path: str) -> str:
    """A local file by its name (the card travels without the machine's folders), a hub id as is."""
    from peftcli.model.checks import is_local

    return Path(path).name if is_local(path) else path


def render_card(recipe, result: RunResult | None, evaluation: EvalResult | None = None) -> str:
    from peftcli.methods import method_of
    from peftcli.model.checks import is_local
    from peftcli.recipe import recipe_to_yaml

    base, method = recipe.model.name, recipe.peft.method
    full = method_of(recipe.peft).saves_full_model
    front = ["---"]
    if not is_local(base):  # the hub wants a repo id here, never a local path
        front.append(f"base_model: {json.dumps(base)}")
    front += [
        f"library_name: {'transformers' if full else 'peft'}",
        f"tags: {json.dumps(['peftcli', method])}",
        "---",
    ]
    kind = "fine-tune" if full else "adapter"
    d = recipe.data
    rows = {"train": result.data.train.rows, "eval": result.data.eval.rows} if result is not None else {}
    eval_data = (
        ", ".join(_source_name(s.path) for s in d.eval)
        if d.eval
        else (f"{d.eval_split:g} of the training rows, held out" if d.eval_split else "none")
    )
    lines = [
        *front,
        "",
        f"# `{method}` {kind} of `{_source_name(base)}`",
        "",
        "Trained with peftcli from the recipe below.",
        "",
        "## Base model",
        f"- `{base}`" + (f" (revision `{recipe.model.revision}`)" if recipe.model.revision else ""),
        f"- quantization while training: {f'{recipe.quantization.bits}-bit' if recipe.quantization else 'none'}",
        "",
        "## Method",
        f"- **{method}**: {_method_digest(recipe.peft) or 'defaults'}",
    ]
    if result is not None:
        lines.append(
            f"- trainable parameters: {result.trainable_params:,} of {result.total_params:,} "
            f"({result.trainable_percent:.4f} %)"
        )
    lines += [
        "",
        "## Data",
        "- training: "
        + ", ".join(_source_name(s.path) for s in d.train)
        + (f" ({rows['train']:,} rows)" if rows else ""),
        f"- eval: {eval_data}" + (f" ({rows['eval']:,} rows)" if rows and rows["eval"] else ""),
        f"- max_length {d.max_length}, chat template: {d.chat_template}",
        "",
    ]
    if result is not None:
        lines += [*_training_lines(result), ""]
    if evaluation is not None:
        lines += ["## Eval (`peftcli eval`)", "", *summary_lines(evaluation), ""]
    loader = "AutoModelForCausalLM" if full else "AutoPeftModelForCausalLM"
    package = "transformers" if full else "peft"
    lines += [
        "## Use",
        "",
        "```python",
        f"from {package} import {loader}",
        f'model = {loader}.from_pretrained("<this folder>")',
        "```",
        "",
        "## Recipe",
        "",
        "```yaml",
        recipe_to_yaml(recipe).rstrip(),
        "```",
        "",
    ]
    return "\n".join(lines)


def _training_lines(r: RunResult) -> list[str]:
    t = r.recipe.training
    lines = [
        "## Training",
        f"- {r.steps} steps ({r.epochs:g} epochs), batch {_batch(r)} accumulation, "
        f"lr {t.learning_rate:g} ({t.lr_scheduler}), seed {t.seed}",
        f"- final train loss {_fmt(r.train_loss)}, eval loss {_fmt(r.eval_loss)}",
    ]
    if r.adapter_is == "best":
        lines.append(f"- kept the best one seen: step {r.best_step}, eval loss {_fmt(r.best_eval_loss)}")
    lines.append(
        f"- {_fmt(r.train_runtime_s, '.1f')} s on {r.device} ({r.dtype}), {_fmt(r.train_tokens_per_s, '.0f')} "
        f"tokens/s, peak memory {_fmt(r.peak_memory_mb, '.0f')} MiB"
    )
    return lines
