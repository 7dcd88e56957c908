"""Phase "set up": tokenizer, data, base model and method, all in memory; nothing is written yet.

The tokenizer and data come first (fast, and where most user errors surface), the model last.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peftcli.data import PreparedData, prepare_data
from peftcli.methods import Method, MethodContext, method_of
from peftcli.model.device import compute_dtype
from peftcli.model.load import load_model, load_tokenizer, prepare_for_training, quiet_libraries
from peftcli.model.speed import Settings
from peftcli.recipe import Recipe


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


def planned_steps(recipe: Recipe, train_rows: int) -> int:
    """Optimizer steps the run will take: max_steps, or the epochs' worth of batches."""
    t = recipe.training
    if t.max_steps:
        return t.max_steps
    per_epoch = max(1, math.ceil(train_rows / (t.batch_size * t.gradient_accumulation)))
    return max(1, math.ceil(per_epoch * t.effective_epochs))


def build_setup(recipe: Recipe) -> Setup:
    from transformers import set_seed

    from peftcli.training.settings import resolve as resolve_settings

    quiet_libraries()
    method = method_of(recipe.peft)
    tokenizer = load_tokenizer(recipe.model)
    data = prepare_data(recipe.data, tokenizer, recipe.training.seed)
    settings = resolve_settings(recipe)
    set_seed(recipe.training.seed)
    dtype = compute_dtype(recipe.model.dtype)
    model = load_model(recipe.model, recipe.quantization, dtype, attn=settings.attn_implementation)
    model = prepare_for_training(model, recipe.quantization, settings.gradient_checkpointing)
    scratch = tempfile.TemporaryDirectory(prefix="peftcli-")
    ctx = MethodContext(
        tokenizer_path=recipe.model.tokenizer or recipe.model.name,
        total_steps=planned_steps(recipe, len(data.train)),
        scratch_dir=Path(scratch.name),
    )
    model = method.apply(recipe.peft, model, ctx)
    return Setup(tokenizer, data, model, method, ctx, dtype, scratch, settings)
