"""`peftcli train`: recipe -> tokenizer + data -> base model -> PEFT method -> trainer -> run dir.

Read top to bottom, this is the whole training stage. Everything that can fail because of the
user's input (recipe, data, model path, environment) is checked before the model is loaded and
before anything is written to `output.dir`.
"""

from __future__ import annotations

import math
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peftcli import console as cli_console
from peftcli import hardware, interruption, modeling, report
from peftcli.data import PreparedData, prepare_data
from peftcli.errors import CheckFailed, Interrupted, UserError
from peftcli.launch import is_main_process
from peftcli.methods import Method, MethodContext, method_of
from peftcli.preflight import check_environment, protected_paths
from peftcli.recipe import Recipe, recipe_to_yaml
from peftcli.rundir import (
    RECIPE,
    TMP_PREFIX,
    artifact_dir,
    atomic_dir,
    atomic_write_text,
    check_output_dir,
    claim_run_dir,
    is_run_dir,
    replace_dir,
    start_run_dir,
    write_run_marker,
)
from peftcli.training.data_notes import report_data
from peftcli.training.failures import does_not_fit, interrupted_note, out_of_memory_error
from peftcli.training.settings import Settings
from peftcli.training.settings import resolve as resolve_settings
from peftcli.training.tracking import BEST, BEST_INFO, EvalTracker, loggers
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
    settings: dict = field(default_factory=dict)  # what the `auto` performance settings became
    matmul_params: int = 0  # for FLOPs per token (hardware.py)
    full_finetune: bool = False
    world_size: int = 1
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
    settings: Settings


def planned_steps(recipe: Recipe, train_rows: int) -> int:
    t = recipe.training
    if t.max_steps:
        return t.max_steps
    per_epoch = max(1, math.ceil(train_rows / (t.batch_size * t.gradient_accumulation)))
    return max(1, math.ceil(per_epoch * (t.epochs or 1.0)))


def preflight(
    recipe: Recipe, overwrite: bool, check_output: bool = True, protected: list[tuple[str, Path]] = ()
) -> None:
    """Every check that needs no weights: the output folder, the model folder, the environment."""
    if check_output:  # other processes of a multi-process run leave the folder to rank 0
        check_output_dir(Path(recipe.output.dir), overwrite, protected)
    check_environment(recipe)


def prepare(recipe: Recipe) -> Prepared:
    """Load the tokenizer and data (fast, and where most user errors surface), then the model."""
    from transformers import set_seed

    modeling.quiet_libraries()
    method = method_of(recipe.peft)
    tokenizer = modeling.load_tokenizer(recipe.model)
    data = prepare_data(recipe.data, tokenizer, recipe.training.seed)
    settings = resolve_settings(recipe)
    set_seed(recipe.training.seed)
    dtype = modeling.compute_dtype(recipe.model.dtype)
    model = modeling.load_model(recipe.model, recipe.quantization, dtype, attn=settings.attn_implementation)
    model = modeling.prepare_for_training(model, recipe.quantization, settings.gradient_checkpointing)
    scratch = tempfile.TemporaryDirectory(prefix="peftcli-")
    ctx = MethodContext(
        tokenizer_path=recipe.model.tokenizer or recipe.model.name,
        total_steps=planned_steps(recipe, len(data.train)),
        scratch_dir=Path(scratch.name),
    )
    model = method.apply(recipe.peft, model, ctx)
    return Prepared(tokenizer, data, model, method, ctx, dtype, scratch, settings)


def run_training(
    recipe: Recipe,
    *,
    overwrite: bool = False,
    resume: str | None = None,
    force: bool = False,
    console=None,
    source: str | None = None,
    recipe_file: Path | None = None,
) -> TrainOutcome:
    """Train as the recipe says. `resume` is "latest" or a checkpoint path; `force` accepts a changed
    recipe; `source` is the recipe file as the user named it (for the resume hint), `recipe_file` the
    file itself (output.dir may not hold it).

    Under a multi-process launch every process runs this; rank 0 alone writes the run directory,
    holding its lock from before anything is written until the command ends."""
    from peftcli.training.resume import plan_resume

    out, main = Path(recipe.output.dir), is_main_process()
    # The run's own saved recipe (`peftcli train RUN/recipe.yaml --resume`) lies in the run, of course.
    own_recipe = recipe_file is not None and recipe_file.resolve() == (out / RECIPE).resolve() and is_run_dir(out)
    protected = protected_paths(recipe, None if own_recipe else recipe_file)
    # Read-only checks first: a mistake is reported before anything is created, locked or loaded.
    if resume:
        plan_resume(recipe, out, resume, force, quiet=True)
    preflight(recipe, overwrite=overwrite, check_output=main and not resume, protected=protected)
    command = f"peftcli train {source or out / RECIPE}"
    with interruption.saving(lambda: interrupted_note(out, command)), ExitStack() as claim:
        if main:
            # A new run that fails before it saved anything (a late user error, a crash, Ctrl-C)
            # leaves no folder behind; the lock keeps a second `train`/`eval`/`merge` out meanwhile.
            claim.enter_context(claim_run_dir(out, fresh=not resume))
        # Under the lock, again: another process may have changed the folder since the checks above.
        checkpoint = plan_resume(recipe, out, resume, force) if resume else None
        if main and checkpoint is None:
            check_output_dir(out, overwrite, protected)
        return _train_in(recipe, out, main, checkpoint, overwrite, console, command)


