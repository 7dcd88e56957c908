"""What every PEFT method entry in the registry provides."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from peftcli.spec import Strict

if TYPE_CHECKING:  # torch/peft stay out of `peftcli --help` and `peftcli validate`
    from torch import nn


class MethodSpec(Strict):
    """A method's own recipe keys. Subclasses add a `method: Literal[...]` tag and their keys."""

    # Keys that describe the method but are not user settings (shown by `peftcli methods`).
    tag_field: ClassVar[str] = "method"


@dataclass(frozen=True)
class Method:
    """One registry row: how to build the method and what it can do."""

    name: str
    spec: type[MethodSpec]
    # Applies the method to a loaded base model and returns the trainable model. Imports peft lazily.
    apply: Callable[[Any, "nn.Module"], "nn.Module"]
    summary: str
    mergeable: bool
    quantized_base: bool
    # Why it cannot be merged, and how to serve it instead (shown by `peftcli merge`).
    serve_hint: str = ""
    # Model types (config.model_type) it supports; None means any causal LM.
    model_types: frozenset[str] | None = None
    # Extra spec values that `method` stands for (e.g. `dora` = lora with use_dora).
    implies: tuple[tuple[str, Any], ...] = ()

    def keys(self) -> dict[str, Any]:
        """The recipe keys this method takes, with their defaults."""
        out = {}
        for key, field in self.spec.model_fields.items():
            if key == self.spec.tag_field:
                continue
            out[key] = None if field.is_required() else field.get_default(call_default_factory=True)
        return out
