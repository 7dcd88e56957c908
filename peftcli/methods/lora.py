"""LoRA and its variants: DoRA, rsLoRA, PiSSA/OLoRA/LoftQ initialisation, and AdaLoRA."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from peftcli.errors import UserError
from peftcli.methods.base import DecoderShape, InputDropout, MethodContext, MethodSpec, chosen_linears, via_peft
from peftcli.methods.targets import TargetModules
from peftcli.strict import NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt, Probability

# Our names for peft's `init_lora_weights`; "default" is peft's True (B = 0, so step 0 = the base).
_INIT = {"default": True, "gaussian": "gaussian", "pissa": "pissa", "olora": "olora", "loftq": "loftq"}
# Initialisations that rewrite the base weights (W -> W - BA) and so must be converted back to a
# plain LoRA against the original base when the adapter is saved.
_REWRITES_BASE = ("pissa", "olora")


class LoraSpec(MethodSpec):
    method: Literal["lora", "dora"] = "lora"
    r: PositiveInt = Field(8, description="Rank of the low-rank update.")
    alpha: PositiveFloat = Field(16, description="Scaling numerator: the update is scaled by alpha/r.")
    dropout: InputDropout = 0.05
    target_modules: TargetModules = "all-linear"
    use_dora: bool = Field(False, description="Weight-decomposed LoRA (DoRA).")
    use_rslora: bool = Field(False, description="Rank-stabilised scaling alpha/sqrt(r).")
    init: Literal["default", "gaussian", "pissa", "olora", "loftq"] = Field(
        "default", description="Adapter initialisation (pissa/olora start from the base's principal directions)."
    )
    bias: Literal["none", "all", "lora_only"] = Field(
        "none",
        description="Train biases too: all (every bias of the model) or lora_only (the adapted layers'); then "
        "turning the adapter off no longer gives the base's output.",
    )
    modules_to_save: list[str] | None = Field(
        None, description="Extra modules trained in full and saved with the adapter (e.g. lm_head)."
    )
    layers_to_transform: list[NonNegativeInt] | None = Field(None, description="Only adapt these layer indices.")

    @model_validator(mode="after")
    def _dora_shorthand(self) -> LoraSpec:
        if self.method == "dora":
            if "use_dora" in self.model_fields_set and not self.use_dora:
                raise ValueError("method 'dora' is LoRA with use_dora: true; drop use_dora: false")
            self.use_dora = True
        return self

    def check_with(self, recipe) -> None:
        if self.init == "pissa" and recipe.quantization is not None:
            raise ValueError(
                "peft.init: pissa initialises from the full-precision weights; remove the quantization "
                "section (or use init: olora, which works on a 4-bit base)"
            )
        if self.init == "loftq" and (recipe.quantization is None or recipe.quantization.bits != 4):
            raise ValueError(
                "peft.init: loftq fits the adapter to the quantization error of a 4-bit base; set quantization.bits: 4"
            )
        if self.init == "loftq" and recipe.model.revision is not None:
            # replace_lora_weights_loftq reads the full-precision shards by model name alone, so a pinned
            # revision would fit the adapter to another revision's weights.
            raise ValueError(
                "peft.init: loftq reads the base weights without model.revision; download that revision "
                "and point model.name at the local folder instead"
            )


def _lora_extra(spec: LoraSpec, model, ctx: MethodContext) -> dict:
    # LoftQ starts from the default init; its A/B are replaced after the model is wrapped (apply_lora).
    return {"init_lora_weights": True if spec.init == "loftq" else _INIT[spec.init]}


_lora = via_peft(
    "LoraConfig", rename={"alpha": "lora_alpha", "dropout": "lora_dropout", "init": None}, extra=_lora_extra
)


def apply_lora(spec: LoraSpec, model, ctx: MethodContext):
    if spec.init == "loftq":
        import torch

        if not torch.cuda.is_available():  # peft's LoftQ kernels assume CUDA
            raise UserError("peft.init: loftq runs on a CUDA GPU only", hint="use init: default (or olora) here")
    peft_model = _lora(spec, model, ctx)
    if spec.init in _REWRITES_BASE:
        peft_model.save_pretrained(ctx.scratch_dir / "initial-adapter")
    if spec.init == "loftq":
        from peft import replace_lora_weights_loftq

        # A and B start as a low-rank fit of (full-precision W - its 4-bit copy), read from the
        # base's safetensors: the adapter begins by undoing the quantization error.
        replace_lora_weights_loftq(peft_model)
    return peft_model


def merge_base_is_dequantized(spec) -> bool:
    """LoftQ adapters correct the 4-bit weights they were fitted to: fold them into those weights
    (dequantized), not into the original full-precision ones, which would count the correction twice."""
    return getattr(spec, "init", None) == "loftq"


def beyond_plain_lora(spec: LoraSpec) -> str | None:
    """What the adapter holds beyond plain low-rank updates of linear layers (any scaling), which is
    all that other engines' LoRA formats (vLLM, llama.cpp) carry; None for a plain LoRA."""
    if spec.use_dora:
        return "DoRA's magnitude vectors"
    if spec.modules_to_save:
        return f"whole trained modules (peft.modules_to_save: {', '.join(spec.modules_to_save)})"
    if spec.bias != "none":
        return f"trained biases (peft.bias: {spec.bias})"
    if spec.init == "loftq":
        return "a LoftQ correction of the 4-bit weights it was fitted to"
    return None


