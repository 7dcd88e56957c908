"""Checks of a recipe against this machine that need no weights: run by `train` before anything
loads or is written, and (the ones that do not import torch) by `validate`."""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from peftcli.errors import PATH_RULE, UserError
from peftcli.integrity import PICKLE_WHY, pickles
from peftcli.methods import method_of
from peftcli.model.device import sharded_launch
from peftcli.recipe import ModelSection, QuantizationSection, Recipe

LOGGER_PACKAGES = {"tensorboard": "tensorboardX", "wandb": "wandb", "mlflow": "mlflow"}


def check_loggers(report_to: Sequence[str]) -> None:
    for name in report_to:
        if importlib.util.find_spec(LOGGER_PACKAGES[name]) is None:
            raise UserError(
                f"training.report_to: {name} is not installed",
                hint=f"pip install {LOGGER_PACKAGES[name]}, or remove it from training.report_to",
            )


def check_environment(recipe: Recipe, deep: bool = True) -> None:
    """`deep` adds the checks that import torch (bitsandbytes really loading, remote model code)."""
    method = method_of(recipe.peft)
    check_model_source(recipe.model)
    check_quantization(recipe.quantization, try_import=deep)
    if deep:
        check_remote_code(recipe.model)
    check_loggers(recipe.training.report_to)
    if recipe.training.early_stopping_patience is not None and sharded_launch():
        raise UserError(
            "training.early_stopping_patience is not supported under FSDP/DeepSpeed yet",
            hint="use DDP (no --accelerate-config), or drop the patience",
        )
    if recipe.training.liger is True and importlib.util.find_spec("liger_kernel") is None:
        raise UserError("training.liger: true needs liger-kernel", hint='pip install "peftcli[liger]" (GPU only)')
    config = read_config(recipe.model)
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


def is_local(name: str) -> bool:
    """Recipes make every local path absolute (recipe/load.py); a relative name is a hub id."""
    return os.path.isabs(os.path.expanduser(name))


def check_model_source(model: ModelSection) -> None:
    """Fail early, with the path, when a local model folder is missing or incomplete."""
    if not is_local(model.name):
        return  # a hub id: transformers reports what it can
    path = Path(model.name)
    if not path.exists():
        raise UserError(f"model.name: {path} does not exist", hint=PATH_RULE)
    if not path.is_dir():
        raise UserError(f"model.name: {path} is a file; expected a model folder with config.json")
    if not (path / "config.json").exists():
        raise UserError(f"model.name: {path} has no config.json; is it a Hugging Face model folder?")
    if not any(path.glob("*.safetensors")):
        pickled = pickles(path)
        if pickled:  # transformers would unpickle them (torch.load): refused, with the reason
            raise UserError(
                f"model.name: {path} holds its weights only as {pickled[0]}, {PICKLE_WHY}",
                hint="convert the model to safetensors with code you trust: load it, then "
                "save_pretrained(..., safe_serialization=True)",
            )
    tokenizer_dir = Path(model.tokenizer) if model.tokenizer else path
    names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
    if not any((tokenizer_dir / n).exists() for n in names):
        raise UserError(
            f"model: no tokenizer files in {tokenizer_dir}",
            hint="save the tokenizer beside the model, or point model.tokenizer at one",
        )
    check_template_text(tokenizer_dir, "model.tokenizer" if model.tokenizer else "model.name")


# The text files a tokenizer reads its chat template from (transformers' CHAT_TEMPLATE_FILE,
# CHAT_TEMPLATE_DIR and the config that held templates before them): files people edit by hand.
TEMPLATE_FILES = ("chat_template.jinja", "tokenizer_config.json")
TEMPLATE_DIR = "additional_chat_templates"


