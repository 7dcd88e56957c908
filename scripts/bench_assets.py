"""The bench's model and data (scripts/bench.py): a random-init model of a config's shape with a
BPE tokenizer trained on the data, and synthetic chat rows whose lengths spread like real chat."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path


def synthetic_rows(n: int, max_length: int, seed: int = 0) -> list[dict]:
    """Chat rows of pseudo-words; prompt and reply lengths are log-normal (median ~40 and ~120 words)."""
    rng = random.Random(seed)
    syllables = ["ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "ze", "pa", "qu", "di", "fe", "go", "hu"]
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))) for _ in range(2000)]
    budget = int(max_length * 0.55)  # words; ~1.5 tokens each with the chat markers, so rows fit or just overflow

    def text(median: float, sigma: float) -> str:
        count = max(1, min(budget, int(rng.lognormvariate(math.log(median), sigma))))
        return " ".join(rng.choice(words) for _ in range(count))

    return [
        {"messages": [{"role": "user", "content": text(40, 0.8)}, {"role": "assistant", "content": text(120, 0.9)}]}
        for _ in range(n)
    ]


def build_assets(config: dict, work: Path) -> tuple[Path, Path]:
    """The random-init model (+ tokenizer) and the training data for a bench config, built once per work dir."""
    model_dir, data = work / "model", work / "train.jsonl"
    if (model_dir / "config.json").exists() and data.exists():
        return model_dir, data
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    work.mkdir(parents=True, exist_ok=True)
    rows = synthetic_rows(config["batch_size"] * config["steps"] * 3, config["max_length"])
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(
        (m["content"] for r in rows for m in r["messages"]),
        trainers.BpeTrainer(
            vocab_size=min(config["vocab"], 8192),
            special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tokenizer.chat_template = (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    tokenizer.save_pretrained(model_dir)

    shape = LlamaConfig(
        vocab_size=max(config["vocab"], len(tokenizer)),
        max_position_embeddings=8192,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **config["shape"],
    )
    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda else torch.float32
    torch.manual_seed(0)
    with torch.device("cuda" if cuda else "cpu"):
        model = AutoModelForCausalLM.from_config(shape, dtype=dtype)
    model.save_pretrained(model_dir)
    del model
    return model_dir, data
