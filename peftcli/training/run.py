"""`peftcli train`, read top to bottom: plan -> claim the run dir -> set up -> open the run files ->
fit -> keep the artifact -> report.

Everything that can fail because of the user's input (recipe, data, model path, environment) is
checked before the model is loaded and before anything is written to `output.dir`. Under a
multi-process launch every process runs this; rank 0 alone writes the run directory, holding its
lock from before anything is written until the command ends.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from peftcli import console, interruption
from peftcli.console import err as stderr_console
from peftcli.errors import Interrupted, UserError
from peftcli.model.checks import check_environment
from peftcli.model.device import is_main_process, is_out_of_memory
from peftcli.recipe import Recipe, recipe_to_yaml
from peftcli.rundir import (
    RECIPE,
    artifact_dir,
    atomic_write_text,
    check_output_dir,
    claim_run_dir,
    start_run_dir,
    write_run_marker,
)
from peftcli.rundir.guard import own_run_folder, protected_paths
from peftcli.rundir.report import write_run
from peftcli.rundir.result import RunResult
from peftcli.training.artifact import keep_artifact, save_artifact
from peftcli.training.data_notes import report_data
from peftcli.training.failures import does_not_fit, interrupted_note, out_of_memory_error
from peftcli.training.results import collect, eval_history
from peftcli.training.setup import LoadingStatus, Setup, build_setup
from peftcli.training.trainer import build_trainer

# Modules that import transformers (tracking, progress) are imported where they are used:
# `cli/train.py` imports this module, and the libraries load under a status line (`build_setup`).


@dataclass
class TrainedRun:
    """What `run_training` returns: the run's result, and the trained model for callers that go on
    in the same process (tests compare it with reloads). Only `result` reaches the report."""

    result: RunResult
    model: Any

    @property
    def run_dir(self) -> Path:
        return self.result.run_dir


def preflight(
    recipe: Recipe, overwrite: bool, check_output: bool = True, protected: Sequence[tuple[str, Path]] = ()
) -> None:
    """Every check that needs no weights: the output folder, the model folder, the environment."""
    if check_output:  # other processes of a multi-process run leave the folder to rank 0
        check_output_dir(recipe.run_dir, overwrite, protected)
    check_environment(recipe)


def run_training(
    recipe: Recipe,
    *,
    overwrite: bool = False,
    resume: str | None = None,
    force: bool = False,
    console=None,
    source: str | None = None,
    recipe_file: Path | None = None,
    callbacks: Sequence = (),
) -> TrainedRun:
    """Train as the recipe says. `resume` is "latest" or a checkpoint path; `force` accepts a changed
    recipe; `source` is the recipe file as the user named it (for the resume hint), `recipe_file` the
    file itself (output.dir may not hold it); `callbacks` join the trainer's own (tune's pruning)."""
    from peftcli.training.resume import plan_resume

    out, main = recipe.run_dir, is_main_process()
    # Phase 1, plan: read-only checks; a mistake is reported before anything is created or loaded.
    # The run's own saved recipe (`peftcli train RUN/recipe.yaml --resume`) lies in the run, of course.
    own_recipe = recipe_file is not None and own_run_folder(recipe_file) == out.resolve()
    protected = protected_paths(recipe, None if own_recipe else recipe_file)
    if resume:
        plan_resume(recipe, out, resume, force, quiet=True)
    preflight(recipe, overwrite=overwrite, check_output=main and not resume, protected=protected)
    command = f"peftcli train {source or out / RECIPE}"
    with interruption.saving(lambda: interrupted_note(out, command)), ExitStack() as claim:
        # Phase 2, claim: a new run that fails before it saved anything (a late user error, a crash,
        # Ctrl-C) leaves no folder behind; the lock keeps a second `train`/`eval`/`merge` out.
        if main:
            claim.enter_context(claim_run_dir(out, fresh=not resume))
        # Under the lock, again: another process may have changed the folder since the checks above.
        checkpoint = plan_resume(recipe, out, resume, force) if resume else None
        if main and checkpoint is None:
            check_output_dir(out, overwrite, protected)

        # Phase 3, set up: tokenizer, data, model and method in memory; nothing written yet.
        status = claim.enter_context(LoadingStatus((console or stderr_console) if main else None))
        setup = _set_up(recipe, status)
        try:
            # Phase 4, open the run files: only now, so a recipe or data error changes nothing on disk.
            if main:
                _open_run_files(recipe, out, checkpoint, overwrite)
            # Phase 5, fit: the trainer runs until it completes, is interrupted or runs out of memory.
            session = _prepare_trainer(recipe, setup, out, checkpoint, console, status, callbacks)
            fitted = _fit(session, checkpoint, recipe)
            # Phase 6, keep the artifact: only a completed run has one.
            kept = keep_artifact(recipe, setup, session.trainer, session.tracker.best) if fitted.completed else None
            # Phase 7, report: the run's files, whatever the outcome; then how it ended.
            result = _result(recipe, setup, session, fitted, kept)
            if main:
                write_run(result)
            return _finish(result, session, fitted, setup, command)
        finally:
            setup.scratch.cleanup()


def _set_up(recipe: Recipe, status: LoadingStatus) -> Setup:
    try:
        return build_setup(recipe, status)
    except Exception as exc:
        if is_out_of_memory(exc):  # the base itself does not fit: the most common OOM of all
            raise out_of_memory_error(recipe, None, 0) from None
        raise


def _open_run_files(recipe: Recipe, out: Path, checkpoint: Path | None, overwrite: bool) -> None:
    from peftcli.training.checkpoints import remove_staging

    if checkpoint is None:
        start_run_dir(out, overwrite)
    else:
        write_run_marker(out)
    remove_staging(out)
    # After a resume too: the saved recipe must say what ran (cadence keys may have changed). Its
    # output.dir is `.`, the folder it lies in: a copied or moved run still names itself, and the
    # file copied out alone names no run (training it there is refused, never aimed at this run).
    saved = recipe.model_copy(update={"output": recipe.output.model_copy(update={"dir": "."})})
    atomic_write_text(out / RECIPE, recipe_to_yaml(saved))


class Outcome(Enum):
    """How the training loop ended: the run's `status` in metrics.json."""

    COMPLETED = "completed"
    INTERRUPTED = "interrupted"
    OUT_OF_MEMORY = "out_of_memory"


