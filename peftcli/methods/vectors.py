"""Methods that train scaling vectors or norms, the fewest parameters: IA3, VeRA, LayerNorm tuning."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from peftcli.errors import UserError
from peftcli.methods.base import DecoderShape, InputDropout, MethodContext, MethodSpec, chosen_linears, via_peft
from peftcli.methods.targets import FEEDFORWARD_OUT, NormModules, TargetModules, resolve_targets
from peftcli.strict import Float, Int, PositiveInt


class Ia3Spec(MethodSpec):
    method: Literal["ia3"]
    target_modules: TargetModules = "all-linear"
    feedforward_modules: Literal["auto"] | list[str] = Field(
        "auto", description="Targets whose input (not output) is scaled; auto = the MLP down-projection."
    )


def _ia3_feedforward(spec: Ia3Spec, model, ctx: MethodContext) -> dict:
    # An explicit subset of the targets (possibly empty) is always passed: peft cannot reload an IA3
    # adapter whose default feedforward module is missing from its targets.
    targets = resolve_targets(spec.target_modules, model)
    if spec.feedforward_modules == "auto":
        return {"feedforward_modules": [t for t in targets if t in FEEDFORWARD_OUT]}
    outside = [f for f in spec.feedforward_modules if f not in targets]
    if outside:
        raise UserError(f"peft.feedforward_modules {outside} are not in peft.target_modules {targets}")
    return {"feedforward_modules": list(spec.feedforward_modules)}


apply_ia3 = via_peft("IA3Config", extra=_ia3_feedforward)


class VeraSpec(MethodSpec):
    method: Literal["vera"]
    r: PositiveInt = Field(256, description="Rank of the shared random projections.")
    dropout: InputDropout = 0.0
    d_initial: Float = Field(0.1, description="Initial value of the trained scaling vector d.")
    projection_prng_key: Int = Field(0, description="Seed of the frozen random projections.")
    save_projection: bool = Field(True, description="Store the projections in the adapter (else regenerate).")
    target_modules: TargetModules = "all-linear"


apply_vera = via_peft("VeraConfig", rename={"dropout": "vera_dropout"})


class LnTuningSpec(MethodSpec):
    method: Literal["ln_tuning"]
    target_modules: NormModules = Field("all-norms", description="Norm layers to train (all-norms or names).")


apply_ln_tuning = via_peft("LNTuningConfig", targets="norm")


def count_ia3(spec: Ia3Spec, shape: DecoderShape) -> int:
    # One scale per input feature of a feedforward (output) layer, per output feature elsewhere.
    chosen = chosen_linears(spec, shape)
    feedforward = FEEDFORWARD_OUT if spec.feedforward_modules == "auto" else spec.feedforward_modules
    return shape.layers * sum(a if name in feedforward else b for name, (a, b) in chosen.items())


def count_vera(spec: VeraSpec, shape: DecoderShape) -> int:
    # The shared projections are frozen; each layer trains a scale per output feature and per rank.
    return shape.layers * sum(b + spec.r for _, b in chosen_linears(spec, shape).values())


def count_ln_tuning(spec: LnTuningSpec, shape: DecoderShape) -> int:
    return (2 * shape.layers + 1) * shape.hidden  # two norms per block and the final one
