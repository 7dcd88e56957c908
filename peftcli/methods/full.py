"""Baselines that train the base weights themselves, so users can see the cost PEFT avoids:
`full` (every weight) and `freeze` (only the last N decoder layers, LLaMA-Factory style)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from peftcli.errors import UserError
from peftcli.methods.base import DecoderShape, MethodContext, MethodSpec
from peftcli.strict import PositiveInt


class FullSpec(MethodSpec):
    method: Literal["full"]


class FreezeSpec(MethodSpec):
    method: Literal["freeze"]
    layers: PositiveInt = Field(2, description="Train the last N decoder layers; everything else stays frozen.")
    train_head: bool = Field(False, description="Also train the output head (lm_head).")


def apply_full(spec: FullSpec, model, ctx: MethodContext):
    for param in model.parameters():
        param.requires_grad = True
    return model


def _decoder_layers(model):
    """The model's list of transformer blocks: the decoder's `layers` where the model has the usual
    layout, else the longest ModuleList (never an MoE layer's experts, which come later in the walk)."""
    import torch

    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    if isinstance(layers, torch.nn.ModuleList) and len(layers) > 0:
        return layers
    best = None
    for _, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) > 0:
            if best is None or len(module) > len(best):
                best = module
    if best is None:
        raise UserError("peft.method freeze: cannot find the model's list of decoder layers")
    return best


def apply_freeze(spec: FreezeSpec, model, ctx: MethodContext):
    layers = _decoder_layers(model)
    if spec.layers > len(layers):
        raise UserError(f"peft.layers ({spec.layers}) exceeds the model's {len(layers)} layers")
    for param in model.parameters():
        param.requires_grad = False
    for block in list(layers)[-spec.layers :]:
        for param in block.parameters():
            param.requires_grad = True
    if spec.train_head and model.get_output_embeddings() is not None:
        for param in model.get_output_embeddings().parameters():
            param.requires_grad = True
    return model


def save_full_model(spec, model, out: Path, ctx: MethodContext) -> None:
    model.save_pretrained(out, safe_serialization=True)


def count_full(spec: FullSpec, shape: DecoderShape) -> int:
    return shape.linear_params() + shape.other_params()


def count_freeze(spec: FreezeSpec, shape: DecoderShape) -> int:
    per_block = sum(a * b for a, b in shape.linears().values()) + 2 * shape.hidden  # linears and two norms
    return per_block * spec.layers + (shape.vocab * shape.hidden if spec.train_head else 0)
