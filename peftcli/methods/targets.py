"""`target_modules` handling shared by every method that adapts linear layers."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from peftcli.errors import UserError

TargetModules = Literal["all-linear"] | Annotated[list[str], Field(min_length=1)]


def linear_module_names(model) -> list[str]:
    """Short names of the linear layers a method can target (the output head excluded, as peft does)."""
    import torch

    names = set()
    output_head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for full_name, module in model.named_modules():
        if module is output_head:
            continue
        # bitsandbytes' Linear4bit/Linear8bitLt subclass nn.Linear, so quantised bases are covered.
        if isinstance(module, torch.nn.Linear):
            names.add(full_name.rsplit(".", 1)[-1])
    return sorted(names)


def resolve_targets(targets, model):
    """Pass `all-linear` through; check an explicit list against the model before peft sees it."""
    if targets == "all-linear":
        return targets
    available = linear_module_names(model)
    unknown = [t for t in targets if t not in available]
    if len(unknown) == len(targets):
        raise UserError(
            f"peft.target_modules {targets} match no module of this model",
            hint=f"linear modules here: {', '.join(available)} (or use target_modules: all-linear)",
        )
    if unknown:
        raise UserError(
            f"peft.target_modules: {', '.join(unknown)} not found in this model",
            hint=f"linear modules here: {', '.join(available)}",
        )
    return list(targets)
