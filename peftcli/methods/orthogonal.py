"""Orthogonal fine-tuning: OFT (block-diagonal rotations) and BOFT (butterfly-factored rotations)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from peftcli.methods.base import DecoderShape, MethodContext, MethodSpec, chosen_linears, via_peft
from peftcli.methods.targets import TargetModules
from peftcli.strict import NonNegativeInt, PositiveFloat, PositiveInt, Probability


class OftSpec(MethodSpec):
    method: Literal["oft"]
    block_size: PositiveInt = Field(32, description="Size of each orthogonal block (adjusted to divide the layer).")
    dropout: Probability = Field(0.0, description="Module dropout.")
    coft: bool = Field(False, description="Constrained OFT (keeps the rotation near identity).")
    eps: PositiveFloat = Field(6e-5, description="COFT's constraint radius.")
    block_share: bool = Field(False, description="Share one block across the layer.")
    target_modules: TargetModules = "all-linear"


class BoftSpec(MethodSpec):
    method: Literal["boft"]
    block_size: NonNegativeInt = Field(4, description="Block size; must divide every adapted layer.")
    block_num: NonNegativeInt = Field(0, description="Number of blocks (set this or block_size).")
    butterfly_factor: PositiveInt = Field(1, description="Butterfly factors (1 on machines without CUDA).")
    dropout: Probability = Field(
        0.0, description="Chance that an orthogonal block is the identity in a training forward pass."
    )
    target_modules: TargetModules = "all-linear"

    @model_validator(mode="after")
    def _one_of_size_or_num(self) -> BoftSpec:
        if (self.block_size == 0) == (self.block_num == 0):
            raise ValueError("set exactly one of block_size and block_num to a non-zero value (the other to 0)")
        return self


apply_oft = via_peft(
    "OFTConfig",
    rename={"block_size": "oft_block_size", "dropout": "module_dropout"},
    extra=lambda spec, model, ctx: {"r": 0},  # OFT takes a rank or a block size; we expose the block size
)


def _boft_without_kernel_rebuilds(spec, model, ctx: MethodContext) -> dict:
    """PEFT tries to JIT-compile BOFT's CUDA kernel and, when that fails, retries for *every* adapted
    layer (tens of seconds on a large model). Try once; if it failed, remember the failure."""
    from peft.tuners.boft import layer

    if layer.get_fbd_cuda() is None:
        layer.get_fbd_cuda = lambda: None
    return {}


apply_boft = via_peft(
    "BOFTConfig",
    rename={
        "block_size": "boft_block_size",
        "block_num": "boft_block_num",
        "butterfly_factor": "boft_n_butterfly_factor",
        "dropout": "boft_dropout",
    },
    extra=_boft_without_kernel_rebuilds,
)


def _block(features: int, size: int) -> int:
    """The block size peft uses: the divisor of `features` nearest to the one asked for."""
    return min((d for d in range(1, features + 1) if features % d == 0), key=lambda d: (abs(d - size), d))


def count_oft(spec: OftSpec, shape: DecoderShape) -> int:
    total = 0
    for a, _ in chosen_linears(spec, shape).values():
        size = _block(a, spec.block_size)
        blocks = 1 if spec.block_share else a // size
        total += blocks * size * (size - 1) // 2  # one skew-symmetric generator per block
    return shape.layers * total


def count_boft(spec: BoftSpec, shape: DecoderShape) -> int:
    total = 0
    for a, b in chosen_linears(spec, shape).values():
        size = spec.block_size or a // spec.block_num
        total += spec.butterfly_factor * a * size + b  # the rotation factors and the output scale
    return shape.layers * total
