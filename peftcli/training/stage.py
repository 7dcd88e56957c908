"""`peftcli train`: recipe -> tokenizer + data -> base model -> PEFT method -> trainer -> run dir.

Read top to bottom, this is the whole training stage. Everything that can fail because of the
user's input (recipe, data, model path, environment) is checked before the model is loaded and
before anything is written to `output.dir`.
"""

from __future__ import annotations

import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peftcli import console as cli_console
from peftcli import modeling, report
from peftcli.data import PreparedData, prepare_data
from peftcli.errors import Interrupted, UserError
from peftcli.methods import Method, MethodContext, method_of
from peftcli.recipe import Recipe, recipe_to_yaml
from peftcli.rundir import (
    RECIPE,
    artifact_dir,
    atomic_dir,
    atomic_write_text,
    check_output_dir,
    create_output_dir,
    replace_dir,
)
from peftcli.training.tracking import BEST, BEST_INFO, EvalTracker, check_loggers, loggers
from peftcli.training.trainer import TokenCounter, build_trainer


@dataclass
class TrainOutcome:
    """What the training stage hands to the report."""

    recipe: Recipe
    run_dir: Path
    data: PreparedData
    log_history: list[dict]
    trainable_params: int
    total_params: int
    runtime_s: float
    steps: int
    epochs: float
    tokens: TokenCounter
    eval_loss: float | None
    peak_memory_mb: float
    device: str
    dtype: str
    status: str = "completed"
    extra: dict = field(default_factory=dict)
    # The trained model, for callers that go on in the same process (tests compare it with reloads).
    model: Any = None


@dataclass
class Prepared:
    """Tokenizer, data and the model wrapped by its method: everything the trainer needs."""

    tokenizer: Any
    data: PreparedData
    model: Any
    method: Method
    ctx: MethodContext
    dtype: Any
    scratch: tempfile.TemporaryDirectory


def planned_steps(recipe: Recipe, train_rows: int) -> int:
    t = recipe.training
    if t.max_steps:
        return t.max_steps
    per_epoch = max(1, math.ceil(train_rows / (t.batch_size * t.gradient_accumulation)))
    return max(1, math.ceil(per_epoch * (t.epochs or 1.0)))


def preflight(recipe: Recipe, overwrite: bool) -> None:
    """Every check that needs no weights: the output folder, the model folder, the environment."""
    method = method_of(recipe.peft)
    check_output_dir(Path(recipe.output.dir), overwrite)
    modeling.check_model_source(recipe.model)
    modeling.check_remote_code(recipe.model)
    modeling.check_quantization(recipe.quantization)
    check_loggers(recipe.training.report_to)
    config = modeling.read_config(recipe.model)
    context = config.get("max_position_embeddings")
    if context and recipe.data.max_length > context:
        raise UserError(
            f"data.max_length {recipe.data.max_length} exceeds the model's context ({context} tokens)",
            hint=f"set data.max_length to {context} or less",
        )
    if method.model_types is not None and config and config.get("model_type") not in method.model_types:
        raise UserError(
            f"peft.method '{method.name}' does not support model type '{config.get('model_type')}'",
            hint=f"it supports: {', '.join(sorted(method.model_types))}",
        )


def prepare(recipe: Recipe) -> Prepared:
    """Load the tokenizer and data (fast, and where most user errors surface), then the model."""
    from transformers import set_seed

    modeling.quiet_libraries()
    method = method_of(recipe.peft)
    tokenizer = modeling.load_tokenizer(recipe.model)
    data = prepare_data(recipe.data, tokenizer, recipe.training.seed)
    set_seed(recipe.training.seed)
    dtype = modeling.compute_dtype(recipe.model.dtype)
    model = modeling.load_model(recipe.model, recipe.quantization, dtype)
    model = modeling.prepare_for_training(model, recipe.quantization, recipe.training.gradient_checkpointing)
    scratch = tempfile.TemporaryDirectory(prefix="peftcli-")
    ctx = MethodContext(
        model_config=model.config.to_dict(),
        tokenizer_path=recipe.model.tokenizer or recipe.model.name,
        total_steps=planned_steps(recipe, len(data.train)),
        scratch_dir=Path(scratch.name),
    )
    model = method.apply(recipe.peft, model, ctx)
    return Prepared(tokenizer, data, model, method, ctx, dtype, scratch)


