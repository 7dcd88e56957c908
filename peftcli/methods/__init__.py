"""The method registry: every `peft.method` a recipe can name, in one table.

Adding a method is one spec + one apply function in a family module and one row here (plus one
test row). Nothing in this package imports torch or peft at module level, so `peftcli validate`
and `peftcli methods` stay fast.
"""

from __future__ import annotations

from typing import Annotated, Union

from pydantic import Field

from peftcli.methods.base import Method, MethodContext, MethodSpec
from peftcli.methods.full import FreezeSpec, FullSpec, apply_freeze, apply_full, save_full_model
from peftcli.methods.lora import AdaLoraSpec, LoraSpec, adalora_callbacks, apply_adalora, apply_lora, save_lora
from peftcli.methods.lycoris import LohaSpec, LokrSpec, apply_loha, apply_lokr
from peftcli.methods.orthogonal import BoftSpec, OftSpec, apply_boft, apply_oft
from peftcli.methods.prompts import (
    ADAPTION_PROMPT_MODELS,
    SERVE_WITH_PEFT,
    AdaptionPromptSpec,
    PrefixTuningSpec,
    PromptTuningSpec,
    PTuningSpec,
    apply_adaption_prompt,
    apply_p_tuning,
    apply_prefix_tuning,
    apply_prompt_tuning,
)
from peftcli.methods.vectors import Ia3Spec, LnTuningSpec, VeraSpec, apply_ia3, apply_ln_tuning, apply_vera

_ROWS = [
    Method(
        "lora",
        LoraSpec,
        apply_lora,
        "Low-rank update of linear layers; the default choice.",
        mergeable=True,
        quantized_base=True,
        save=save_lora,
    ),
    Method(
        "dora",
        LoraSpec,
        apply_lora,
        "LoRA with weight decomposition (magnitude + direction).",
        mergeable=True,
        quantized_base=True,
        save=save_lora,
    ),
    Method(
        "adalora",
        AdaLoraSpec,
        apply_adalora,
        "LoRA whose rank budget moves to the layers that need it.",
        mergeable=True,
        quantized_base=True,
        callbacks=adalora_callbacks,
        fused_loss=False,
    ),
    Method(
        "ia3",
        Ia3Spec,
        apply_ia3,
        "Learned scaling of activations; the fewest parameters of the weight methods.",
        mergeable=True,
        quantized_base=True,
    ),
    Method(
        "loha",
        LohaSpec,
        apply_loha,
        "Low-rank Hadamard product (LyCORIS); more expressive per parameter.",
        mergeable=True,
        quantized_base=False,
    ),
    Method(
        "lokr",
        LokrSpec,
        apply_lokr,
        "Low-rank Kronecker product (LyCORIS); very compact.",
        mergeable=True,
        quantized_base=False,
    ),
    Method(
        "vera",
        VeraSpec,
        apply_vera,
        "Shared frozen random projections, trained scaling vectors.",
        mergeable=True,
        quantized_base=True,
    ),
    Method(
        "oft",
        OftSpec,
        apply_oft,
        "Orthogonal block rotations of the weights; preserves their geometry.",
        mergeable=True,
        quantized_base=True,
    ),
    Method(
        "boft",
        BoftSpec,
        apply_boft,
        "Butterfly-factored orthogonal rotations; fewer parameters than OFT.",
        mergeable=True,
        quantized_base=True,
    ),
    Method(
        "ln_tuning",
        LnTuningSpec,
        apply_ln_tuning,
        "Trains only the normalisation layers.",
        mergeable=True,
        quantized_base=True,
    ),
    Method(
        "prefix_tuning",
        PrefixTuningSpec,
        apply_prefix_tuning,
        "Learned key/value prefixes at every layer; good for style and format.",
        mergeable=False,
        packing=False,
        quantized_base=True,
        serve_hint="prefix tuning adds learned key/value prefixes at run time, there is no weight to fold "
        "them into; " + SERVE_WITH_PEFT,
    ),
    Method(
        "prompt_tuning",
        PromptTuningSpec,
        apply_prompt_tuning,
        "Learned soft-prompt embeddings; the lightest option on very large models.",
        mergeable=False,
        packing=False,
        quantized_base=True,
        serve_hint="prompt tuning prepends learned embeddings to the input, there is no weight to fold "
        "them into; " + SERVE_WITH_PEFT,
    ),
    Method(
        "p_tuning",
        PTuningSpec,
        apply_p_tuning,
        "Soft prompt produced by a small encoder while training.",
        mergeable=False,
        packing=False,
        quantized_base=True,
        serve_hint="p-tuning prepends learned embeddings to the input, there is no weight to fold them "
        "into; " + SERVE_WITH_PEFT,
    ),
    Method(
        "adaption_prompt",
        AdaptionPromptSpec,
        apply_adaption_prompt,
        "LLaMA-Adapter: gated learned prompts in the top layers' attention (Llama/Mistral).",
        mergeable=False,
        packing=False,
        quantized_base=True,
        model_types=ADAPTION_PROMPT_MODELS,
        fused_loss=False,
        serve_hint="the adaption prompt adds gated attention over learned tokens at run time, there is "
        "no weight to fold it into; " + SERVE_WITH_PEFT,
    ),
    Method(
        "full",
        FullSpec,
        apply_full,
        "Full fine-tune of every weight: the baseline PEFT avoids.",
        mergeable=True,
        quantized_base=False,
        save=save_full_model,
        saves_full_model=True,
    ),
    Method(
        "freeze",
        FreezeSpec,
        apply_freeze,
        "Trains only the last N decoder layers (partial fine-tune).",
        mergeable=True,
        quantized_base=False,
        save=save_full_model,
        saves_full_model=True,
    ),
]

REGISTRY: dict[str, Method] = {row.name: row for row in _ROWS}

# One pydantic union over every spec, told apart by `method`: each method validates only its keys.
PeftSpec = Annotated[
    Union[tuple(dict.fromkeys(row.spec for row in _ROWS))],  # noqa: UP007 (built at runtime)
    Field(discriminator="method"),
]


def method_of(spec: MethodSpec) -> Method:
    return REGISTRY[spec.method]


__all__ = ["REGISTRY", "Method", "MethodContext", "MethodSpec", "PeftSpec", "method_of"]
