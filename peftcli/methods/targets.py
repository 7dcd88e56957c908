"""Choosing the modules a method adapts: `all-linear`, `all-norms`, or an explicit list of names."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from peftcli.errors import UserError

# The type and meaning of every weight method's `target_modules` key (the key is described here once).
TargetModules = Annotated[
    Literal["all-linear"] | Annotated[list[str], Field(min_length=1)],
    Field(
        description="Linear layers to adapt: all-linear (every one but the output head) or a list of module "
        "names, e.g. [q_proj, v_proj]."
    ),
]
NormModules = Literal["all-norms"] | Annotated[list[str], Field(min_length=1)]

# Output-side projections of the MLP block in common architectures (IA3 scales their input).
FEEDFORWARD_OUT = ("down_proj", "fc2", "w2", "dense_4h_to_h", "c_proj", "fc_out")


def _is_linear(module) -> bool:
    import torch
    from transformers.pytorch_utils import Conv1D

    # bitsandbytes' Linear4bit/Linear8bitLt subclass nn.Linear, so quantized bases are covered.
    return isinstance(module, (torch.nn.Linear, Conv1D))


def linear_module_names(model) -> list[str]:
    """Short names of the linear layers a method can target; the output head is left out, as peft does."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if m is not head and _is_linear(m)}
    return sorted(names)


def norm_module_names(model) -> list[str]:
    names = {
        name.rsplit(".", 1)[-1]
        for name, m in model.named_modules()
        if name and ("norm" in type(m).__name__.lower() or type(m).__name__.endswith("LayerNorm"))
    }
    return sorted(names)


def resolve_targets(targets, model, kind: str = "linear") -> list[str]:
    """An explicit list of short module names, checked against the model.

    `all-linear`/`all-norms` are expanded here rather than passed to peft: an explicit list works for
    every method (IA3 cannot reload an adapter saved with "all-linear", and "all-linear" cannot be
    combined with layers_to_transform), and it lets a typo be reported with what does exist.
    """
    available = linear_module_names(model) if kind == "linear" else norm_module_names(model)
    if targets in ("all-linear", "all-norms"):
        if not available:
            raise UserError(f"peft.target_modules: the model has no {kind} modules to adapt")
        return available
    unknown = [t for t in targets if t not in available]
    if unknown:
        what = "match no module of this model" if len(unknown) == len(targets) else "not found in this model"
        raise UserError(
            f"peft.target_modules: {', '.join(unknown)} {what}",
            hint=f"{kind} modules here: {', '.join(available)}",
        )
    return list(targets)