def _train_in(recipe, out: Path, main: bool, checkpoint: Path | None, overwrite: bool, console, command: str):
    """Load, train and report into `out` (claimed by run_training)."""
    from peftcli.training.checkpoints import remove_staging
    from peftcli.training.progress import TrainingProgress
    from peftcli.training.resume import discard_after_load
    from peftcli.training.signals import GracefulStop

    try:
        prepared = prepare(recipe)
    except Exception as exc:
        if modeling.is_out_of_memory(exc):  # the base itself does not fit: the most common OOM of all
            raise out_of_memory_error(recipe, None, 0) from None
        raise

    # The run's own files are written only now: a recipe or data error changes nothing on disk.
    if main:
        if checkpoint is None:
            start_run_dir(out, overwrite)
        else:
            write_run_marker(out)
        remove_staging(out)
        # After a resume too: the saved recipe must say what ran (cadence keys may have changed).
        atomic_write_text(out / RECIPE, recipe_to_yaml(recipe))
    t = recipe.training
    stop = GracefulStop()
    tracker = EvalTracker(
        out,
        lambda model, folder: save_artifact(recipe, prepared, model, folder),
        t.early_stopping_patience,
        t.early_stopping_threshold,
    )
    progress = TrainingProgress(console)
    # Resuming from an older checkpoint drops the later ones, once it has loaded (never before).
    extra = [discard_after_load(out, checkpoint)] if main and checkpoint is not None else []
    trainer = build_trainer(
        recipe, prepared, out, callbacks=[progress, stop, tracker, *extra, *loggers(t.report_to, out)]
    )
    progress.token_counter = trainer.token_counter
    if main:
        report_data(prepared, trainer, recipe)

    runtime = _train(trainer, stop, tracker, checkpoint, recipe, prepared, extra)
    if stop.requested and trainer.state.global_step < trainer.state.max_steps:
        _finish(recipe, prepared, trainer, runtime, None, status="interrupted")
        step = trainer.state.global_step
        raise Interrupted(
            stop.signum,
            f"stopped after step {step}; checkpoint-{step} saved in {out}",
            hint=f"continue with: {command} --resume",
        )

    # The adapter (or full model) + tokenizer with its chat template, atomically. With early
    # stopping it is the best one evaluated (saved by the tracker when it was seen).
    final = artifact_dir(out, prepared.method)
    use_best = _use_best(out, t.early_stopping_patience is not None, main, trainer.args.world_size)
    if use_best:
        if main:
            replace_dir(out / BEST, final)
            (out / BEST_INFO).unlink(missing_ok=True)  # metrics.json carries best_step / best_eval_loss
        eval_loss = tracker.best
    else:
        eval_loss = _final_eval(trainer, prepared)
        _save_final(recipe, prepared, trainer, final, main)
    extra_metrics = {
        "eval_history": [
            {"step": e["step"], "eval_loss": e["eval_loss"]}
            for e in trainer.state.log_history
            if "eval_loss" in e and "step" in e
        ],
        **tracker.summary(),
        "adapter_is": "best" if use_best else "final",
    }
    return _finish(recipe, prepared, trainer, runtime, eval_loss, extra=extra_metrics)


def _use_best(out: Path, early_stopping: bool, main: bool, world_size: int) -> bool:
    """Whether adapter/ is the best adapter kept during training. Rank 0 decides (it wrote that
    folder, and alone moves it); the others follow, since the final eval and save are collective."""
    use_best = early_stopping and main and (out / BEST).is_dir()
    if early_stopping and main and not use_best:
        cli_console.warn(
            f"no {BEST}/ was kept (no eval ran, or the run started without early stopping): the final adapter is saved"
        )
    if world_size > 1:
        from peftcli.training.signals import any_process

        use_best = any_process(use_best)
    return use_best


def _final_eval(trainer, prepared: Prepared) -> float | None:
    """Eval loss of the final model (every process takes part). Training is done by now, so an OOM
    here costs only this figure."""
    if not prepared.data.eval:
        return None
    try:
        return trainer.evaluate()["eval_loss"]
    except Exception as exc:
        if not modeling.is_out_of_memory(exc):
            raise
        if is_main_process():
            cli_console.warn(
                "the final eval ran out of memory; eval_loss is not reported (peftcli eval "
                "--batch-size 1 computes it later)"
            )
        return None


