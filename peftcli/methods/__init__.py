"""The method registry: every `peft.method` a recipe can name, in one table.

Adding a method is one spec, one apply function and one parameter count in a family module, and
one row here that states every per-method fact the other stages ask (nothing outside this package
switches on a method name; tests/test_registry.py checks that). Nothing in this package imports
torch or peft at module level, so `peftcli validate` and `peftcli methods` stay fast.
"""

from __future__ import annotations

from typing import Annotated, Union

from pydantic import Field

from peftcli.methods.base import DEFAULT_LEARNING_RATE, DecoderShape, Method, MethodContext, MethodSpec
from peftcli.methods.full import (
    FreezeSpec,
    FullSpec,
    apply_freeze,
    apply_full,
    count_freeze,
    count_full,
    save_full_model,
)
from peftcli.methods.lora import (
    AdaLoraSpec,
    LoraSpec,
    adalora_callbacks,
    apply_adalora,
    apply_lora,
    count_adalora,
    count_lora,
    lora_gguf_unexportable,
    lora_uncombinable,
    lora_vllm_unservable,
    merge_base_is_dequantized,
    save_lora,
)
from peftcli.methods.lycoris import LohaSpec, LokrSpec, apply_loha, apply_lokr, count_loha, count_lokr
from peftcli.methods.orthogonal import BoftSpec, OftSpec, apply_boft, apply_oft, count_boft, count_oft
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
    count_adaption_prompt,
    count_p_tuning,
    count_prefix_tuning,
    count_prompt_tuning,
)
from peftcli.methods.vectors import (
    Ia3Spec,
    LnTuningSpec,
    VeraSpec,
    apply_ia3,
    apply_ln_tuning,
    apply_vera,
    count_ia3,
    count_ln_tuning,
    count_vera,
)

