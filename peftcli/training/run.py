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
    is_run_dir,
    start_run_dir,
    write_run_marker,
)
from peftcli.rundir.guard import protected_paths
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
    own_recipe = recipe_file is not None and recipe_file.resolve() == (out / RECIPE).resolve() and is_run_dir(out)
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
            # Phase 5, fit.
            return _fit_keep_report(recipe, setup, out, checkpoint, console, command, status, callbacks)
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
    # After a resume too: the saved recipe must say what ran (cadence keys may have changed).
    atomic_write_text(out / RECIPE, recipe_to_yaml(recipe))


def _fit_keep_report(
    recipe: Recipe,
    setup: Setup,
    out: Path,
    checkpoint: Path | None,
    progress_console,
    command: str,
    status: LoadingStatus,
    callbacks: Sequence = (),
) -> TrainedRun:
    from peftcli.training.progress import TrainingProgress, print_summary
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

    runtime = _fit(trainer, stop, tracker, checkpoint, recipe, setup, after_load)
    if stop.requested and trainer.state.global_step < trainer.state.max_steps:
        _report(collect(recipe, setup, trainer, runtime, None, status="interrupted"))
        step = trainer.state.global_step
        raise Interrupted(
            stop.signum or 0,
            f"stopped after step {step}; checkpoint-{step} saved in {out}",
            hint=f"continue with: {command} --resume",
        )

    # Phase 6, keep the artifact; phase 7, report.
    kept = keep_artifact(recipe, setup, trainer, tracker.best)
    result = collect(
        recipe,
        setup,
        trainer,
        runtime,
        kept.eval_loss,
        eval_history=eval_history(trainer.state.log_history),
        **tracker.summary(),
        adapter_is=kept.adapter_is,
    )
    _report(result)
    if main:
        print_summary(result, artifact_dir(out, setup.method), progress.console)
    return TrainedRun(result, trainer.model)


def _report(result: RunResult) -> None:
    if is_main_process():
        write_run(result)


def _fit(trainer, stop, tracker, checkpoint: Path | None, recipe: Recipe, setup: Setup, loaded=()) -> float:
    """Run the training loop (or finish a last-step checkpoint) and return its seconds. An OOM
    becomes a user error, and so does a checkpoint that does not fit this model. `loaded`:
    callbacks told once the checkpoint loaded."""
    import torch

    from peftcli.training.checkpoints import finished_training, load_final_checkpoint

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    with stop:
        try:
            if checkpoint is not None and finished_training(checkpoint, recipe.training.max_steps):
                if is_main_process():
                    console.note(f"{checkpoint.name} is the last step: nothing left to train, writing the results")
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
            if not is_out_of_memory(exc):
                raise
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            # No cross-process aggregation here: another process may not have failed and would not answer.
            runtime = time.perf_counter() - started
            _report(collect(recipe, setup, trainer, runtime, None, status="out_of_memory", aggregate=False))
            raise out_of_memory_error(recipe, setup.settings, trainer.state.global_step + 1) from None
    return time.perf_counter() - started
