"""Phase "set up": tokenizer, data, base model and method, all in memory; nothing is written yet.

The tokenizer and data come first (fast, and where most user errors surface), the model last. Each
phase is named on stderr while it runs (`LoadingStatus`): loading takes seconds before the first step.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from peftcli.data import PreparedData, prepare_data
from peftcli.methods import Method, MethodContext, method_of
from peftcli.model.device import compute_dtype
from peftcli.model.load import load_model, load_tokenizer, prepare_for_training, quiet_libraries
from peftcli.model.speed import Settings
from peftcli.recipe import Recipe
from peftcli.recipe.schema import TrainingSection


@dataclass
class Setup:
    """Tokenizer, data and the model wrapped by its method: everything the trainer needs."""

    tokenizer: Any
    data: PreparedData
    model: Any
    method: Method
    ctx: MethodContext
    dtype: Any
    scratch: tempfile.TemporaryDirectory
    settings: Settings


def planned_steps(training: TrainingSection, train_rows: int, examples_per_step: int) -> int:
    """Optimizer steps a run takes: max_steps, or the epochs' worth of steps of `examples_per_step`
    over `train_rows` (a last, partial step per epoch counts). The one home of this rule: the method
    (AdaLoRA's schedule) and `tune` (how often a trial evaluates) plan with it."""
    if training.max_steps:
        return training.max_steps
    per_epoch = max(1, math.ceil(train_rows / examples_per_step))
    return max(1, math.ceil(per_epoch * training.effective_epochs))


class LoadingStatus:
    """Names the phase that is running until training starts: a spinner line on a terminal, one plain
    line per phase in a log. `console=None` (the other processes of a multi-process run) says nothing.
    Stopped before the progress bar starts (rich allows one live display at a time)."""

    def __init__(self, console: Console | None):
        self.console = console
        self.spinner: Any = None

    def phase(self, text: str) -> None:
        if self.console is None:
            return
        if not self.console.is_terminal:
            self.console.print(f"{text}...", markup=False, highlight=False, emoji=False)
        elif self.spinner is None:
            self.spinner = self.console.status(text)
            self.spinner.start()
        else:
            self.spinner.update(text)

    def done(self, text: str) -> None:
        """A line that stays (above the spinner on a terminal)."""
        if self.console is not None:
            self.console.print(text, markup=False, highlight=False, emoji=False)

    def stop(self) -> None:
        if self.spinner is not None:
            self.spinner.stop()
            self.spinner = None

    def __enter__(self) -> LoadingStatus:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def build_setup(recipe: Recipe, status: LoadingStatus | None = None) -> Setup:
    status = status or LoadingStatus(None)
    status.phase("loading libraries")
    # The heavy imports happen here, under their own status line, not inside a later phase.
    import peft  # noqa: F401
    import torch  # noqa: F401
    import trl  # noqa: F401
    from transformers import set_seed

    from peftcli.training.settings import resolve as resolve_settings

    quiet_libraries()
    method = method_of(recipe.peft)
    status.phase("loading the tokenizer")
    tokenizer = load_tokenizer(recipe.model)
    status.phase("reading data")
    data = prepare_data(recipe.data, tokenizer, recipe.training.seed)
    status.done(f"data: {len(data.train):,} training examples, {len(data.eval):,} eval examples")
    settings = resolve_settings(recipe)
    set_seed(recipe.training.seed)
    dtype = compute_dtype(recipe.model.dtype)
    quant = recipe.quantization.describe() if recipe.quantization else "not quantized"
    status.phase(f"loading the model ({recipe.model.name}, {str(dtype).removeprefix('torch.')}, {quant})")
    model = load_model(recipe.model, recipe.quantization, dtype, attn=settings.attn_implementation)
    model = prepare_for_training(model, recipe.quantization, settings.gradient_checkpointing)
    scratch = tempfile.TemporaryDirectory(prefix="peftcli-")
    ctx = MethodContext(
        tokenizer_path=recipe.model.tokenizer or recipe.model.name,
        total_steps=planned_steps(
            recipe.training, len(data.train), settings.batch_size * settings.gradient_accumulation
        ),
        scratch_dir=Path(scratch.name),
    )
    status.phase(f"applying {method.name}")
    model = method.apply(recipe.peft, model, ctx)
    if recipe.training.batch_size == "auto":  # confirmed on the model as applied; a smaller micro-batch
        from peftcli.training.batch import confirm_batch  # keeps the effective batch, so the steps stay

        status.phase(f"trying a micro-batch of {settings.batch_size} (training.batch_size: auto)")
        settings = confirm_batch(recipe, model, settings, len(tokenizer))
    return Setup(tokenizer, data, model, method, ctx, dtype, scratch, settings)