def lora_vllm_unservable(spec: LoraSpec) -> str | None:
    extra = beyond_plain_lora(spec)
    return f"vLLM does not load {extra}" if extra else None


def lora_gguf_unexportable(spec: LoraSpec) -> str | None:
    extra = beyond_plain_lora(spec)
    return f"llama.cpp's adapters do not carry {extra}" if extra else None


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
    dropout: InputDropout = 0.05
    target_modules: TargetModules = "all-linear"
    tinit: NonNegativeInt = Field(0, description="Warm-up steps before ranks are pruned.")
    tfinal: NonNegativeInt = Field(0, description="Final steps at the settled ranks.")
    delta_t: PositiveInt = Field(1, description="Steps between budget re-allocations.")
    beta1: Probability = Field(0.85, description="Smoothing (EMA) of each weight's importance score.")
    beta2: Probability = Field(0.85, description="Smoothing (EMA) of the uncertainty of that score.")
    orth_reg_weight: NonNegativeFloat = Field(0.5, description="Orthogonality regulariser weight.")


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
        def on_train_begin(self, args, state, control, **kwargs):
            # The schedule was built from an estimate of the step count; the trainer now knows the
            # real one (packing, processes, epochs). The rank allocator reads this config live.
            config = model.peft_config[model.active_adapter]
            config.total_step = state.max_steps
            if config.tinit >= state.max_steps - config.tfinal:
                raise UserError(
                    f"peft.tinit ({config.tinit}) + peft.tfinal ({config.tfinal}) leave no budgeting phase in "
                    f"{state.max_steps} training steps",
                    hint="lower tinit/tfinal or train longer",
                )

        # Neither Trainer nor TRL drives AdaLoRA's budget: it must run after the optimizer step and
        # before the gradients are zeroed (on_step_end is too late: the grads are gone).
        def on_optimizer_step(self, args, state, control, **kwargs):
            model.base_model.update_and_allocate(state.global_step)

    return [ReallocateRanks()]


def _saved_in_full(spec, shape: DecoderShape) -> int:
    """`modules_to_save` trained in full: the head or the embeddings (vocab x hidden each)."""
    saved = getattr(spec, "modules_to_save", None) or []
    return sum(shape.vocab * shape.hidden for name in saved if name in ("lm_head", "embed_tokens"))


def count_lora(spec: LoraSpec, shape: DecoderShape) -> int:
    chosen = chosen_linears(spec, shape)
    per_block = sum(spec.r * (a + b) for a, b in chosen.values())
    if spec.use_dora:  # one magnitude per output feature
        per_block += sum(b for _, b in chosen.values())
    layers = len(spec.layers_to_transform) if spec.layers_to_transform else shape.layers
    return layers * per_block + _saved_in_full(spec, shape)


def count_adalora(spec: AdaLoraSpec, shape: DecoderShape) -> int:
    # A (r x in), B (out x r), the singular values E (r) and the rank counter, at the starting rank.
    return shape.layers * sum(spec.init_r * (a + b + 1) + 1 for a, b in chosen_linears(spec, shape).values())


def lora_uncombinable(spec: LoraSpec) -> str | None:
    return "its DoRA magnitude vectors cannot be combined" if spec.use_dora else None
