"""What training shows on stderr: a progress line (step, loss, tokens/s, time left), a line per eval
loss, and a summary block once the run is written.

On a terminal the progress is a live rich bar; in a log (CI, `nohup`) it prints a plain line every
~5 % so the log stays readable. In a multi-process run only rank 0 reports.
"""

from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from transformers import TrainerCallback

from peftcli.rundir import REPORT
from peftcli.rundir.result import RunResult


class TrainingProgress(TrainerCallback):
    def __init__(self, console: Console | None = None, label: str = "training"):
        self.console = console or Console(stderr=True)
        self.label = label
        self.progress: Progress | None = None
        self.task: TaskID | None = None
        self.loss: float | None = None
        self.started = 0.0
        self.first_step = 0
        self.every = 1
        self.token_counter = None  # the trainer's TokenCounter, set once the trainer exists
        self.best_eval: float | None = None
        self.training = False  # an eval after training is the final one

    def on_train_begin(self, args, state, control, **kwargs):
        self.training = True
        losses = [e["eval_loss"] for e in state.log_history if "eval_loss" in e]  # a resumed run's evals
        self.best_eval = min(losses, default=None)
        self.started = time.perf_counter()
        self.first_step = state.global_step  # a resumed run counts its own tokens/s
        self.every = max(1, state.max_steps // 20) if state.is_world_process_zero else 0
        if self.every and self.console.is_terminal:
            self.progress = Progress(
                TextColumn(f"[bold]{self.label}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[status]}"),
                TimeElapsedColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),
                console=self.console,
            )
            self.progress.start()
            self.task = self.progress.add_task(
                self.label, total=state.max_steps, completed=state.global_step, status=""
            )

    def _status(self) -> str:
        parts = [f"loss {self.loss:.4f}"] if self.loss is not None else []
        elapsed = time.perf_counter() - self.started
        tokens = self.token_counter.real if self.token_counter is not None else 0
        if tokens and elapsed > 0:
            parts.append(f"{tokens / elapsed:,.0f} tok/s")
        return "  ".join(parts)

    def _line(self, state) -> None:
        self._print(f"{self.label}: step {state.global_step}/{state.max_steps}  {self._status()}")

    def _print(self, text: str) -> None:
        # Through the console: above the live bar on a terminal, a plain line in a log.
        self.console.print(text, markup=False, highlight=False, emoji=False, soft_wrap=True)

    def _due(self, state) -> bool:
        return bool(self.every) and (state.global_step % self.every == 0 or state.global_step == state.max_steps)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if "loss" in (logs or {}):
            self.loss = float(logs["loss"])
            # The loss of a step is logged after its on_step_end: the bar and the line show the step
            # here, with its own loss, not the previous one.
            self._show(state)

    def on_step_end(self, args, state, control, **kwargs):
        # DefaultFlowCallback (first in the list) has decided by now whether this step logs a loss.
        if not control.should_log:
            self._show(state)  # a step that logs no loss: shown with the last logged one

    def _show(self, state) -> None:
        if self.progress is not None and self.task is not None:
            self.progress.update(self.task, completed=state.global_step, status=self._status())
        elif self._due(state):
            self._line(state)

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        loss = (metrics or {}).get("eval_loss")
        if loss is None or not state.is_world_process_zero:
            return
        if self.best_eval is None or loss < self.best_eval:
            self.best_eval, best = loss, "best so far"
        else:
            best = f"best {self.best_eval:.4f}"
        which = "eval" if self.training else "final eval"
        self._print(f"{which} at step {state.global_step}: loss {loss:.4f} ({best})")

    def on_train_end(self, args, state, control, **kwargs):
        if self.progress is not None:
            self.progress.update(self.task, completed=state.global_step, status=self._status())
            self.progress.stop()
            self.progress = None
        self.training = False


def print_summary(result: RunResult, artifact: Path, console: Console) -> None:
    """The block that ends `peftcli train` on stderr: where the run is, and its main figures."""
    lines = [
        f"trained {result.steps} steps in {_duration(result.train_runtime_s)}",
        f"  run dir      {result.run_dir}",
        f"  {artifact.name + '/':<12} {artifact}" + (" (the best eval)" if result.adapter_is == "best" else ""),
        f"  report       {result.run_dir / REPORT}",
    ]
    if result.train_tokens_per_s is not None:
        lines.append(f"  speed        {result.train_tokens_per_s:,.0f} tokens/s ({result.train_tokens:,} tokens)")
    memory = "GPU, allocated" if result.peak_memory_kind == "cuda_allocated" else "process RSS"
    lines.append(f"  peak memory  {result.peak_memory_mb:,.0f} MB ({memory})")
    if result.train_loss is not None:
        lines.append(f"  train loss   {result.train_loss:.4f} (last logged)")
    if result.eval_loss is not None:
        lines.append(f"  eval loss    {result.eval_loss:.4f} (the kept {artifact.name})")
    if result.best_eval_loss is not None:
        lines.append(f"  best eval    {result.best_eval_loss:.4f} at step {result.best_step}")
    console.print("\n".join(lines), markup=False, highlight=False, emoji=False, soft_wrap=True)


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"{hours}h {minutes:02d}m"
    return f"{minutes}m {secs:02d}s" if minutes else f"{seconds:.1f}s"