def check_template_text(folder: Path, key: str) -> None:
    """Each chat template file of a local tokenizer is UTF-8, as transformers reads it: otherwise
    its 'utf-8 codec' error names neither the file nor the byte (and `validate` could not tell)."""
    templates = sorted((folder / TEMPLATE_DIR).glob("*.jinja")) if (folder / TEMPLATE_DIR).is_dir() else []
    for file in [folder / name for name in TEMPLATE_FILES] + templates:
        if not file.is_file():
            continue
        try:
            data = file.read_bytes()
        except OSError as exc:
            raise UserError(f"{key}: cannot read {file} ({exc.strerror or exc})") from None
        try:
            data.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = data[: exc.start].count(b"\n") + 1
            raise UserError(
                f"{key}: {file} is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}, line {line})",
                hint="re-save it as UTF-8 (from Latin-1: iconv -f latin1 -t utf-8), as transformers reads it",
            ) from None


@dataclass(frozen=True)
class FoundConfig:
    """A model's config.json as a dict ({} when none could be read without network), and where it
    came from or, when empty, why there is none: `validate` says it."""

    config: dict
    source: str


def read_config(model: ModelSection) -> dict:
    """config.json of the model as a dict (no torch), or {} when it cannot be read offline."""
    return find_config(model).config


def find_config(model: ModelSection) -> FoundConfig:
    """config.json of a local folder; for a hub id, the copy in the local Hugging Face cache (no
    network), else the shape peftcli ships for the recipes' models (model/known_shapes.py)."""
    if is_local(model.name):
        path = Path(model.name) / "config.json"
        return FoundConfig(_parse_config(path), f"{path}") if path.is_file() else FoundConfig({}, f"no {path}")
    cached = _cached_config(model.name, model.revision)
    if cached is not None:
        return FoundConfig(_parse_config(cached), f"the local Hugging Face cache ({cached})")
    from peftcli.model.known_shapes import known_shape

    shape = known_shape(model.name)
    if shape is not None:
        return FoundConfig(shape, f"peftcli's copy of {model.name}'s shape (not in the local Hugging Face cache)")
    return FoundConfig(
        {},
        f"{model.name} is a hub id that is not in the local Hugging Face cache and not one of the shapes "
        "peftcli knows (peftcli/model/known_shapes.py)",
    )


def _cached_config(hub_id: str, revision: str | None) -> Path | None:
    """config.json of `hub_id` in the local Hugging Face cache, if it is there; never the network."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    try:
        found = try_to_load_from_cache(hub_id, "config.json", revision=revision)
    except Exception:  # noqa: BLE001 - a name the hub would refuse (HFValidationError) has no cached copy
        return None
    return Path(found) if isinstance(found, str) and Path(found).is_file() else None


def _parse_config(path: Path) -> dict:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise UserError(f"model.name: {path} is not UTF-8 text (byte {exc.start})") from None
    except ValueError as exc:
        raise UserError(
            f"model.name: {path} is not valid JSON ({exc})", hint="the model folder is damaged: copy it again"
        ) from None
    except OSError as exc:
        raise UserError(f"model.name: cannot read {path} ({exc.strerror})") from None
    if not isinstance(config, dict):
        raise UserError(f"model.name: {path} holds a JSON {type(config).__name__}, not a model config")
    return config


def check_quantization(quant: QuantizationSection | None, try_import: bool = True) -> None:
    """bitsandbytes must be installed, and (`try_import`, which costs a torch import) load here."""
    if quant is None:
        return
    if importlib.util.find_spec("bitsandbytes") is None:
        raise UserError(
            f"quantization: {quant.bits}-bit needs bitsandbytes, which is not installed",
            hint="pip install bitsandbytes, or remove the quantization section",
        )
    if not try_import:
        return
    try:
        import bitsandbytes  # noqa: F401 - importing is the check: it fails where the library cannot run
    except Exception as exc:  # noqa: BLE001
        raise UserError(
            f"quantization: bitsandbytes cannot run here ({exc.__class__.__name__}: {exc})",
            hint="remove the quantization section to train in full precision",
        ) from None


def check_remote_code(model: ModelSection) -> None:
    """A local model whose config maps to code shipped with it needs explicit consent to run it."""
    config = read_config(model)
    if config.get("auto_map") and not model.trust_remote_code:
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

        if config.get("model_type") not in CONFIG_MAPPING_NAMES:
            raise UserError(
                f"model.name: {model.name} ships its own model code (config.json auto_map), which runs only with "
                "model.trust_remote_code: true",
                hint="read that code first; then set model.trust_remote_code: true",
            )
