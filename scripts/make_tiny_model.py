#!/usr/bin/env python3
"""Build a tiny causal LM offline: random-init weights, a byte-level BPE tokenizer trained with
`tokenizers` on the demo data, and a ChatML chat template. Used by `make demo` and the tests.

    python scripts/make_tiny_model.py models/tiny [--arch llama|qwen2] [--hidden 64] [--layers 2]
    python scripts/make_tiny_model.py models/demo-init --demo    (the demo base, before pre-training)

Weights are drawn with std 0.2 by default (not the usual 0.02): a 64-wide random model with the usual
scale cannot produce confident logits through its frozen output head, so no PEFT method could lower
its loss far on it; at 0.2 a few steps visibly teach the tests' models. The demo base is different:
it starts at the usual 0.02 and is pre-trained on `--corpus` text (recipes/demo-base.yaml) before any
PEFT method sees it.

The tokenizer, like many real ones (Llama 3, Mistral), has no pad token, so the code path that sets
one is exercised. It registers the chat markers of the built-in templates (ChatML, Llama 3) as
special tokens, so those templates tokenize as they do on real models.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEMO_DATA = ROOT / "recipes" / "data"

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|begin_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
]
CHATML = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)
FILLER = (
    "The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step. "
    "Instruction input output prompt completion text question answer system user assistant. "
    "0 1 2 3 4 5 6 7 8 9 10 11 12 plus minus equals makes comes after before follows precedes."
)


def corpus_texts(data_dir: Path = DEMO_DATA) -> list[str]:
    """Every string in the demo data (and a filler line), to train the BPE merges on."""
    texts = [FILLER]
    for path in sorted(data_dir.glob("*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            texts.extend(_strings(json.loads(line)))
    for path in sorted(data_dir.glob("*.txt")):
        texts.extend(path.read_text(encoding="utf-8").splitlines())
    return texts


def _strings(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []


def build_tokenizer(texts: list[str], vocab_size: int = 640):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>")
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[3:]})
    tokenizer.chat_template = CHATML
    return tokenizer


def build_model(tokenizer, arch: str = "llama", hidden: int = 64, layers: int = 2, seed: int = 0, init: float = 0.2):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    shape = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        pad_token_id=None,
        tie_word_embeddings=False,
        initializer_range=init,
    )
    torch.manual_seed(seed)
    if arch == "llama":
        return LlamaForCausalLM(LlamaConfig(**shape))
    if arch == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**shape))
    raise SystemExit(f"unknown --arch {arch!r} (llama | qwen2)")


def build_tiny_model(
    out_dir: Path,
    arch: str = "llama",
    hidden: int = 64,
    layers: int = 2,
    seed: int = 0,
    init: float = 0.2,
    corpus: tuple[Path, ...] = (),
    vocab: int = 640,
) -> Path:
    out_dir = Path(out_dir)
    extra = [line for path in corpus for line in Path(path).read_text(encoding="utf-8").splitlines()]
    tokenizer = build_tokenizer(corpus_texts() + extra, vocab_size=vocab)
    model = build_model(tokenizer, arch=arch, hidden=hidden, layers=layers, seed=seed, init=init)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


# The demo base (`--demo`): wider and deeper than the tests' models, at the usual init scale, with a
# tokenizer that also knows the general corpus it is pre-trained on (recipes/demo-base.yaml).
DEMO = dict(hidden=128, layers=4, init=0.02, corpus=(DEMO_DATA / "general" / "corpus.txt",), vocab=1024)


def main() -> None:
    import transformers

    transformers.utils.logging.disable_progress_bar()
    parser = argparse.ArgumentParser(description="Build a tiny random-init causal LM for tests and the demo.")
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--arch", default="llama", choices=["llama", "qwen2"])
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--init", type=float, default=0.2, help="std of the random weights")
    parser.add_argument("--corpus", type=Path, action="append", default=[], help="more text for the tokenizer")
    parser.add_argument("--vocab", type=int, default=640, help="tokenizer vocabulary size")
    parser.add_argument("--demo", action="store_true", help="the demo base's shape and tokenizer (overrides the above)")
    args = parser.parse_args()
    shape = dict(hidden=args.hidden, layers=args.layers, init=args.init, corpus=tuple(args.corpus), vocab=args.vocab)
    out = build_tiny_model(args.out_dir, args.arch, seed=args.seed, **(DEMO if args.demo else shape))
    n_params = sum(p.numel() for p in __import__("transformers").AutoModelForCausalLM.from_pretrained(out).parameters())
    print(f"tiny {args.arch} model ({n_params / 1e3:.0f}K params) written to {out}")


if __name__ == "__main__":
    main()
