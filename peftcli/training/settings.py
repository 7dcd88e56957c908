"""Fast by default on a GPU: what each `auto` setting of a recipe becomes on this machine.

| setting | auto on a CUDA GPU | auto on CPU |
|---|---|---|
| model.attn_implementation | flash_attention_2 if flash-attn is installed, else sdpa | transformers' default |
| data.packing | on with flash attention (varlen kernels) and a method that packs | off |
| training.gradient_checkpointing | on (non-reentrant), except prefix tuning | off |
| training.liger | on if liger-kernel is installed | off |
| training.tf32 | on for Ampere and newer | off |

Every choice is recorded in metrics.json (`settings`) and report.md, and each can be set
explicitly in the recipe. The bench measures them on and off.
"""

from __future__ import annotations

import importlib.util
from dataclasses import asdict, dataclass

from peftcli.methods import method_of
from peftcli.recipe import Recipe


@dataclass(frozen=True)
class Settings:
    attn_implementation: str | None  # None = transformers' default
    packing: bool
    gradient_checkpointing: bool
    liger: bool
    tf32: bool
    compile: bool

    def as_dict(self) -> dict:
        return asdict(self)


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def resolve(recipe: Recipe, cuda: bool | None = None, capability: tuple[int, int] | None = None) -> Settings:
    if cuda is None:
        import torch

        cuda = torch.cuda.is_available()
        capability = torch.cuda.get_device_capability() if cuda else None
    method = method_of(recipe.peft)
    t, d = recipe.training, recipe.data

    attn = recipe.model.attn_implementation
    if attn == "auto":
        attn = ("flash_attention_2" if _installed("flash_attn") else "sdpa") if cuda else None
    flash = attn is not None and attn.startswith("flash")
    packing = d.packing if isinstance(d.packing, bool) else bool(cuda and flash and method.packing)
    checkpointing = t.gradient_checkpointing
    if not isinstance(checkpointing, bool):
        checkpointing = bool(cuda) and method.name != "prefix_tuning"
    liger = t.liger if isinstance(t.liger, bool) else bool(cuda) and _installed("liger_kernel")
    tf32 = t.tf32 if isinstance(t.tf32, bool) else bool(cuda and capability and capability[0] >= 8)
    return Settings(attn, packing, checkpointing, liger, tf32, t.compile)
