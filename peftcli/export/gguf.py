"""`peftcli export RUN --format gguf --out FILE`: a run (its adapter merged on the fly) or a merged
model folder as one GGUF file for llama.cpp and ollama, verified before it is kept.

The steps, all in a staging folder beside FILE: load the run as `merge` does (a QLoRA run onto its
base unquantized), take the reference logits of the adapter model on probe texts, fold the adapter
in and save a plain Hugging Face folder with the run's tokenizer (its chat template included),
convert it with llama.cpp's converter (gguf_convert.py), then load the file with llama.cpp and
compare token ids and logits with the reference (gguf_verify.py). Only a file that passes is moved
to FILE; a drift exits 1 and leaves nothing behind.

`--adapter-only` writes the LoRA adapter itself as a llama.cpp adapter (gguf_adapter.py), verified
on a GGUF of the base converted in the same staging folder. Which adapters qualify is a registry
fact (`Method.gguf_adapter_unexportable`); which methods can be exported at all is `Method.mergeable`.
"""

from __future__ import annotations

import gc
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from peftcli import console
from peftcli.errors import UserError
from peftcli.export.gguf_adapter import lora_pairs, write_adapter
from peftcli.export.gguf_convert import (
    PEFTCLI_KEY,
    QUANTS,
    Quant,
    conversion_module,
    convert,
    llama_cpp_module,
    model_class,
    quantize,
)
from peftcli.export.gguf_verify import Verified, reference_probes, verify
from peftcli.export.merge import TOLERANCE, output_dtype
from peftcli.methods import method_of
from peftcli.model.checks import check_model_source
from peftcli.model.load import quiet_libraries
from peftcli.rundir import RECIPE, TMP_PREFIX, open_run
from peftcli.rundir.lock import RunLock
from peftcli.rundir.run import check_weights, load_run

ADAPTER_QUANTS = ("f32", "f16")


def written_by_peftcli(path: Path) -> bool:
    """Whether `path` is a GGUF file that peftcli wrote (it carries our key)."""
    try:
        import gguf

        return PEFTCLI_KEY in gguf.GGUFReader(path).fields
    except Exception:  # noqa: BLE001 - not a GGUF file, or an unreadable one: not ours either way
        return False


def check_out_file(out: Path, force: bool, run: Path | None) -> None:
    """--out names a new .gguf file, or (with --force) one that peftcli exported; never inside a run."""
    if out.suffix != ".gguf":
        raise UserError(f"--out {out}: name a .gguf file", hint=f"e.g. --out {out.with_suffix('.gguf').name}")
    if run is not None and run.resolve() in out.parents:
        raise UserError(f"--out {out} lies inside the run {run}", hint="write the file outside the run directory")
    if out.is_dir():
        raise UserError(f"--out {out} is a folder", hint="name the .gguf file to write")
    if out.exists() or out.is_symlink():
        if not written_by_peftcli(out):
            raise UserError(f"--out {out} exists and was not written by peftcli", hint="choose another file name")
        if not force:
            raise UserError(f"--out {out} exists", hint="choose another file name, or add --force to replace it")


