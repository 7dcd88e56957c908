"""The recipe reference, rendered from the schema: every key with its type, default and meaning.

The schema's field descriptions are the one place a key is documented: this renders them as
docs/recipe.md (`peftcli schema --markdown`; tests/test_docs.py fails when the file is stale), and
`peftcli init` writes the same descriptions as its comments (`describe`).
"""

from __future__ import annotations

import types
import typing
from typing import Any, Literal, Union

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from peftcli.methods import DEFAULT_METHOD, REGISTRY
from peftcli.recipe.schema import (
    DataSection,
    DataSource,
    EvalSection,
    ModelSection,
    OutputSection,
    QuantizationSection,
    TrainingSection,
)

SECTIONS: dict[str, type[BaseModel]] = {
    "model": ModelSection,
    "quantization": QuantizationSection,
    "data": DataSection,
    "training": TrainingSection,
    "eval": EvalSection,
    "output": OutputSection,
}


def describe(section: str, key: str) -> str:
    """A key's description, as the schema states it ('' when it has none)."""
    model = REGISTRY[section].spec if section in REGISTRY else SECTIONS[section]
    return model.model_fields[key].description or ""


def _type(annotation: Any) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return _type(args[0])
    if origin is Literal:
        return " \\| ".join(f"`{a}`" for a in args)
    if origin in (Union, types.UnionType):
        return " \\| ".join(_type(a) for a in args if a is not type(None))
    if origin in (list, tuple):
        return f"list of {_type(args[0])}" if args else "list"
    if origin is dict:
        return "mapping"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "source"
    return getattr(annotation, "__name__", str(annotation))


def _default(field) -> str:
    if field.is_required():
        return "required"
    if field.default_factory is not None:
        value = field.default_factory()
        return f"`{value}`" if not isinstance(value, BaseModel) else "—"
    if field.default is None or field.default is PydanticUndefined:
        return "—"
    value = field.default
    return f"`{str(value).lower() if isinstance(value, bool) else value}`"


def _rows(prefix: str, model: type[BaseModel], skip: tuple[str, ...] = ()) -> list[str]:
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for name, field in model.model_fields.items():
        if name in skip:
            continue
        meaning = (field.description or "").replace("|", "\\|")
        rows.append(f"| `{prefix}{name}` | {_type(field.annotation)} | {_default(field)} | {meaning} |")
    return rows


def markdown() -> str:
    lines = [
        "# Recipe reference",
        "",
        "<!-- Generated from peftcli/recipe/schema.py and the method registry by `peftcli schema "
        "--markdown`; tests/test_docs.py fails when this file is stale. Edit the descriptions there. -->",
        "",
        "A recipe has seven sections. Only `model.name` and `data.train` are required. Unknown keys are "
        "errors. `peftcli validate RECIPE` prints a recipe resolved; `peftcli schema` prints the JSON "
        "Schema for editors.",
        "",
    ]
    for section, model in SECTIONS.items():
        lines += [f"## `{section}`", ""]
        if section == "quantization":
            lines += ["Optional: omit the section for a full-precision base.", ""]
        lines += [*_rows(f"{section}.", model), ""]
        if section == "data":
            lines += [
                "A source (`data.train`, `data.eval`) is a path or hub id, a mapping with these keys, or a "
                "list of either:",
                "",
                *_rows("", DataSource),
                "",
            ]
    lines += [
        "## `peft`",
        "",
        f"`peft.method` picks the method (default `{DEFAULT_METHOD}`); the other keys are that method's own.",
        "",
    ]
    for name, method in REGISTRY.items():
        lines += [f"### `{name}`", "", method.summary, ""]
        if method.keys():
            lines += [*_rows("peft.", method.spec, skip=(method.spec.tag_field,)), ""]
        else:
            lines += ["No keys of its own.", ""]
    return "\n".join(lines).rstrip() + "\n"
