"""`peftcli init`: a commented starter recipe for any method, which validates as written."""

from __future__ import annotations

import glob
import os

import yaml

from peftcli import modeling
from peftcli.methods import REGISTRY
from peftcli.preflight import check_architecture
from peftcli.recipe import ModelSection

# Learning rates that suit each family better than LoRA's 2e-4 (prompt methods train few
# parameters far from the weights; full fine-tuning needs a much smaller step).
LEARNING_RATE = {
    "prompt_tuning": 3e-2,
    "prefix_tuning": 1e-2,
    "p_tuning": 1e-2,
    "adaption_prompt": 1e-2,
    "ia3": 3e-3,
    "vera": 3e-3,
    "ln_tuning": 3e-3,
    "full": 2e-5,
    "freeze": 5e-5,
}


# Context length written when the model's own is unknown (a hub id) or longer.
MAX_LENGTH = 1024
# Inline comments start at this column; a longer line gets its comment on the line above instead.
COMMENT_COLUMN = 40


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
    if len(text) < COMMENT_COLUMN:  # padded to the column: at least one space before the `#`
        return f"{text:<{COMMENT_COLUMN}}# {comment}"
    return [f"{indent}# {comment}", text]  # no room on the line: the comment goes above


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
        return modeling.read_config(ModelSection(name=os.path.abspath(os.path.expanduser(model))))
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
    fields = method.spec.model_fields
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
        _line("name", model, "local folder or hub id"),
        _line("dtype", "auto", "auto = bfloat16 on a GPU that supports it, else float32"),
        _line("trust_remote_code", False, "run code shipped with the model only if you trust it"),
    ]
    if method.quantized_base:
        lines += [
            "# quantization:                       # uncomment for a 4-bit base (QLoRA; needs bitsandbytes)",
            "#   bits: 4",
            "#   quant_type: nf4",
            "#   double_quant: true",
        ]
    else:
        lines.append(f"# ({method_name} trains the base weights, so the base cannot be quantized)")
    lines += ["peft:", _line("method", method_name, method.summary)]
    for key, default in method.keys().items():
        description = fields[key].description or ""
        lines.append(_line(key, default, description, commented=default is None))
    lines += [
        "data:",
        _line("train", data, "jsonl | json | csv | parquet | txt, a folder or glob, or a hub id"),
        _line("eval_split", 0.05, "held-out share of train; or eval: held_out.jsonl"),
        _line("format", "auto", "auto | messages | sharegpt | alpaca | prompt_completion | text"),
        _line("chat_template", "auto", "auto | chatml | llama3 | mistral | path/to/template.jinja"),
        _line("max_length", _max_length(config), "tokens per example"),
        _line("packing", "auto", "pack examples into padding-free rows: auto = on a GPU with flash attention")
        if method.packing
        else "  # (packing does not combine with this method)",
        "training:",
        _line("epochs", 1, "or max_steps: N"),
        _line("batch_size", 4, "per device"),
        _line("gradient_accumulation", 4, "effective batch = batch_size x gradient_accumulation"),
        _line("learning_rate", LEARNING_RATE.get(method_name, 2e-4), "peak learning rate"),
        _line("lr_scheduler", "cosine"),
        _line("warmup_ratio", 0.03),
        _line("eval_steps", 200, "eval loss while training"),
        _line("save_steps", 200, "checkpoint-N every N steps (resume with --resume)"),
        _line("seed", 42),
        "eval:",
        _line("reference", None, "general text to measure forgetting on (peftcli eval)", commented=True),
        _line("max_new_tokens", 64, "peftcli eval --generate"),
        "output:",
        _line("dir", f"runs/{name}", "the run directory"),
        "",
    ]
    return "\n".join(_flatten(lines))
