"""Checks of a recipe against this machine that need no weights: run by `train` before anything
loads or is written, and (the ones that do not import torch) by `validate`."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

from peftcli import modeling
from peftcli.errors import UserError
from peftcli.methods import method_of
from peftcli.recipe import Recipe

LOGGER_PACKAGES = {"tensorboard": "tensorboardX", "wandb": "wandb", "mlflow": "mlflow"}


def check_loggers(report_to: list[str]) -> None:
    for name in report_to:
        if importlib.util.find_spec(LOGGER_PACKAGES[name]) is None:
            raise UserError(
                f"training.report_to: {name} is not installed",
                hint=f"pip install {LOGGER_PACKAGES[name]}, or remove it from training.report_to",
            )


def check_environment(recipe: Recipe, deep: bool = True) -> None:
    """`deep` adds the checks that import torch (bitsandbytes really loading, remote model code)."""
    method = method_of(recipe.peft)
    modeling.check_model_source(recipe.model)
    modeling.check_quantization(recipe.quantization, try_import=deep)
    if deep:
        modeling.check_remote_code(recipe.model)
    check_loggers(recipe.training.report_to)
    if recipe.training.early_stopping_patience is not None and modeling.sharded_launch():
        raise UserError(
            "training.early_stopping_patience is not supported under FSDP/DeepSpeed yet",
            hint="use DDP (no --accelerate-config), or drop the patience",
        )
    if recipe.training.liger is True and importlib.util.find_spec("liger_kernel") is None:
        raise UserError("training.liger: true needs liger-kernel", hint='pip install "peftcli[liger]" (GPU only)')
    config = modeling.read_config(recipe.model)
    context = config.get("max_position_embeddings")
    if context and recipe.data.max_length > context:
        raise UserError(
            f"data.max_length {recipe.data.max_length} exceeds the model's context ({context} tokens)",
            hint=f"set data.max_length to {context} or less",
        )
    check_architecture(method, config)


def check_architecture(method, config: dict) -> None:
    """Methods tied to some architectures (adaption_prompt) refuse others; {} (a hub id) passes."""
    if method.model_types is not None and config and config.get("model_type") not in method.model_types:
        raise UserError(
            f"peft.method '{method.name}' does not support model type '{config.get('model_type')}'",
            hint=f"it supports: {', '.join(sorted(method.model_types))}",
        )


def _local(value: str | None) -> Path | None:
    """A recipe path that is local (recipes make local paths absolute), without any glob part."""
    if not value or not modeling.is_local(value):
        return None
    parts = Path(value).parts
    for i, part in enumerate(parts):
        if re.search(r"[*?[]", part) and not Path(*parts[: i + 1]).exists():
            return Path(*parts[:i])  # a glob: its fixed folder is what it reads
    return Path(value)


def protected_paths(recipe: Recipe, recipe_file: Path | None = None) -> list[tuple[str, Path]]:
    """What a run directory may never be or contain: the recipe's folder, the data, the model."""
    found = [("the recipe file", recipe_file)] if recipe_file is not None else []
    found += [("model.name", _local(recipe.model.name)), ("model.tokenizer", _local(recipe.model.tokenizer))]
    for key, sources in (("data.train", recipe.data.train), ("data.eval", recipe.data.eval or [])):
        found += [(key, _local(source.path)) for source in sources]
    template = recipe.data.chat_template
    found += [("data.chat_template", _local(template)), ("eval.reference", _local(recipe.eval.reference))]
    return [(what, path) for what, path in found if path is not None]
