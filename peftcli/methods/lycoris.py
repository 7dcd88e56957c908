"""LyCORIS-style low-rank products: LoHa (Hadamard) and LoKr (Kronecker)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from peftcli.methods.base import DecoderShape, MethodSpec, chosen_linears, via_peft
from peftcli.methods.targets import TargetModules
from peftcli.strict import Int, PositiveFloat, PositiveInt, Probability


class _ProductKeys(MethodSpec):
    """Keys LoHa and LoKr share."""

    r: PositiveInt = Field(8, description="Rank of the low-rank factors.")
    alpha: PositiveFloat = Field(8, description="Scaling numerator.")
    rank_dropout: Probability = Field(0.0, description="Dropout over the rank dimension of the update.")
    module_dropout: Probability = Field(
        0.0, description="Chance that an adapted layer skips its update in a training forward pass."
    )
    target_modules: TargetModules = "all-linear"


class LohaSpec(_ProductKeys):
    method: Literal["loha"]


class LokrSpec(_ProductKeys):
    method: Literal["lokr"]
    decompose_both: bool = Field(False, description="Low-rank decompose the left factor too.")
    decompose_factor: Int = Field(-1, description="Kronecker factor size; -1 picks it from the shape.")


apply_loha = via_peft("LoHaConfig")
apply_lokr = via_peft("LoKrConfig")


def count_loha(spec: LohaSpec, shape: DecoderShape) -> int:
    # Two low-rank pairs whose Hadamard product is the update.
    return shape.layers * sum(2 * spec.r * (a + b) for a, b in chosen_linears(spec, shape).values())


def _factors(dimension: int, factor: int) -> tuple[int, int]:
    """peft's LoKr factorisation: m <= n with m * n = dimension, m near `factor` (or sqrt)."""
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    factor = dimension if factor == -1 else factor
    m, n = 1, dimension
    while m < n:
        new_m = m + 1
        while dimension % new_m:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > m + n or new_m > factor:
            break
        m, n = new_m, new_n
    return min(m, n), max(m, n)


def count_lokr(spec: LokrSpec, shape: DecoderShape) -> int:
    total = 0
    for a, b in chosen_linears(spec, shape).values():
        (in_m, in_n), (out_l, out_k) = _factors(a, spec.decompose_factor), _factors(b, spec.decompose_factor)
        low_rank_left = spec.decompose_both and spec.r < max(out_l, in_m) / 2
        total += spec.r * (out_l + in_m) if low_rank_left else out_l * in_m
        total += spec.r * (out_k + in_n) if spec.r < max(out_k, in_n) / 2 else out_k * in_n
    return shape.layers * total
