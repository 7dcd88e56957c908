"""report.md and loss.png: a run described for people, rendered from its RunResult (and, once
`peftcli eval` has run, its EvalResult). metrics.json, the same result for scripts: metrics.py."""

from __future__ import annotations

from peftcli.redact import redact
from peftcli.rundir.eval_report import summary_lines
from peftcli.rundir.io import atomic_save_figure, atomic_write_text
from peftcli.rundir.layout import EVAL_PLOT, LOSS_PLOT, REPORT
from peftcli.rundir.metrics import write_metrics
from peftcli.rundir.result import EvalResult, RunResult


def write_run(result: RunResult) -> None:
    """metrics.json, loss.png and report.md of a run (rank 0 only)."""
    write_metrics(result)
    has_plot = plot_loss(result)
    write_report(result, has_plot)


def write_report(result: RunResult, has_plot: bool, evaluation: EvalResult | None = None) -> None:
    atomic_write_text(result.run_dir / REPORT, redact(render_report(result, has_plot, evaluation)))


def add_eval(run, evaluation: EvalResult) -> None:
    """Rewrite a run's report.md with an eval section (`peftcli eval`), from its metrics.json."""
    from peftcli.rundir.metrics import from_metrics

    metrics = run.metrics()
    if metrics:  # an interrupted run may have none yet
        result = from_metrics(metrics, run.recipe(), run.path)
        write_report(result, (run.path / LOSS_PLOT).exists(), evaluation)


def plot_loss(result: RunResult) -> bool:
    history, eval_points = result.loss_history, result.eval_history
    if not history:
        return False
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on servers and CI
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=110)
    ax.plot([h["step"] for h in history], [h["loss"] for h in history], label="train loss", linewidth=1.4)
    if eval_points:
        ax.plot([p["step"] for p in eval_points], [p["eval_loss"] for p in eval_points], "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_save_figure(fig, result.run_dir / LOSS_PLOT)
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
        f"- training: {t.describe_length()}, batch {t.batch_size} x {t.gradient_accumulation} accumulation, "
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


def _fmt(value, spec: str = ".4f") -> str:
    return "n/a" if value is None else format(value, spec)