def describe_packing(trainer, prepared: Prepared) -> str:
    impl = getattr(prepared.model.config, "_attn_implementation", None) or "default"
    rows = len(trainer.train_dataset)
    how = (
        "varlen flash-attention kernels"
        if impl.startswith("flash")
        else f"{impl} attention with a block-diagonal mask built from the per-example position ids "
        "(flash_attention_2 on a GPU is the faster varlen path)"
    )
    return f"packing: {len(prepared.data.train)} examples into {rows} padding-free rows; examples stay apart via {how}"


def is_out_of_memory(exc: BaseException) -> bool:
    import torch

    if isinstance(exc, (MemoryError, torch.OutOfMemoryError)):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def out_of_memory_error(recipe: Recipe, step: int) -> UserError:
    t, quant = recipe.training, recipe.quantization
    knobs = [
        f"lower training.batch_size and raise training.gradient_accumulation (same effective batch of "
        f"{t.batch_size * t.gradient_accumulation})",
        "set training.gradient_checkpointing: true" if not t.gradient_checkpointing else None,
        f"lower data.max_length ({recipe.data.max_length})",
        "quantize the base (quantization.bits: 4)" if quant is None else None,
    ]
    return UserError(
        f"out of memory at step {step} with training.batch_size {t.batch_size}, data.max_length "
        f"{recipe.data.max_length}, quantization {quant.describe() if quant else 'none'}",
        hint="; ".join(k for k in knobs if k) + ". Checkpoints saved so far are kept (resume with --resume).",
    )


