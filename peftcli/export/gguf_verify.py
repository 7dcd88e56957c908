"""Check a GGUF file the way a user will run it: loaded by llama.cpp (llama-cpp-python), then compared
with transformers on probe texts.

Three things must hold, or the export fails and nothing is kept:
- llama.cpp tokenizes every probe text to the same ids as the transformers tokenizer (BOS and the
  chat markers included): this is what catches a wrong pre-tokenizer;
- the file carries the tokenizer's chat template;
- llama.cpp's logits on those ids match the reference's (the adapter model, as trained) within the
  quantization's tolerance, relative to the largest |logit|. Greedy decoding picks the top logit at
  each step, so the share of positions whose top token agrees is reported beside it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peftcli import console
from peftcli.errors import CheckFailed
from peftcli.export.gguf_convert import Quant, llama_cpp_module
from peftcli.export.merge import PROBE_TEXTS

# Beside merge's probes: text that tells pre-tokenizers apart (contractions, digit runs, spaces and
# newlines, punctuation runs, non-ASCII), as the converter's own pre-tokenizer check does.
TOKENIZER_PROBE = "I've 12345 apples,  they'll\n\n  cost 3.50$ -- don't   worry!!! Ünïcödé 你好 🚀"
NOT_CHECKED = "try another --quant (q8_0, f16); if it persists, report it with the run's recipe.yaml"


@dataclass(frozen=True)
class Probe:
    text: str
    ids: list[int]
    expected: Any  # numpy array (tokens, vocab), float32


@dataclass(frozen=True)
class Verified:
    max_diff: float
    tolerance: float
    greedy_agree: int
    positions: int


def probe_texts(tokenizer) -> list[str]:
    texts = [*PROBE_TEXTS, TOKENIZER_PROBE]
    if tokenizer.chat_template:
        messages = [{"role": "user", "content": "Say hello."}, {"role": "assistant", "content": "Hello!"}]
        texts.append(tokenizer.apply_chat_template(messages, tokenize=False))
    return texts


def reference_probes(model, tokenizer) -> list[Probe]:
    """The reference logits, one unpadded probe at a time (llama.cpp sees no padding either)."""
    import torch

    device = next(model.parameters()).device
    probes = []
    with torch.no_grad():
        for text in probe_texts(tokenizer):
            ids = list(tokenizer(text)["input_ids"])
            logits = model(input_ids=torch.tensor([ids], device=device)).logits[0].float().cpu().numpy()
            probes.append(Probe(text, ids, logits))
    return probes


def load_llama(path: Path, probes: list[Probe], lora: Path | None = None):
    llama_cpp = llama_cpp_module()
    context = max(len(p.ids) for p in probes) + 8
    try:
        return llama_cpp.Llama(
            model_path=str(path),
            n_ctx=context,
            n_batch=context,
            logits_all=True,
            lora_path=str(lora) if lora else None,
            verbose=console.verbose(),
        )
    except (ValueError, RuntimeError) as exc:
        raise CheckFailed(f"llama.cpp cannot load the exported file: {exc}", hint=NOT_CHECKED) from None


def _first_difference(got: list[int], expected: list[int]) -> int:
    return next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b), min(len(got), len(expected)))


def check_tokens(llm, probe: Probe) -> None:
    got = llm.tokenize(probe.text.encode("utf-8"), add_bos=True, special=True)
    if got != probe.ids:
        at = _first_difference(got, probe.ids)
        raise CheckFailed(
            f"llama.cpp tokenizes the probe {probe.text[:40]!r} differently from transformers (from token {at}: "
            f"{got[at : at + 4]} vs {probe.ids[at : at + 4]})",
            hint="the tokenizer's pre-tokenizer or special tokens did not carry over; report it with the "
            "model's tokenizer.json",
        )


def check_chat_template(llm, tokenizer) -> None:
    template = tokenizer.chat_template
    if template and llm.metadata.get("tokenizer.chat_template") != template:
        raise CheckFailed("the exported file does not carry the tokenizer's chat template", hint=NOT_CHECKED)


def verify(path: Path, probes: list[Probe], tokenizer, quant: Quant, floor: float, lora: Path | None = None):
    """Load `path` (with the LoRA adapter `lora`) in llama.cpp and compare; raise CheckFailed on drift.
    `floor`: the tolerance of the reference's own dtype (bf16 references are coarse themselves)."""
    import numpy as np

    what = "adapter" if lora else "model"
    with console.err.status(f"verifying the exported {what} with llama.cpp"):
        llm = load_llama(path, probes, lora)
        try:
            check_chat_template(llm, tokenizer)
            max_diff, allowed, agree, positions = 0.0, 0.0, 0, 0
            for probe in probes:
                check_tokens(llm, probe)
                llm.reset()
                llm.eval(probe.ids)
                got = np.array(llm.scores[: len(probe.ids)], dtype=np.float32)
                expected = probe.expected
                scale = max(1.0, float(np.abs(expected).max()))
                diff = float(np.abs(got - expected).max())
                if not diff <= max(quant.tolerance, floor) * scale:  # also catches NaN
                    raise CheckFailed(
                        f"llama.cpp's logits differ from transformers' by {diff:.3g} on the probe "
                        f"{probe.text[:40]!r} (tolerance {max(quant.tolerance, floor) * scale:.3g} for {quant.name}); "
                        "nothing was written",
                        hint=NOT_CHECKED,
                    )
                max_diff, allowed = max(max_diff, diff), max(allowed, max(quant.tolerance, floor) * scale)
                agree += int((got.argmax(-1) == expected.argmax(-1)).sum())
                positions += len(probe.ids)
        finally:
            llm.close()
    return Verified(max_diff, allowed, agree, positions)
