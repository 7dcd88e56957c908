"""Methods that add learned tokens or prompts instead of changing weights: prefix tuning, prompt
tuning, P-tuning, and LLaMA-Adapter (adaption prompt). None can be merged into the weights."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from peftcli.errors import UserError
from peftcli.methods.base import DecoderShape, MethodContext, MethodSpec, via_peft
from peftcli.strict import Int, PositiveInt, Probability

SERVE_WITH_PEFT = (
    "serve it with the base model and PEFT: PeftModel.from_pretrained(base, 'RUN/adapter') "
    "(or `peftcli generate --base MODEL --adapter NAME=RUN`)"
)
VirtualTokens = Field(16, gt=0, description="Learned tokens prepended to every input.")


class PrefixTuningSpec(MethodSpec):
    method: Literal["prefix_tuning"]
    num_virtual_tokens: Int = VirtualTokens
    prefix_projection: bool = Field(False, description="Reparametrise the prefix through an MLP while training.")
    encoder_hidden_size: PositiveInt | None = Field(None, description="Hidden size of that MLP.")

    def check_with(self, recipe) -> None:
        if recipe.training.gradient_checkpointing is True:
            raise ValueError("peft.method prefix_tuning does not work with training.gradient_checkpointing: true")


apply_prefix_tuning = via_peft("PrefixTuningConfig")


class PromptTuningSpec(MethodSpec):
    method: Literal["prompt_tuning"]
    num_virtual_tokens: Int = VirtualTokens
    init: Literal["random", "text", "sample_vocab"] = Field(
        "random", description="Start from random vectors, the embeddings of init_text, or random vocabulary rows."
    )
    init_text: str | None = Field(None, description="Text whose token embeddings start the prompt (init: text).")

    @model_validator(mode="after")
    def _text_init(self) -> PromptTuningSpec:
        if self.init == "text" and not self.init_text:
            raise ValueError("init: text needs init_text (e.g. 'Answer the question concisely.')")
        if self.init != "text" and self.init_text:
            raise ValueError("init_text is used only with init: text")
        return self


def _prompt_init(spec: PromptTuningSpec, model, ctx: MethodContext) -> dict:
    text = {"prompt_tuning_init_text": spec.init_text, "tokenizer_name_or_path": ctx.tokenizer_path}
    return {"prompt_tuning_init": spec.init.upper(), **(text if spec.init == "text" else {})}


apply_prompt_tuning = via_peft("PromptTuningConfig", rename={"init": None, "init_text": None}, extra=_prompt_init)


class PTuningSpec(MethodSpec):
    method: Literal["p_tuning"]
    num_virtual_tokens: Int = VirtualTokens
    encoder: Literal["mlp", "lstm"] = Field("mlp", description="Prompt encoder used while training.")
    encoder_hidden_size: PositiveInt | None = Field(None, description="Encoder width (default: the model's).")
    encoder_num_layers: PositiveInt = Field(2, description="LSTM layers (mlp has a fixed shape).")
    encoder_dropout: Probability = Field(0.0, description="Dropout inside the prompt encoder.")


apply_p_tuning = via_peft(
    "PromptEncoderConfig",
    rename={"encoder": None},
    extra=lambda spec, model, ctx: {"encoder_reparameterization_type": spec.encoder.upper()},
)


class AdaptionPromptSpec(MethodSpec):
    method: Literal["adaption_prompt"]
    adapter_len: PositiveInt = Field(10, description="Learned prompt tokens per adapted layer.")
    adapter_layers: PositiveInt | None = Field(None, description="Adapt the top N layers (default: all).")


ADAPTION_PROMPT_MODELS = frozenset({"llama", "mistral"})


def _adapter_layers(spec: AdaptionPromptSpec, model, ctx: MethodContext) -> dict:
    layers = model.config.num_hidden_layers
    if spec.adapter_layers is not None and spec.adapter_layers > layers:
        raise UserError(f"peft.adapter_layers ({spec.adapter_layers}) exceeds the model's {layers} layers")
    return {"adapter_layers": spec.adapter_layers or layers}


apply_adaption_prompt = via_peft("AdaptionPromptConfig", extra=_adapter_layers)


def count_prefix_tuning(spec: PrefixTuningSpec, shape: DecoderShape) -> int:
    token = shape.kv_heads * shape.head_dim
    kv = 2 * shape.layers * token  # a key and a value per layer, per virtual token
    if not spec.prefix_projection:
        return spec.num_virtual_tokens * kv
    width = spec.encoder_hidden_size or token
    # token embeddings, then an MLP token -> width -> all layers' keys and values
    return spec.num_virtual_tokens * token + token * width + width + width * kv + kv


def count_prompt_tuning(spec: PromptTuningSpec, shape: DecoderShape) -> int:
    return spec.num_virtual_tokens * shape.hidden


def count_p_tuning(spec: PTuningSpec, shape: DecoderShape) -> int:
    h, width = shape.hidden, spec.encoder_hidden_size or shape.hidden
    embeddings = spec.num_virtual_tokens * h
    if spec.encoder == "mlp":  # h -> width -> width -> h
        return embeddings + (h * width + width) + (width * width + width) + (width * h + h)
    # a bidirectional LSTM of `width` per direction, then an MLP 2 width -> 2 width -> h
    lstm, inputs = 0, h
    for _ in range(spec.encoder_num_layers):
        lstm += 2 * 4 * width * (inputs + width + 2)
        inputs = 2 * width
    return embeddings + lstm + (4 * width * width + 2 * width) + (2 * width * h + h)


def count_adaption_prompt(spec: AdaptionPromptSpec, shape: DecoderShape) -> int:
    # per adapted layer: the learned prompt tokens and one gate
    return (spec.adapter_layers or shape.layers) * (spec.adapter_len * shape.hidden + 1)