@contextmanager
def staging(out: Path) -> Iterator[Path]:
    """A scratch folder beside `out` (same file system: the final move is a rename), always removed."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{out.name}-", dir=out.parent))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def keep(staged: Path, out: Path) -> None:
    os.chmod(staged, 0o644)
    os.replace(staged, out)


def run_export(
    source: Path, out: Path, quant: str = "f16", adapter_only: bool = False, force: bool = False
) -> Verified:
    if quant not in QUANTS or (adapter_only and quant not in ADAPTER_QUANTS):
        choices = ADAPTER_QUANTS if adapter_only else tuple(QUANTS)
        raise UserError(f"--quant {quant!r}: expected one of {', '.join(choices)}")
    source, out = Path(source), Path(out).resolve()
    if (source / RECIPE).is_file():
        return _export_run(source, out, QUANTS[quant], adapter_only, force)
    if (source / "config.json").is_file():
        if adapter_only:
            raise UserError(f"--adapter-only: {source} is a model folder, which holds no adapter", hint="pass a run")
        return _export_folder(source, out, QUANTS[quant], force)
    raise UserError(
        f"{source}: neither a peftcli run (no {RECIPE}) nor a model folder (no config.json)",
        hint="pass the output.dir of `peftcli train`, or a folder written by `peftcli merge`",
    )


def _tools() -> None:
    """Both halves must be installed before any weight loads (exit 2 with the install line)."""
    conversion_module()
    llama_cpp_module()


def _export_run(path: Path, out: Path, quant: Quant, adapter_only: bool, force: bool) -> Verified:
    run = open_run(path)
    recipe = run.recipe()
    method = method_of(recipe.peft)
    if adapter_only:
        why = method.gguf_adapter_unexportable(recipe.peft)
        if why:
            raise UserError(
                f"--adapter-only: peft.method '{method.name}' cannot be written as a llama.cpp adapter: {why}",
                hint="export the merged model instead (drop --adapter-only)",
            )
    elif not method.mergeable:
        raise UserError(
            f"peft.method '{method.name}' cannot be exported to GGUF: it does not fold into the weights",
            hint=method.serve_hint or None,
        )
    check_out_file(out, force, run.path)
    check_model_source(recipe.model)
    _tools()
    if Path(recipe.model.name).is_dir():
        model_class(Path(recipe.model.name))  # an architecture llama.cpp cannot convert: before any weight loads
    quiet_libraries()
    dtype = output_dtype(recipe, "auto")
    base = "dequantized" if method.merges_into_dequantized(recipe.peft) else "full_precision"
    name = f"{run.path.name}"
    with RunLock(run.path), staging(out) as tmp:
        with console.err.status("loading the base model and the adapter"):
            model, tokenizer = load_run(run, recipe, base=base, dtype=dtype)
            model.eval()
        probes = reference_probes(model, tokenizer)
        floor = TOLERANCE[str(dtype).removeprefix("torch.")]
        if adapter_only:
            pairs = lora_pairs(model)
            _save(model.unload(), tokenizer, tmp / "base")
            del model
            _free_memory()
            with console.err.status("converting the base with llama.cpp's converter (for the check)"):
                base_file = convert(tmp / "base", tmp / "base.gguf", quant, name).path
            write_adapter(tmp / "base", pairs, tmp / "adapter.gguf", quant.name, name)
            verified = verify(base_file, probes, tokenizer, quant, floor, lora=tmp / "adapter.gguf")
            keep(tmp / "adapter.gguf", out)
        else:
            _save(model if method.saves_full_model else model.merge_and_unload(), tokenizer, tmp / "hf")
            del model
            _free_memory()
            staged, verified = _convert_verified(tmp / "hf", tmp, quant, name, probes, tokenizer, floor)
            keep(staged, out)
    _say(out, quant, verified, "LoRA adapter" if adapter_only else "model")
    return verified


def _export_folder(folder: Path, out: Path, quant: Quant, force: bool) -> Verified:
    from peftcli.model.device import compute_dtype
    from peftcli.model.load import load_model, load_tokenizer
    from peftcli.recipe import ModelSection

    check_weights(folder, "model", f"{folder}: the model")
    section = ModelSection(name=str(folder.resolve()))
    check_model_source(section)
    check_out_file(out, force, None)
    _tools()
    model_class(folder)  # an architecture llama.cpp cannot convert: before any weight loads
    quiet_libraries()
    dtype = compute_dtype("auto")
    with console.err.status(f"loading {folder}"):
        model = load_model(section, None, dtype).eval()
        tokenizer = load_tokenizer(section)
    probes = reference_probes(model, tokenizer)
    del model
    _free_memory()
    with staging(out) as tmp:
        floor = TOLERANCE[str(dtype).removeprefix("torch.")]
        staged, verified = _convert_verified(folder, tmp, quant, folder.resolve().name, probes, tokenizer, floor)
        keep(staged, out)
    _say(out, quant, verified, "model")
    return verified


def _save(model, tokenizer, folder: Path) -> None:
    with console.err.status("saving the merged weights for the converter"):
        model.save_pretrained(folder, safe_serialization=True)
        tokenizer.save_pretrained(folder)


def _free_memory() -> None:
    """After the caller dropped the transformers model: free it before llama.cpp loads its own copy."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _convert_verified(
    folder: Path, tmp: Path, quant: Quant, name: str, probes, tokenizer, floor: float
) -> tuple[Path, Verified]:
    """Convert (and quantize) in `tmp`, checking each file before the next step uses it: the
    converter's output at its own tight tolerance, then a quantized file at its type's."""
    exact = QUANTS[quant.converter]
    with console.err.status(f"converting to GGUF ({exact.name}) with llama.cpp's converter"):
        converted = convert(folder, tmp / f"model-{exact.name}.gguf", exact, name)
    if converted.pre_tokenizer_inferred:
        console.note(
            f"note: llama.cpp does not list this tokenizer; its pre-tokenizer rules are exactly "
            f"'{converted.pre_tokenizer_inferred}', used as such (token ids are compared below)"
        )
    verified = verify(converted.path, probes, tokenizer, exact, floor)
    if quant.quantizer is None:
        return converted.path, verified
    console.note(
        f"conversion checked in {exact.name}: max logit diff {verified.max_diff:.3g} "
        f"(tolerance {verified.tolerance:.3g})"
    )
    quantized = tmp / f"model-{quant.name}.gguf"
    quantize(converted.path, quantized, quant)
    converted.path.unlink()
    return quantized, verify(quantized, probes, tokenizer, quant, floor)


def _say(out: Path, quant: Quant, verified: Verified, what: str) -> None:
    console.out.print(
        f"GGUF {what} written to {out} ({quant.name}); verified with llama.cpp: max logit diff "
        f"{verified.max_diff:.3g} (tolerance {verified.tolerance:.3g}), top token agrees at "
        f"{verified.greedy_agree}/{verified.positions} probe positions",
        markup=False,
    )
