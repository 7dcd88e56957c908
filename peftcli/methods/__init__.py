"""The method registry: every `peft.method` a recipe can name, in one table.

Adding a method is one spec + one apply function in a family module and one row here. Nothing in
this package imports torch or peft at module level, so `peftcli validate` and `methods` stay fast.
"""

from __future__ import annotations

from typing import Annotated, Union

from pydantic import Field

from peftcli.methods.base import Method, MethodSpec
from peftcli.methods.lora import LoraSpec, apply_lora

_ROWS = [
    Method(
        "lora",
        LoraSpec,
        apply_lora,
        summary="Low-rank update of linear layers; the default choice.",
        mergeable=True,
        quantized_base=True,
    ),
    Method(
        "dora",
        LoraSpec,
        apply_lora,
        summary="LoRA with weight decomposition (magnitude + direction); often closer to full tuning.",
        mergeable=True,
        quantized_base=True,
        implies=(("use_dora", True),),
    ),
]

REGISTRY: dict[str, Method] = {row.name: row for row in _ROWS}


def _spec_union():
    specs = tuple(dict.fromkeys(row.spec for row in _ROWS))
    if len(specs) == 1:
        return specs[0]
    return Annotated[Union[specs], Field(discriminator="method")]  # noqa: UP007 (runtime tuple)


PeftSpec = _spec_union()


def method_of(spec: MethodSpec) -> Method:
    return REGISTRY[spec.method]


__all__ = ["REGISTRY", "Method", "MethodSpec", "PeftSpec", "method_of"]