@dataclass
class Fitted:
    outcome: Outcome
    runtime_s: float

    @property
    def completed(self) -> bool:
        return self.outcome is Outcome.COMPLETED


@dataclass
class TrainerSession:
    """The trainer and the callbacks the later phases read: the stop request, the best adapter so
    far, the progress display, and those told once a last-step checkpoint has loaded."""

    trainer: Any
    stop: Any
    tracker: Any
    progress: Any
    after_load: list


def _prepare_trainer(
    recipe: Recipe,
    setup: Setup,
    out: Path,
    checkpoint: Path | None,
    progress_console,
    status: LoadingStatus,
    callbacks: Sequence = (),
) -> TrainerSession:
    from peftcli.training.progress import TrainingProgress
    from peftcli.training.resume import discard_after_load
    from peftcli.training.signals import GracefulStop
    from peftcli.training.tracking import EvalTracker, loggers

    main, t = is_main_process(), recipe.training
    stop = GracefulStop()
    tracker = EvalTracker(
        out,
        lambda model, folder: save_artifact(recipe, setup, model, folder),
        t.early_stopping_patience,
        t.early_stopping_threshold,
    )
    progress = TrainingProgress(progress_console)
    # Resuming from an older checkpoint drops the later ones, once it has loaded (never before).
    after_load = [discard_after_load(out, checkpoint)] if main and checkpoint is not None else []
    status.phase("preparing the trainer")
    trainer = build_trainer(
        recipe, setup, out, callbacks=[progress, stop, tracker, *after_load, *loggers(t.report_to, out), *callbacks]
    )
    progress.token_counter = trainer.token_counter
    status.stop()  # the progress bar takes over
    if main:
        report_data(setup, trainer, recipe)
    return TrainerSession(trainer, stop, tracker, progress, after_load)


def _fit(session: TrainerSession, checkpoint: Path | None, recipe: Recipe) -> Fitted:
    """Run the training loop (or finish a last-step checkpoint): how it ended and its seconds. Out of
    memory is an outcome (reported, then raised as a user error); a checkpoint that does not fit this
    model is a user error at once, before anything is reported."""
    import torch

    from peftcli.training.checkpoints import finished_training, load_final_checkpoint

    trainer = session.trainer
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    with session.stop:
        try:
            if checkpoint is not None and finished_training(checkpoint, recipe.training.max_steps):
                if is_main_process():
                    console.note(f"{checkpoint.name} is the last step: nothing left to train, writing the results")
                load_final_checkpoint(trainer, checkpoint)
                # best so far, from the log; drop later checkpoints
                for callback in (session.tracker, *session.after_load):
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
            if not is_out_of_memory(exc):
                raise
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            return Fitted(Outcome.OUT_OF_MEMORY, time.perf_counter() - started)
    runtime = time.perf_counter() - started
    if session.stop.requested and trainer.state.global_step < trainer.state.max_steps:
        return Fitted(Outcome.INTERRUPTED, runtime)
    return Fitted(Outcome.COMPLETED, runtime)


def _result(recipe: Recipe, setup: Setup, session: TrainerSession, fitted: Fitted, kept) -> RunResult:
    """The run's result, whatever the outcome. After out of memory the figures are this process's
    own: another process may not have failed and would not answer."""
    trainer, status = session.trainer, fitted.outcome.value
    if fitted.outcome is Outcome.OUT_OF_MEMORY:
        return collect(recipe, setup, trainer, fitted.runtime_s, None, status=status, aggregate=False)
    if kept is None:
        return collect(recipe, setup, trainer, fitted.runtime_s, None, status=status)
    return collect(
        recipe,
        setup,
        trainer,
        fitted.runtime_s,
        kept.eval_loss,
        eval_history=eval_history(trainer.state.log_history),
        **session.tracker.summary(),
        adapter_is=kept.adapter_is,
    )


def _finish(result: RunResult, session: TrainerSession, fitted: Fitted, setup: Setup, command: str) -> TrainedRun:
    """After the report: a completed run is summed up; any other outcome is raised, as an interruption
    (its exit code) or an out-of-memory user error."""
    from peftcli.training.progress import print_summary

    trainer, out, step = session.trainer, result.run_dir, session.trainer.state.global_step
    if fitted.outcome is Outcome.OUT_OF_MEMORY:
        raise out_of_memory_error(result.recipe, setup.settings, step + 1)
    if fitted.outcome is Outcome.INTERRUPTED:
        raise Interrupted(
            session.stop.signum or 0,
            f"stopped after step {step}; checkpoint-{step} saved in {out}",
            hint=f"continue with: {command} --resume",
        )
    if is_main_process():
        print_summary(result, artifact_dir(out, setup.method), session.progress.console)
    return TrainedRun(result, trainer.model)
