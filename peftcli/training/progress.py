"""A progress bar for training: step, loss, tokens/s and time left, on one line.

On a terminal it is a live rich bar; in a log (CI, `nohup`) it prints a plain line every ~5 % so the
log stays readable. In a multi-process run only rank 0 reports.
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
        self.progress: Progress | None = None
        self.task = None
        self.loss: float | None = None
        self.started = 0.0
        self.first_step = 0
        self.every = 1
        self.token_counter = None  # the trainer's TokenCounter, set once the trainer exists

    def on_train_begin(self, args, state, control, **kwargs):
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
        print(
            f"{self.label}: step {state.global_step}/{state.max_steps}  {self._status()}", file=sys.stderr, flush=True
        )

    def _due(self, state) -> bool:
        return bool(self.every) and (state.global_step % self.every == 0 or state.global_step == state.max_steps)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if "loss" in (logs or {}):
            self.loss = float(logs["loss"])
            # Logs arrive after on_step_end: the plain line is printed here to show this step's loss.
            if self.progress is None and self._due(state):
                self._line(state)

    def on_step_end(self, args, state, control, **kwargs):
        if self.progress is not None:
            self.progress.update(self.task, completed=state.global_step, status=self._status())
        elif self._due(state) and state.global_step % args.logging_steps:
            self._line(state)  # a due step that logs no loss

    def on_train_end(self, args, state, control, **kwargs):
        if self.progress is not None:
            self.progress.update(self.task, completed=state.global_step, status=self._status())
            self.progress.stop()
            self.progress = None
