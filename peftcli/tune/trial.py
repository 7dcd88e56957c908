"""One trial: a normal `peftcli train` run of the trial's recipe, in this process, whose losses are
reported to the study while it trains, so that a hopeless trial stops at its next evaluation.

In-process, so a trial costs its training and not a fresh interpreter (importing torch and
transformers takes longer than a small trial). A pruned trial stops as early stopping does: it
keeps its adapter and writes its report, so every trial's folder is an ordinary run directory.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from peftcli import console
from peftcli.errors import EXIT_BUG, Interrupted, ReportedError
from peftcli.recipe import Recipe

METRICS = {
    "eval_loss": "the eval loss of the kept adapter (reported at every eval while training)",
    "train_loss": "the last logged train loss (reported at every log while training)",
}


@dataclass
class Outcome:
    """How a trial ended: complete (with its value), pruned (at a step) or failed (with the error)."""

    state: str
    value: float | None = None
    steps: int | None = None
    pruned_at: int | None = None
    error: str | None = None
    exit_code: int | None = None
    wall_s: float = 0.0
    reported: list[tuple[int, float]] = field(default_factory=list)


def report_to(trial, metric: str):
    """A trainer callback that reports `metric` to the Optuna trial each time training computes it,
    and stops training when the pruner says the trial cannot catch up with the others."""
    from transformers import TrainerCallback

    class ReportToStudy(TrainerCallback):
        def __init__(self):
            self.reported: list[tuple[int, float]] = []
            self.pruned_at: int | None = None

        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            if metric == "eval_loss" and metrics and metrics.get("eval_loss") is not None:
                self._report(float(metrics["eval_loss"]), state, control)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if metric == "train_loss" and logs and logs.get("loss") is not None:
                self._report(float(logs["loss"]), state, control)

        def _report(self, value: float, state, control) -> None:
            step = state.global_step
            if self.reported and self.reported[-1][0] == step:
                return  # one value per step (Optuna keeps the first)
            trial.report(value, step)
            self.reported.append((step, value))
            if self.pruned_at is None and step < state.max_steps and trial.should_prune():
                self.pruned_at = step
                control.should_training_stop = True

    return ReportToStudy()


def run_trial(recipe: Recipe, recipe_file: Path, trial, metric: str) -> Outcome:
    """Train `recipe` (written to `recipe_file`, its run in output.dir) as trial `trial`. A user
    error or a bug inside the run fails the trial, not the study; an interruption propagates."""
    from peftcli.training.run import run_training

    reporter = report_to(trial, metric)
    started = time.perf_counter()
    try:
        # only the result is kept: the model goes, the next trial needs the memory
        result = run_training(
            recipe,
            overwrite=True,
            console=console.err,
            source=str(recipe_file),
            recipe_file=recipe_file,
            callbacks=[reporter],
        ).result
    except Interrupted:
        raise
    except ReportedError as exc:
        return Outcome("failed", error=exc.message, exit_code=exc.exit_code, wall_s=time.perf_counter() - started)
    except Exception as exc:  # noqa: BLE001 - one trial's bug must not lose the study
        error = f"unexpected {exc.__class__.__name__}: {exc}"
        return Outcome("failed", error=error, exit_code=EXIT_BUG, wall_s=time.perf_counter() - started)
    finally:
        _release_memory()
    wall = time.perf_counter() - started
    if reporter.pruned_at is not None:
        return Outcome(
            "pruned", steps=result.steps, pruned_at=reporter.pruned_at, wall_s=wall, reported=reporter.reported
        )
    value = result.eval_loss if metric == "eval_loss" else result.train_loss
    if value is None:
        return Outcome("failed", steps=result.steps, error=f"the run has no {metric}", exit_code=EXIT_BUG, wall_s=wall)
    return Outcome("complete", float(value), result.steps, wall_s=wall, reported=reporter.reported)


def _release_memory() -> None:
    import gc
    import sys

    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()