_ROWS = [
    Method(
        "lora",
        LoraSpec,
        apply_lora,
        "Low-rank update of linear layers; the default choice.",
        mergeable=True,
        count_trainable=count_lora,
        quantized_base=True,
        save=save_lora,
        combines_as="low_rank",
        uncombinable=lora_uncombinable,
        attach_group="lora",
        merges_into_dequantized=merge_base_is_dequantized,
        vllm_unservable=lora_vllm_unservable,
        gguf_adapter_unexportable=lora_gguf_unexportable,
    ),
    Method(
        "dora",
        LoraSpec,
        apply_lora,
        "LoRA with weight decomposition (magnitude + direction).",
        mergeable=True,
        count_trainable=count_lora,
        quantized_base=True,
        save=save_lora,
        combines_as="low_rank",
        uncombinable=lora_uncombinable,
        attach_group="lora",
        merges_into_dequantized=merge_base_is_dequantized,
        vllm_unservable=lora_vllm_unservable,
        gguf_adapter_unexportable=lora_gguf_unexportable,
    ),
    Method(
        "adalora",
        AdaLoraSpec,
        apply_adalora,
        "LoRA whose rank budget moves to the layers that need it.",
        mergeable=True,
        count_trainable=count_adalora,
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
        count_trainable=count_ia3,
        quantized_base=True,
        learning_rate=3e-3,
        combines_as="scaling",
    ),
    Method(
        "loha",
        LohaSpec,
        apply_loha,
        "Low-rank Hadamard product (LyCORIS); more expressive per parameter.",
        mergeable=True,
        count_trainable=count_loha,
        quantized_base=False,
        why_no_quantized_base="PEFT's LoHa has no 4-bit or 8-bit (bitsandbytes) layer",
    ),
    Method(
        "lokr",
        LokrSpec,
        apply_lokr,
        "Low-rank Kronecker product (LyCORIS); very compact.",
        mergeable=True,
        count_trainable=count_lokr,
        quantized_base=False,
        why_no_quantized_base="PEFT's LoKr has no 4-bit or 8-bit (bitsandbytes) layer",
    ),
    Method(
        "vera",
        VeraSpec,
        apply_vera,
        "Shared frozen random projections, trained scaling vectors.",
        mergeable=True,
        count_trainable=count_vera,
        quantized_base=True,
        learning_rate=3e-3,
    ),
    Method(
        "oft",
        OftSpec,
        apply_oft,
        "Orthogonal block rotations of the weights; preserves their geometry.",
        mergeable=True,
        count_trainable=count_oft,
        quantized_base=True,
    ),
    Method(
        "boft",
        BoftSpec,
        apply_boft,
        "Butterfly-factored orthogonal rotations; fewer parameters than OFT.",
        mergeable=True,
        count_trainable=count_boft,
        quantized_base=True,
    ),
    Method(
        "ln_tuning",
        LnTuningSpec,
        apply_ln_tuning,
        "Trains only the normalisation layers.",
        mergeable=True,
        count_trainable=count_ln_tuning,
        quantized_base=True,
        learning_rate=3e-3,
    ),
    Method(
        "prefix_tuning",
        PrefixTuningSpec,
        apply_prefix_tuning,
        "Learned key/value prefixes at every layer; good for style and format.",
        mergeable=False,
        packing=False,
        count_trainable=count_prefix_tuning,
        quantized_base=True,
        serve_hint="prefix tuning adds learned key/value prefixes at run time, there is no weight to fold "
        "them into; " + SERVE_WITH_PEFT,
        learning_rate=1e-2,
        checkpointing=False,
    ),
    Method(
        "prompt_tuning",
        PromptTuningSpec,
        apply_prompt_tuning,
        "Learned soft-prompt embeddings; the lightest option on very large models.",
        mergeable=False,
        packing=False,
        count_trainable=count_prompt_tuning,
        quantized_base=True,
        serve_hint="prompt tuning prepends learned embeddings to the input, there is no weight to fold "
        "them into; " + SERVE_WITH_PEFT,
        learning_rate=3e-2,
    ),
    Method(
        "p_tuning",
        PTuningSpec,
        apply_p_tuning,
        "Soft prompt produced by a small encoder while training.",
        mergeable=False,
        packing=False,
        count_trainable=count_p_tuning,
        quantized_base=True,
        serve_hint="p-tuning prepends learned embeddings to the input, there is no weight to fold them "
        "into; " + SERVE_WITH_PEFT,
        learning_rate=1e-2,
    ),
    Method(
        "adaption_prompt",
        AdaptionPromptSpec,
        apply_adaption_prompt,
        "LLaMA-Adapter: gated learned prompts in the top layers' attention (Llama/Mistral).",
        mergeable=False,
        packing=False,
        count_trainable=count_adaption_prompt,
        quantized_base=True,
        model_types=ADAPTION_PROMPT_MODELS,
        fused_loss=False,
        serve_hint="the adaption prompt adds gated attention over learned tokens at run time, there is "
        "no weight to fold it into; " + SERVE_WITH_PEFT,
        learning_rate=1e-2,
    ),
    Method(
        "full",
        FullSpec,
        apply_full,
        "Full fine-tune of every weight: the baseline PEFT avoids.",
        mergeable=True,
        count_trainable=count_full,
        quantized_base=False,
        why_no_quantized_base="it updates the base weights themselves, and 4-bit or 8-bit weights cannot be trained",
        save=save_full_model,
        saves_full_model=True,
        learning_rate=2e-5,
    ),
    Method(
        "freeze",
        FreezeSpec,
        apply_freeze,
        "Trains only the last N decoder layers (partial fine-tune).",
        mergeable=True,
        count_trainable=count_freeze,
        quantized_base=False,
        why_no_quantized_base="it updates the last layers' weights themselves, and 4-bit or 8-bit weights cannot "
        "be trained",
        save=save_full_model,
        saves_full_model=True,
        learning_rate=5e-5,
    ),
]

REGISTRY: dict[str, Method] = {row.name: row for row in _ROWS}
# What a recipe's peft section without `method` means, and what `init` writes by default.
DEFAULT_METHOD = "lora"


def spec_union() -> object:
    """One pydantic union over every spec in the registry, told apart by `method`: each method
    validates only its keys."""
    specs = tuple(dict.fromkeys(row.spec for row in REGISTRY.values()))
    return Annotated[Union[specs], Field(discriminator="method")]  # noqa: UP007 (built at runtime)


PeftSpec = spec_union()


def register(method: Method) -> None:
    """Add (or replace) a registry row at run time; `peftcli.recipe.schema.rebuild()` then lets
    recipes name it. The rows above are the shipped methods."""
    REGISTRY[method.name] = method


def unregister(name: str) -> None:
    REGISTRY.pop(name, None)


def method_of(spec: MethodSpec) -> Method:
    return REGISTRY[spec.method]


__all__ = [
    "DEFAULT_LEARNING_RATE",
    "DEFAULT_METHOD",
    "REGISTRY",
    "DecoderShape",
    "Method",
    "MethodContext",
    "MethodSpec",
    "PeftSpec",
    "method_of",
    "register",
    "spec_union",
    "unregister",
]
