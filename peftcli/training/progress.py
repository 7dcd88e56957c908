"""A progress bar for training: step, loss, tokens/s and time left, on one line.

On a terminal it is a live rich bar; in a log (CI, `nohup`) it prints a plain line every ~5 % so the
log stays readable.
"""

from __future__ import annotations

import sys
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from transformers import TrainerCallback


class TrainingProgress(TrainerCallback):
    def __init__(self, console: Console | None = None, label: str = "training"):
        self.console = console or Console(stderr=True)
        self.label = label
        self.live = self.console.is_terminal
        self.progress: Progress | None = None
        self.task = None
        self.loss: float | None = None
        self.tokens = 0
        self.started = 0.0
        self.every = 1

    def on_train_begin(self, args, state, control, **kwargs):
        self.started = time.perf_counter()
        self.every = max(1, state.max_steps // 20)
        if self.live:
            self.progress = Progress(
                TextColumn(f"[bold]{self.label}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[status]}"),
                TimeElapsedColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),
                console=self.console,
                transient=False,
            )
            self.progress.start()
            self.task = self.progress.add_task(
                self.label, total=state.max_steps, completed=state.global_step, status=""
            )

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        if "loss" in logs:
            self.loss = float(logs["loss"])
        if "num_tokens" in logs:
            self.tokens = int(float(logs["num_tokens"]))

    def _status(self) -> str:
        parts = []
        if self.loss is not None:
            parts.append(f"loss {self.loss:.4f}")
        elapsed = time.perf_counter() - self.started
        if self.tokens and elapsed > 0:
            parts.append(f"{self.tokens / elapsed:,.0f} tok/s")
        return "  ".join(parts)

    def on_step_end(self, args, state, control, **kwargs):
        if self.progress is not None:
            self.progress.update(self.task, completed=state.global_step, status=self._status())
        elif state.global_step % self.every == 0 or state.global_step == state.max_steps:
            print(
                f"{self.label}: step {state.global_step}/{state.max_steps}  {self._status()}",
                file=sys.stderr,
                flush=True,
            )

    def on_train_end(self, args, state, control, **kwargs):
        if self.progress is not None:
            self.progress.update(self.task, completed=state.global_step, status=self._status())
            self.progress.stop()
            self.progress = None
