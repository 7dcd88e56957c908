"""`peftcli export`: a run or a merged model as a GGUF file for llama.cpp and ollama (export/gguf.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from peftcli import interruption
from peftcli.errors import UserError

FORMATS = ("gguf",)
# export/gguf_convert.py:QUANTS names the same values; this copy keeps `--help` free of the export stage.
QUANT_HELP = "f16 | f32 | bf16 | q8_0 | q6_k | q5_k_m | q4_k_m (--adapter-only: f16 | f32)."


def export(
    source: Annotated[
        Path,
        typer.Argument(
            help="A run directory written by `peftcli train`, or a model folder written by `peftcli merge`.",
            show_default=False,
        ),
    ],
    out: Annotated[Path, typer.Option("--out", help="The .gguf file to write.", show_default=False)],
    format: Annotated[str, typer.Option("--format", help="Output format: gguf.")] = "gguf",
    quant: Annotated[str, typer.Option("--quant", help=QUANT_HELP)] = "f16",
    adapter_only: Annotated[
        bool,
        typer.Option(
            "--adapter-only", help="Write the LoRA adapter itself, for llama.cpp's --lora (ollama's ADAPTER)."
        ),
    ] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace a file an earlier export wrote.")] = False,
) -> None:
    """Export a run (its adapter merged on the fly) or a merged model to GGUF, verified with llama.cpp.

    [dim]Examples: peftcli export runs/demo --format gguf --out demo.gguf
    peftcli export runs/demo --format gguf --quant q8_0 --out demo-q8.gguf
    peftcli export runs/demo --format gguf --adapter-only --out demo-lora.gguf[/]
    """
    if format not in FORMATS:
        raise UserError(f"--format {format!r}: expected {', '.join(FORMATS)}")
    from peftcli.export.gguf import run_export

    with interruption.saving(f"nothing was written to {out}"):
        run_export(source, out, quant=quant, adapter_only=adapter_only, force=force)
