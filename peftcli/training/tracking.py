"""What training reports while it runs: eval loss every `eval_steps`, the best adapter kept for
early stopping, and the loggers of `training.report_to` (TensorBoard into RUN/tensorboard)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from transformers import TrainerCallback

from peftcli import console
from peftcli.rundir import BEST_ADAPTER as BEST
from peftcli.rundir import BEST_INFO, TENSORBOARD, atomic_dir, atomic_write_json


class EvalTracker(TrainerCallback):
    """Tracks eval loss; with a patience, keeps the best adapter on disk and stops training after
    `patience` evaluations without an improvement of at least `threshold`.

    The best adapter is saved at the moment it is evaluated (atomically, beside the checkpoints), so
    `adapter/` can be the best one even when that step was never a checkpoint. After a resume the
    state is rebuilt from the eval losses in the restored log history."""

    def __init__(self, run_dir: Path, save, patience: int | None, threshold: float):
        self.run_dir = run_dir
        self.save = save  # callable(model, folder): writes the adapter (or model) + tokenizer
        self.patience = patience
        self.threshold = threshold
        self.best: float | None = None
        self.best_step: int | None = None
        self.bad_evals = 0
        self.stopped_early = False

    def _update(self, step: int, loss: float) -> bool:
        """Record an eval; True when it is the lowest loss so far. As in transformers' early
        stopping, the threshold only decides what resets the patience: the best adapter is the
        lowest loss, however small the gain."""
        significant = self.best is None or loss < self.best - self.threshold
        new_best = self.best is None or loss < self.best
        if new_best:
            self.best, self.best_step = loss, step
        self.bad_evals = 0 if significant else self.bad_evals + 1
        return new_best

    def on_train_begin(self, args, state, control, **kwargs):
        for entry in state.log_history:  # non-empty after a resume
            if "eval_loss" in entry:
                self._update(entry["step"], entry["eval_loss"])

    def on_evaluate(self, args, state, control, metrics=None, model=None, **kwargs):
        loss = (metrics or {}).get("eval_loss")
        if loss is None:
            return control
        new_best = self._update(state.global_step, loss)
        if self.patience is None:
            return control
        if new_best and model is not None and state.is_world_process_zero:
            with atomic_dir(self.run_dir / BEST) as tmp:
                self.save(model, tmp)
            atomic_write_json(self.run_dir / BEST_INFO, {"step": self.best_step, "eval_loss": self.best})
        if self.bad_evals >= self.patience and state.global_step < state.max_steps:
            self.stopped_early = True
            control.should_training_stop = True
            if state.is_world_process_zero:
                console.note(
                    f"early stopping at step {state.global_step}: {self.bad_evals} evals without an improvement "
                    f"of more than {self.threshold:g}; adapter/ will be the best, step {self.best_step} "
                    f"(eval loss {self.best:.4f})"
                )
        return control

    def summary(self) -> dict:
        return {"best_step": self.best_step, "best_eval_loss": self.best, "stopped_early": self.stopped_early}


def loggers(report_to: Sequence[str], run_dir: Path) -> list:
    """Trainer callbacks for `training.report_to`."""
    callbacks: list = []
    if "tensorboard" in report_to:
        from transformers.integrations import TensorBoardCallback

        tensorboard = TensorBoardCallback()
        # Set the folder rather than a writer: the callback closes its writer at the end of training
        # and opens a new one (in its default `runs/` folder) for the final eval's log otherwise.
        tensorboard.logging_dir = str(run_dir / TENSORBOARD)
        callbacks.append(tensorboard)
    if "wandb" in report_to:
        from transformers.integrations import WandbCallback

        callbacks.append(WandbCallback())
    if "mlflow" in report_to:
        from transformers.integrations import MLflowCallback

        callbacks.append(MLflowCallback())
    return callbacks
