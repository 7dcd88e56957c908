"""The text `peftcli init` writes: a commented starter recipe for any method, which validates as written."""

from __future__ import annotations

import glob
import os
import textwrap

import yaml

from peftcli.methods import REGISTRY
from peftcli.model.checks import check_architecture, read_config
from peftcli.recipe import ModelSection
from peftcli.recipe.reference import describe

# Context length written when the model's own is unknown (a hub id) or longer.
MAX_LENGTH = 1024
# Inline comments start at this column; a longer line gets its comment on the line above instead.
COMMENT_COLUMN = 40
LINE_WIDTH = 110  # a comment that would run past this goes on the line above


def _value(value) -> str:
    """`value` as one line of YAML flow scalar, quoted where YAML would otherwise misread it."""
    text = yaml.safe_dump(value, default_flow_style=True, width=float("inf")).strip().removesuffix("...").strip()
    if "\n" in text:  # a multi-line string: escapes keep it on one line
        text = yaml.safe_dump(value, default_style='"', width=float("inf")).strip()
    return text


def _line(key: str, value, comment: str = "", indent: str = "  ", commented: bool = False) -> str | list[str]:
    text = f"{'# ' if commented else ''}{indent}{key}: {_value(value)}"
    if not comment:
        return text
    if len(text) < COMMENT_COLUMN and COMMENT_COLUMN + len(comment) <= LINE_WIDTH:  # padded to the column
        return f"{text:<{COMMENT_COLUMN}}# {comment}"
    return [f"{indent}# {comment}", text]  # no room on the line: the comment goes above


def _key(section: str, key: str, value, commented: bool = False) -> str | list[str]:
    """A recipe key with its value, commented with the schema's description of it (the one place
    a key is documented: docs/recipe.md renders the same text)."""
    return _line(key, value, describe(section, key), commented=commented)


def _flatten(lines: list) -> list[str]:
    out: list[str] = []
    for line in lines:
        out.extend(line if isinstance(line, list) else [line])
    return out


def _exists_here(value: str) -> bool:
    """Whether `value` names something in the local file system (a glob: one that matches)."""
    expanded = os.path.expanduser(value)
    if os.path.exists(expanded):
        return True
    return any(ch in value for ch in "*?[") and bool(glob.glob(expanded))


def _for_recipe(value: str, out: str | os.PathLike | None) -> str:
    """A path given relative to the current directory, rewritten to resolve to the same place from
    the recipe (whose relative paths resolve against its own folder).

    Absolute paths, `~` paths and names that exist nowhere here (hub ids, data still to come) are
    written as given. Without a recipe file (`--out -`) an existing relative path becomes absolute."""
    if not value or os.path.isabs(os.path.expanduser(value)) or not _exists_here(value):
        return value
    target = os.path.realpath(value)
    if out is None or str(out) == "-":
        return target
    folder = os.path.dirname(os.path.realpath(os.fspath(out)))
    try:
        return os.path.relpath(target, folder)
    except ValueError:  # another drive (Windows): no relative path leads there
        return target


def _local_config(model: str) -> dict:
    """config.json of a local model folder given as typed (relative to here); {} for a hub id or a
    config that cannot be read (validate reports that one later)."""
    try:
        return read_config(ModelSection(name=os.path.abspath(os.path.expanduser(model))))
    except (OSError, ValueError):
        return {}


def _max_length(config: dict) -> int:
    context = config.get("max_position_embeddings")
    if isinstance(context, int) and not isinstance(context, bool) and context > 0:
        return min(MAX_LENGTH, context)
    return MAX_LENGTH


def starter(method_name: str, model: str, data: str, name: str, out: str | os.PathLike | None = None) -> str:
    """The starter recipe's text. `model` and `data` are as the user gave them (relative to the current
    directory); `out` is where the recipe will be written (None or '-': printed), which decides how
    local paths are written. Raises UserError when the method cannot run on a local model."""
    method = REGISTRY[method_name]
    config = _local_config(model)
    check_architecture(method, config)  # as validate would: before anything is written
    model = _for_recipe(model, out)
    data = _for_recipe(data, out)
    lines = [
        "# A peftcli recipe, written by `peftcli init`. Check it: `peftcli validate recipe.yaml`; see the",
        "# training data as the model will: `peftcli data preview recipe.yaml`. Every key: `peftcli schema`.",
        "# Relative paths resolve against this file's folder.",
        "",
        "model:",
        _key("model", "name", model),
        _key("model", "dtype", "auto"),
        _key("model", "trust_remote_code", False),
    ]
    if method.quantized_base:
        lines += [
            "# quantization:                       # uncomment for a 4-bit base (QLoRA; needs bitsandbytes)",
            "#   bits: 4",
            "#   quant_type: nf4",
            "#   double_quant: true",
        ]
    else:  # the registry's reason, wrapped: the base stays in full precision
        why = f"({method_name} cannot train on a quantized base: {method.why_no_quantized_base})"
        lines += [f"# {part}" for part in textwrap.wrap(why, LINE_WIDTH - 2)]
    lines += ["peft:", _line("method", method_name, method.summary)]
    for key, default in method.keys().items():
        lines.append(_key(method_name, key, default, commented=default is None))
    lines += [
        "data:",
        _key("data", "train", data),
        _key("data", "eval_split", 0.05),
        _key("data", "format", "auto"),
        _key("data", "chat_template", "auto"),
        _key("data", "max_length", _max_length(config)),
        _key("data", "packing", "auto") if method.packing else "  # (packing does not combine with this method)",
        "training:",
        _key("training", "epochs", 1),
        _key("training", "batch_size", 4),
        _key("training", "gradient_accumulation", 4),
        _key("training", "learning_rate", method.learning_rate),
        _key("training", "lr_scheduler", "cosine"),
        _key("training", "warmup_ratio", 0.03),
        _key("training", "eval_steps", 200),
        _key("training", "save_steps", 200),
        _key("training", "seed", 42),
        "eval:",
        _key("eval", "reference", None, commented=True),
        _key("eval", "max_new_tokens", 64),
        "output:",
        _key("output", "dir", f"runs/{name}"),
        "",
    ]
    return "\n".join(_flatten(lines))