def _train(trainer, stop, tracker, checkpoint: Path | None, recipe: Recipe, prepared: Prepared, loaded=()) -> float:
    """Run the training loop (or finish a last-step checkpoint); an OOM becomes a user error, and so
    does a checkpoint that does not fit this model. `loaded`: callbacks told once the checkpoint loaded."""
    import torch

    from peftcli.training.checkpoints import finished_training, load_final_checkpoint

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    with stop:
        try:
            if checkpoint is not None and finished_training(checkpoint, recipe.training.max_steps):
                if is_main_process():
                    cli_console.note(f"{checkpoint.name} is the last step: nothing left to train, writing the results")
                load_final_checkpoint(trainer, checkpoint)
                for callback in (tracker, *loaded):  # best so far, from the log; drop later checkpoints
                    callback.on_train_begin(trainer.args, trainer.state, trainer.control)
            else:
                trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
        except Exception as exc:
            if checkpoint is not None and does_not_fit(exc):
                detail = next((ln.strip() for ln in str(exc).splitlines() if "size mismatch" in ln), str(exc))
                raise UserError(
                    f"--resume: {checkpoint} does not fit this model ({detail[:200]})",
                    hint="it was trained with another base, method or rank; nothing in the run was changed",
                ) from None
            if not modeling.is_out_of_memory(exc):
                raise
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            # No cross-process aggregation here: another process may not have failed and would not answer.
            _finish(
                recipe, prepared, trainer, time.perf_counter() - started, None, status="out_of_memory", aggregate=False
            )
            raise out_of_memory_error(recipe, prepared.settings, trainer.state.global_step + 1) from None
    return time.perf_counter() - started


def _finish(
    recipe, prepared: Prepared, trainer, runtime, eval_loss, status="completed", extra=None, aggregate=True
) -> TrainOutcome:
    """Aggregate across processes, write metrics.json and report.md (rank 0), clean up."""
    tokens = trainer.token_counter
    peak = report.peak_memory_mb()
    trainable, total = modeling.count_params(prepared.model)
    if trainer.args.world_size > 1 and aggregate:
        tokens, peak = _aggregate(tokens, peak)
    outcome = TrainOutcome(
        recipe=recipe,
        run_dir=Path(recipe.output.dir),
        data=prepared.data,
        log_history=list(trainer.state.log_history),
        trainable_params=trainable,
        total_params=total,
        runtime_s=runtime,
        steps=trainer.state.global_step,
        epochs=float(trainer.state.epoch or 0.0),
        tokens=tokens,
        eval_loss=eval_loss,
        peak_memory_mb=peak,
        device=modeling.device_name(),
        dtype=str(prepared.dtype).removeprefix("torch."),
        status=status,
        extra=extra or {},
        model=trainer.model,
        settings=prepared.settings.as_dict(),
        matmul_params=hardware.matmul_params(trainer.model),
        full_finetune=prepared.method.saves_full_model,
        world_size=trainer.args.world_size,
    )
    if is_main_process():
        report.write_run_report(outcome)
    prepared.scratch.cleanup()
    return outcome


def _aggregate(tokens: TokenCounter, peak_mb: float) -> tuple[TokenCounter, float]:
    """Sum token counts and take the largest peak memory over all processes."""
    import torch
    import torch.distributed as dist

    device = modeling.local_device()
    counts = torch.tensor([tokens.real, tokens.padded], dtype=torch.float64, device=device)
    peak = torch.tensor([peak_mb], dtype=torch.float64, device=device)
    dist.all_reduce(counts, op=dist.ReduceOp.SUM)
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    return TokenCounter(int(counts[0]), int(counts[1])), float(peak[0])


def save_artifact(recipe: Recipe, prepared: Prepared, model, folder: Path) -> None:
    """The method's artifact (adapter, or full model) and the tokenizer with its chat template."""
    prepared.method.save(recipe.peft, model, folder, prepared.ctx)
    prepared.tokenizer.save_pretrained(folder)


def _save_final(recipe: Recipe, prepared: Prepared, trainer, final: Path, main: bool) -> None:
    if modeling.sharded_launch():
        # FSDP/ZeRO-3 shard the weights: every process takes part while the trainer gathers them.
        # A sharded state dict (the shipped FSDP configs) makes save_model write nothing: gather.
        plugin = getattr(trainer.accelerator.state, "fsdp_plugin", None)
        if plugin is not None:
            # set_state_dict_type keeps existing (sharded) configs; clear them so it builds full ones
            plugin.state_dict_config = plugin.optim_state_dict_config = None
            plugin.set_state_dict_type("FULL_STATE_DICT")
        staging = final.with_name(f"{TMP_PREFIX}{final.name}-gathered")
        trainer.save_model(str(staging))
        if main:
            if not any(staging.glob("*.safetensors")):
                raise CheckFailed(
                    f"the gathered {final.name} has no weights; the checkpoints are intact",
                    hint="convert the last checkpoint with accelerate's merge-weights tool",
                )
            prepared.tokenizer.save_pretrained(staging)
            replace_dir(staging, final)
    elif main:
        with atomic_dir(final) as tmp:
            save_artifact(recipe, prepared, trainer.model, tmp)
