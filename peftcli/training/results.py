"""Phase "report", first half: what a training run produced, collected into a RunResult (the only
thing the report layer sees). Across processes the token counts are summed and the peak memory is
the largest; the model itself stays out of the result."""

from __future__ import annotations

from peftcli.data import PreparedData
from peftcli.model.device import device_name, local_device, matmul_params, peak_memory_mb, utilisation
from peftcli.model.load import count_params
from peftcli.recipe import Recipe
from peftcli.rundir.metrics import versions
from peftcli.rundir.result import DataReport, RunResult
from peftcli.training.setup import Setup
from peftcli.training.trainer import TokenCounter


def collect(
    recipe: Recipe,
    setup: Setup,
    trainer,
    runtime_s: float,
    eval_loss: float | None,
    status: str = "completed",
    aggregate: bool = True,
    **after_training,
) -> RunResult:
    """The RunResult of a run stopped with `status`. `aggregate`: combine the figures of every
    process (all must take part); `after_training`: eval history, best step, adapter_is."""
    tokens, peak = trainer.token_counter, peak_memory_mb()
    world_size = trainer.args.world_size
    if world_size > 1 and aggregate:
        tokens, peak = _aggregate(tokens, peak)
    trainable, total = count_params(setup.model)
    history = [
        {"step": e["step"], "loss": float(e["loss"])} for e in trainer.state.log_history if "loss" in e and "step" in e
    ]
    per_second = tokens.real / runtime_s if runtime_s > 0 else None
    per_device = per_second / max(world_size, 1) if per_second is not None else None
    steady = tokens.steady()
    device = device_name()
    quant = recipe.quantization
    return RunResult(
        recipe=recipe,
        run_dir=recipe.run_dir,
        status=status,
        method=recipe.peft.method,
        base_model=recipe.model.name,
        trainable_params=trainable,
        total_params=total,
        trainable_percent=round(100 * trainable / max(total, 1), 4),
        train_loss=history[-1]["loss"] if history else None,
        loss_history=history,
        eval_loss=eval_loss,
        steps=trainer.state.global_step,
        epochs=round(float(trainer.state.epoch or 0.0), 4),
        train_runtime_s=round(runtime_s, 3),
        train_tokens=tokens.real,
        train_tokens_per_s=None if per_second is None else round(per_second, 2),
        steady_tokens_per_s=round(steady.tokens_per_s, 2) if steady else None,
        tokens_per_s_per_device=None if per_device is None else round(per_device, 2),
        world_size=world_size,
        **utilisation(per_device or 0.0, matmul_params(trainer.model), setup.method.saves_full_model, device),
        peak_memory_mb=round(peak, 1),
        peak_memory_kind="cuda_allocated" if device != "cpu" else "cpu_rss",
        device=device,
        dtype=str(setup.dtype).removeprefix("torch."),
        quantization=None if quant is None else quant.describe(),
        data=data_report(setup.data, tokens),
        settings=setup.settings.as_dict(),
        versions=versions(),
        **after_training,
    )


def data_report(data: PreparedData, tokens: TokenCounter) -> DataReport:
    return DataReport(
        data.train_stats,
        data.eval_stats,
        round(tokens.padding_fraction, 4),
        data.template.name if data.template else None,
    )


def eval_history(log_history: list[dict]) -> list[dict]:
    return [{"step": e["step"], "eval_loss": e["eval_loss"]} for e in log_history if "eval_loss" in e and "step" in e]


def _aggregate(tokens: TokenCounter, peak_mb: float) -> tuple[TokenCounter, float]:
    """Sum token counts and take the largest peak memory over all processes."""
    import torch
    import torch.distributed as dist

    device = local_device()
    counts = torch.tensor([tokens.real, tokens.padded], dtype=torch.float64, device=device)
    peak = torch.tensor([peak_mb], dtype=torch.float64, device=device)
    dist.all_reduce(counts, op=dist.ReduceOp.SUM)
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    return TokenCounter(int(counts[0]), int(counts[1])), float(peak[0])
