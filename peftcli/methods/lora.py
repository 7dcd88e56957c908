"""LoRA and its variants (DoRA, rsLoRA, PiSSA/OLoRA/LoftQ initialisation)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from peftcli.methods.base import MethodSpec
from peftcli.methods.targets import TargetModules, resolve_targets
from peftcli.spec import PositiveFloat, PositiveInt, Probability

# Our names for peft's `init_lora_weights` values; "default" is peft's `True` (B = 0, so step 0 = base).
_INIT = {"default": True, "gaussian": "gaussian", "pissa": "pissa", "olora": "olora", "loftq": "loftq"}


class LoraSpec(MethodSpec):
    method: Literal["lora", "dora"] = "lora"
    r: PositiveInt = Field(8, description="Rank of the low-rank update.")
    alpha: PositiveFloat = Field(16, description="Scaling numerator: the update is scaled by alpha/r.")
    dropout: Probability = Field(0.05, description="Dropout on the LoRA input.")
    target_modules: TargetModules = "all-linear"
    use_dora: bool = Field(False, description="Weight-decomposed LoRA (DoRA).")
    use_rslora: bool = Field(False, description="Rank-stabilised scaling alpha/sqrt(r).")
    init: Literal["default", "gaussian", "pissa", "olora", "loftq"] = Field(
        "default", description="Adapter initialisation."
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


def apply_lora(spec: LoraSpec, model):
    from peft import LoraConfig, get_peft_model

    init = _INIT[spec.init]
    extra = {}
    if spec.init == "loftq":
        from peft import LoftQConfig

        # LoftQ quantises the base itself while initialising the adapter: it expects a full-precision base.
        extra["loftq_config"] = LoftQConfig(loftq_bits=4)
    config = LoraConfig(
        task_type="CAUSAL_LM",
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=resolve_targets(spec.target_modules, model),
        use_dora=spec.use_dora,
        use_rslora=spec.use_rslora,
        init_lora_weights=init,
        bias=spec.bias,
        modules_to_save=spec.modules_to_save,
        layers_to_transform=spec.layers_to_transform,
        **extra,
    )
    return get_peft_model(model, config)
