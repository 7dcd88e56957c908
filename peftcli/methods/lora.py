"""LoRA and its variants: DoRA, rsLoRA, PiSSA/OLoRA/LoftQ initialisation, and AdaLoRA."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, model_validator

from peftcli.errors import UserError
from peftcli.methods.base import MethodContext, MethodSpec, via_peft
from peftcli.methods.targets import TargetModules
from peftcli.spec import PositiveFloat, PositiveInt, Probability

# Our names for peft's `init_lora_weights`; "default" is peft's True (B = 0, so step 0 = the base).
_INIT = {"default": True, "gaussian": "gaussian", "pissa": "pissa", "olora": "olora", "loftq": "loftq"}
# Initialisations that rewrite the base weights (W -> W - BA) and so must be converted back to a
# plain LoRA against the original base when the adapter is saved.
_REWRITES_BASE = ("pissa", "olora")


class LoraSpec(MethodSpec):
    method: Literal["lora", "dora"] = "lora"
    r: PositiveInt = Field(8, description="Rank of the low-rank update.")
    alpha: PositiveFloat = Field(16, description="Scaling numerator: the update is scaled by alpha/r.")
    dropout: Probability = Field(0.05, description="Dropout on the LoRA input.")
    target_modules: TargetModules = "all-linear"
    use_dora: bool = Field(False, description="Weight-decomposed LoRA (DoRA).")
    use_rslora: bool = Field(False, description="Rank-stabilised scaling alpha/sqrt(r).")
    init: Literal["default", "gaussian", "pissa", "olora", "loftq"] = Field(
        "default", description="Adapter initialisation (pissa/olora start from the base's principal directions)."
    )
    bias: Literal["none", "all", "lora_only"] = "none"
    modules_to_save: list[str] | None = Field(
        None, description="Extra modules trained in full and saved with the adapter (e.g. lm_head)."
    )
    layers_to_transform: list[Annotated[int, Field(ge=0)]] | None = Field(
        None, description="Only adapt these layer indices."
    )

    @model_validator(mode="after")
    def _dora_shorthand(self) -> LoraSpec:
        if self.method == "dora":
            if "use_dora" in self.model_fields_set and not self.use_dora:
                raise ValueError("method 'dora' is LoRA with use_dora: true; drop use_dora: false")
            self.use_dora = True
        return self

    def check_with(self, recipe) -> None:
        if self.init in ("pissa", "loftq") and recipe.quantization is not None:
            raise ValueError(
                f"peft.init: {self.init} initialises from the full-precision weights; remove the quantization "
                f"section (loftq quantises the base itself)"
            )


def _lora_extra(spec: LoraSpec, model, ctx: MethodContext) -> dict:
    extra = {"init_lora_weights": _INIT[spec.init]}
    if spec.init == "loftq":
        import importlib.util

        import torch

        if not torch.cuda.is_available() or importlib.util.find_spec("scipy") is None:
            raise UserError("peft.init: loftq runs on a CUDA GPU and needs scipy", hint="use init: pissa or default")
        from peft import LoftQConfig

        extra["loftq_config"] = LoftQConfig(loftq_bits=4)
    return extra


_lora = via_peft(
    "LoraConfig", rename={"alpha": "lora_alpha", "dropout": "lora_dropout", "init": None}, extra=_lora_extra
)


def apply_lora(spec: LoraSpec, model, ctx: MethodContext):
    peft_model = _lora(spec, model, ctx)
    if spec.init in _REWRITES_BASE:
        peft_model.save_pretrained(ctx.scratch_dir / "initial-adapter")
    return peft_model


def save_lora(spec: LoraSpec, model, out: Path, ctx: MethodContext) -> None:
    if spec.init in _REWRITES_BASE:
        # Turn the adapter into a plain LoRA (rank doubled) that applies to the *original* base, so
        # `PeftModel.from_pretrained(base, adapter)` works without re-running the initialisation.
        model.save_pretrained(out, path_initial_model_for_weight_conversion=str(ctx.scratch_dir / "initial-adapter"))
    else:
        model.save_pretrained(out)


class AdaLoraSpec(MethodSpec):
    method: Literal["adalora"]
    init_r: PositiveInt = Field(12, description="Starting rank of every adapted layer.")
    target_r: PositiveInt = Field(8, description="Average rank after budget re-allocation.")
    alpha: PositiveFloat = Field(16, description="Scaling numerator.")
    dropout: Probability = 0.05
    target_modules: TargetModules = "all-linear"
    tinit: Annotated[int, Field(ge=0)] = Field(0, description="Warm-up steps before ranks are pruned.")
    tfinal: Annotated[int, Field(ge=0)] = Field(0, description="Final steps at the settled ranks.")
    delta_t: PositiveInt = Field(1, description="Steps between budget re-allocations.")
    beta1: Probability = 0.85
    beta2: Probability = 0.85
    orth_reg_weight: Annotated[float, Field(ge=0)] = Field(0.5, description="Orthogonality regulariser weight.")


def _adalora_budget(spec: AdaLoraSpec, model, ctx: MethodContext) -> dict:
    if spec.tinit >= ctx.total_steps - spec.tfinal:
        raise UserError(
            f"peft.tinit ({spec.tinit}) + peft.tfinal ({spec.tfinal}) leave no budgeting phase in "
            f"{ctx.total_steps} training steps",
            hint="lower tinit/tfinal or train longer",
        )
    return {"total_step": ctx.total_steps}


apply_adalora = via_peft(
    "AdaLoraConfig",
    rename={"alpha": "lora_alpha", "dropout": "lora_dropout", "delta_t": "deltaT"},
    extra=_adalora_budget,
)


def adalora_callbacks(model) -> list:
    from transformers import TrainerCallback

    class ReallocateRanks(TrainerCallback):
        # Neither Trainer nor TRL drives AdaLoRA's budget: it must run after the optimizer step and
        # before the gradients are zeroed (on_step_end is too late: the grads are gone).
        def on_optimizer_step(self, args, state, control, **kwargs):
            model.base_model.update_and_allocate(state.global_step)

    return [ReallocateRanks()]