def run_training(
    recipe: Recipe,
    *,
    overwrite: bool = False,
    resume: str | None = None,
    force: bool = False,
    console=None,
    source: str | None = None,
) -> TrainOutcome:
    """Train as the recipe says. `resume` is "latest" or a checkpoint path; `force` accepts a changed
    recipe; `source` is the recipe file as the user named it (for the resume hint)."""
    import torch

    from peftcli.training.checkpoints import finished_training, load_final_checkpoint, remove_staging
    from peftcli.training.progress import TrainingProgress
    from peftcli.training.resume import plan_resume
    from peftcli.training.signals import GracefulStop

    out = Path(recipe.output.dir)
    if resume:
        checkpoint = plan_resume(recipe, out, resume, force)
        preflight(recipe, overwrite=True)
    else:
        checkpoint = None
        preflight(recipe, overwrite)
    prepared = prepare(recipe)
    trainable, total = modeling.count_params(prepared.model)

    # The run directory is created only now: a recipe or data error leaves nothing behind.
    if checkpoint is None:
        create_output_dir(out, overwrite)
    remove_staging(out)
    if checkpoint is None or force:
        atomic_write_text(out / RECIPE, recipe_to_yaml(recipe))
    stop = GracefulStop()
    t = recipe.training
    tracker = EvalTracker(
        out,
        lambda model, folder: save_artifact(recipe, prepared, model, folder),
        t.early_stopping_patience,
        t.early_stopping_threshold,
    )
    callbacks = [TrainingProgress(console), stop, tracker, *loggers(t.report_to, out)]
    trainer = build_trainer(recipe, prepared, out, callbacks=callbacks)
    _report_data(prepared, trainer, recipe)

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    with stop:
        try:
            if checkpoint is not None and finished_training(checkpoint):
                cli_console.note(f"{checkpoint.name} is the last step: nothing left to train, writing the results")
                load_final_checkpoint(trainer, checkpoint)
            else:
                trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            outcome = _outcome(recipe, prepared, trainer, trainable, total, time.perf_counter() - started, None)
            outcome.status = "out_of_memory"
            report.write_run_report(outcome)
            raise out_of_memory_error(recipe, trainer.state.global_step + 1) from None
    runtime = time.perf_counter() - started

    if stop.requested:
        outcome = _outcome(recipe, prepared, trainer, trainable, total, runtime, None)
        outcome.status = "interrupted"
        report.write_run_report(outcome)
        prepared.scratch.cleanup()
        raise Interrupted(
            stop.signum,
            f"stopped after step {trainer.state.global_step}; checkpoint-{trainer.state.global_step} saved in {out}",
            hint=f"continue with: peftcli train {source or Path(recipe.output.dir) / RECIPE} --resume",
        )

    # The adapter (or full model) + tokenizer with its chat template, atomically. With early
    # stopping it is the best one evaluated (saved by the tracker when it was seen).
    final = artifact_dir(out, prepared.method)
    if t.early_stopping_patience is not None and (out / BEST).is_dir():
        replace_dir(out / BEST, final)
        (out / BEST_INFO).unlink(missing_ok=True)  # metrics.json carries best_step / best_eval_loss
        eval_loss = tracker.best
    else:
        with atomic_dir(final) as tmp:
            save_artifact(recipe, prepared, trainer.model, tmp)
        eval_loss = trainer.evaluate()["eval_loss"] if prepared.data.eval else None
    prepared.scratch.cleanup()
    outcome = _outcome(recipe, prepared, trainer, trainable, total, runtime, eval_loss)
    outcome.extra = {
        "eval_history": [
            {"step": e["step"], "eval_loss": e["eval_loss"]}
            for e in trainer.state.log_history
            if "eval_loss" in e and "step" in e
        ],
        **tracker.summary(),
        "adapter_is": "best" if t.early_stopping_patience is not None else "final",
    }
    report.write_run_report(outcome)
    return outcome


def save_artifact(recipe: Recipe, prepared: Prepared, model, folder: Path) -> None:
    """The method's artifact (adapter, or full model) and the tokenizer with its chat template."""
    prepared.method.save(recipe.peft, model, folder, prepared.ctx)
    prepared.tokenizer.save_pretrained(folder)


def _outcome(recipe, prepared: Prepared, trainer, trainable, total, runtime, eval_loss) -> TrainOutcome:
    return TrainOutcome(
        recipe=recipe,
        run_dir=Path(recipe.output.dir),
        data=prepared.data,
        log_history=list(trainer.state.log_history),
        trainable_params=trainable,
        total_params=total,
        runtime_s=runtime,
        steps=trainer.state.global_step,
        epochs=float(trainer.state.epoch or 0.0),
        tokens=trainer.token_counter,
        eval_loss=eval_loss,
        peak_memory_mb=report.peak_memory_mb(),
        device=modeling.device_name(),
        dtype=str(prepared.dtype).removeprefix("torch."),
        model=trainer.model,
    )


def _report_data(prepared: Prepared, trainer, recipe: Recipe) -> None:
    """Say what the data stage did that the user may not expect: skips, drops, packing."""
    for name, stats in (("train", prepared.data.train_stats), ("eval", prepared.data.eval_stats)):
        if stats.skipped:
            reasons = "; ".join(f"{reason} ({', '.join(rows)})" for reason, rows in stats.skipped_reasons.items())
            cli_console.warn(f"data.{name}: skipped {stats.skipped} bad rows (data.bad_rows: skip): {reasons}")
        if stats.dropped or stats.truncated:
            cli_console.note(
                f"data.{name}: {stats.truncated} examples truncated, {stats.dropped} dropped "
                f"(longer than data.max_length {recipe.data.max_length}, data.overlong: {recipe.data.overlong})"
            )
    if recipe.data.packing:
        cli_console.note(describe_packing(trainer, prepared))
