"""What a run reports about itself: `metrics.json` (machine-readable), `report.md` + `loss.png` (human).

The metric names under "Run directory contract" in the README are public: scripts read them.
"""

from __future__ import annotations

import importlib.metadata
import json
import platform
import resource
import sys
from dataclasses import asdict
from typing import TYPE_CHECKING

from peftcli.rundir import LOSS_PLOT, METRICS, REPORT, atomic_save_figure, atomic_write_text
from peftcli.secrets import redact

if TYPE_CHECKING:
    from peftcli.training import TrainOutcome

PACKAGES = ("peftcli", "torch", "transformers", "peft", "trl", "datasets", "bitsandbytes", "accelerate")


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def peak_memory_mb() -> float:
    """Peak CUDA memory allocated by tensors on a GPU; peak resident set size of the process on CPU."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    # ru_maxrss is in KiB on Linux and bytes on macOS
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def loss_history(log_history: list[dict]) -> list[dict]:
    return [{"step": e["step"], "loss": float(e["loss"])} for e in log_history if "loss" in e and "step" in e]


def build_metrics(o: TrainOutcome) -> dict:
    from peftcli.hardware import utilisation

    history = loss_history(o.log_history)
    train_tokens = o.tokens.real
    steady = o.tokens.steady()
    per_second = train_tokens / o.runtime_s if o.runtime_s > 0 else 0.0
    per_device = per_second / max(o.world_size, 1)
    data = {
        "train": asdict(o.data.train_stats),
        "eval": asdict(o.data.eval_stats),
        "padding_fraction": round(o.tokens.padding_fraction, 4),
        "chat_template": o.data.template.name if o.data.template else None,
    }
    # The flat keys the data issue promises, for the training split.
    for key in ("rows", "tokens", "truncated", "dropped", "skipped"):
        data[key] = data["train"][key]
    quant = o.recipe.quantization
    return {
        "status": o.status,
        "method": o.recipe.peft.method,
        "base_model": o.recipe.model.name,
        "trainable_params": o.trainable_params,
        "total_params": o.total_params,
        "trainable_percent": round(100 * o.trainable_params / max(o.total_params, 1), 4),
        "train_loss": history[-1]["loss"] if history else None,
        "loss_history": history,
        "eval_loss": o.eval_loss,
        "steps": o.steps,
        "epochs": round(o.epochs, 4),
        "train_runtime_s": round(o.runtime_s, 3),
        "train_tokens": train_tokens,
        "train_tokens_per_s": round(per_second, 2) if o.runtime_s > 0 else None,
        # Without the warm-up steps (allocator growth, kernel autotuning, data loader start).
        "steady_tokens_per_s": round(steady.tokens_per_s, 2) if steady else None,
        "tokens_per_s_per_device": round(per_device, 2) if o.runtime_s > 0 else None,
        "world_size": o.world_size,
        **utilisation(per_device, o.matmul_params, o.full_finetune, o.device),
        "peak_memory_mb": round(o.peak_memory_mb, 1),
        "peak_memory_kind": "cuda_allocated" if o.device != "cpu" else "cpu_rss",
        "device": o.device,
        "dtype": o.dtype,
        "quantization": None if quant is None else quant.describe(),
        "data": data,
        "settings": o.settings,
        "versions": versions(),
        **o.extra,
    }


def plot_loss(history: list[dict], path, eval_points: list[dict] | None = None) -> bool:
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
    atomic_save_figure(fig, path)
    return True


def _loss_table(history: list[dict], rows: int = 12) -> list[str]:
    if not history:
        return ["(no loss was logged)"]
    step = max(1, len(history) // rows)
    picked = history[::step]
    if picked[-1] is not history[-1]:
        picked.append(history[-1])
    return ["| step | loss |", "|---:|---:|", *(f"| {h['step']} | {h['loss']:.4f} |" for h in picked)]


def render_report(metrics: dict, recipe, has_plot: bool, eval_result: dict | None = None) -> str:
    t, d = recipe.training, recipe.data
    steps = t.describe_length()
    quant = metrics["quantization"] or "none"
    data = metrics["data"]
    lines = [
        f"# peftcli run: {metrics['status']}",
        "",
        "## Recipe",
        f"- base model: `{recipe.model.name}` ({metrics['dtype']}, quantization: {quant})",
        f"- method: **{metrics['method']}** — {_method_digest(recipe.peft)}",
        f"- data: {data['rows']} training rows, {data['eval']['rows']} eval rows, max_length {d.max_length}, "
        f"chat template: {data['chat_template'] or 'none'}",
        f"- training: {steps}, batch {t.batch_size} x {t.gradient_accumulation} accumulation, "
        f"lr {t.learning_rate:g} ({t.lr_scheduler}), seed {t.seed}",
        "",
        "## Parameters",
        f"- trainable: {metrics['trainable_params']:,} of {metrics['total_params']:,} "
        f"({metrics['trainable_percent']:.4f} %)",
        "",
        "## Loss",
        f"- final train loss: {_fmt(metrics['train_loss'])}; eval loss: {_fmt(metrics['eval_loss'])}",
        *_eval_lines(metrics),
        "",
        *_loss_table(metrics["loss_history"]),
        "",
    ]
    if has_plot:
        lines += [f"![loss curve]({LOSS_PLOT})", ""]
    lines += [
        "## Time and memory",
        f"- {metrics['steps']} steps in {metrics['train_runtime_s']:.1f} s on {metrics['device']}; "
        f"{_fmt(metrics['train_tokens_per_s'], '.0f')} tokens/s ({metrics['train_tokens']:,} tokens, "
        f"{100 * data['padding_fraction']:.1f} % of the batch was padding)",
        f"- compute: {metrics['tflops']:.2f} TFLOP/s per device"
        + (
            f", MFU {100 * metrics['mfu']:.1f} % of the {metrics['device_peak_tflops']:g} TFLOP/s bf16 peak"
            if metrics.get("mfu") is not None
            else " (no peak figure for this device, so no MFU)"
        )
        + f"; {metrics['world_size']} process(es)",
        f"- peak memory: {metrics['peak_memory_mb']:.0f} MiB ({metrics['peak_memory_kind']})",
        "- settings: " + ", ".join(f"{k}={v}" for k, v in metrics.get("settings", {}).items()),
        f"- data: {data['truncated']} truncated, {data['dropped']} dropped, {data['skipped']} bad rows skipped",
        "",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in metrics["versions"].items()),
        "",
    ]
    if eval_result is not None:
        from peftcli.eval_report import summary_lines
        from peftcli.rundir import EVAL_PLOT

        lines += [
            "## Eval (`peftcli eval`)",
            "",
            *summary_lines(eval_result),
            "",
            f"![eval]({EVAL_PLOT})",
            "",
            "Details: `eval.json`, `eval.md`" + (", `predictions.jsonl`." if eval_result.get("generation") else "."),
            "",
        ]
    return "\n".join(lines)


def _eval_lines(metrics: dict) -> list[str]:
    history = metrics.get("eval_history") or []
    if not history:
        return []
    lines = ["- eval loss during training: " + ", ".join(f"{h['eval_loss']:.4f} @ {h['step']}" for h in history)]
    if metrics.get("adapter_is") == "best":
        stopped = "stopped early; " if metrics.get("stopped_early") else ""
        lines.append(
            f"- {stopped}adapter/ is the best one seen: step {metrics.get('best_step')}, eval loss "
            f"{_fmt(metrics.get('best_eval_loss'))}"
        )
    return lines


def _method_digest(peft) -> str:
    values = peft.model_dump(exclude={"method"}, exclude_defaults=False)
    return ", ".join(f"{k}={v}" for k, v in values.items() if v not in (None, [], {}))


def _fmt(value, spec: str = ".4f") -> str:
    return "n/a" if value is None else format(value, spec)


def write_run_report(outcome: TrainOutcome) -> dict:
    metrics = build_metrics(outcome)
    has_plot = plot_loss(metrics["loss_history"], outcome.run_dir / LOSS_PLOT, metrics.get("eval_history"))
    atomic_write_text(outcome.run_dir / METRICS, redact(json.dumps(metrics, indent=2)) + "\n")
    atomic_write_text(outcome.run_dir / REPORT, redact(render_report(metrics, outcome.recipe, has_plot)))
    return metrics
