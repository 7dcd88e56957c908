"""LyCORIS-style low-rank products: LoHa (Hadamard) and LoKr (Kronecker)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from peftcli.methods.base import MethodSpec, via_peft
from peftcli.methods.targets import TargetModules
from peftcli.spec import Int, PositiveFloat, PositiveInt, Probability


class _ProductKeys(MethodSpec):
    """Keys LoHa and LoKr share."""

    r: PositiveInt = Field(8, description="Rank of the low-rank factors.")
    alpha: PositiveFloat = Field(8, description="Scaling numerator.")
    rank_dropout: Probability = 0.0
    module_dropout: Probability = 0.0
    target_modules: TargetModules = "all-linear"


class LohaSpec(_ProductKeys):
    method: Literal["loha"]


class LokrSpec(_ProductKeys):
    method: Literal["lokr"]
    decompose_both: bool = Field(False, description="Low-rank decompose the left factor too.")
    decompose_factor: Int = Field(-1, description="Kronecker factor size; -1 picks it from the shape.")


apply_loha = via_peft("LoHaConfig")
apply_lokr = via_peft("LoKrConfig")
