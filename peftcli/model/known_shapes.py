"""config.json shapes of the hub models the shipped recipes (recipes/*.yaml) train, so `validate` and
`train`'s pre-flight can estimate memory and check the context length before anything is
downloaded. Only what the fit estimate and the checks read; copied from each model's config.json
on the hub. A model in the local Hugging Face cache is read from there instead (model/checks.py).
"""

from __future__ import annotations

QWEN2_5_0_5B = {
    "model_type": "qwen2",
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "vocab_size": 151936,
    "tie_word_embeddings": True,
    "max_position_embeddings": 32768,
}
LLAMA_3_1_8B = {
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "tie_word_embeddings": False,
    "max_position_embeddings": 131072,
}
MISTRAL_7B_V0_3 = {
    "model_type": "mistral",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 32768,
    "tie_word_embeddings": False,
    "max_position_embeddings": 32768,
}

# Hub ids (lower case: the hub resolves them case-insensitively) -> shape; a base model and its
# instruct variant share one.
KNOWN_SHAPES: dict[str, dict] = {
    "qwen/qwen2.5-0.5b": QWEN2_5_0_5B,
    "qwen/qwen2.5-0.5b-instruct": QWEN2_5_0_5B,
    "meta-llama/llama-3.1-8b": LLAMA_3_1_8B,
    "meta-llama/llama-3.1-8b-instruct": LLAMA_3_1_8B,
    "meta-llama/meta-llama-3.1-8b": LLAMA_3_1_8B,
    "meta-llama/meta-llama-3.1-8b-instruct": LLAMA_3_1_8B,
    "mistralai/mistral-7b-v0.3": MISTRAL_7B_V0_3,
    "mistralai/mistral-7b-instruct-v0.3": MISTRAL_7B_V0_3,
}


def known_shape(hub_id: str) -> dict | None:
    """A copy of the shipped shape of `hub_id`, or None."""
    shape = KNOWN_SHAPES.get(hub_id.strip().lower())
    return dict(shape) if shape is not None else None
