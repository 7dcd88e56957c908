"""`peftcli init`: a commented starter recipe for any method, which validates as written (_starter.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from peftcli import console
from peftcli.errors import UserError


def init(
    method: Annotated[
        str | None, typer.Option("--method", help="PEFT method (see `peftcli methods`; default: lora).")
    ] = None,
    model: Annotated[str, typer.Option("--model", help="Base model folder or hub id.")] = "Qwen/Qwen2.5-0.5B-Instruct",
    data: Annotated[
        str, typer.Option("--data", help="Training data (file, folder, glob or hub id).")
    ] = "data/train.jsonl",
    out: Annotated[Path, typer.Option("--out", help="Where to write it ('-' prints it).")] = Path("recipe.yaml"),
    force: Annotated[bool, typer.Option("--force", help="Replace an existing file.")] = False,
) -> None:
    """Write a commented starter recipe that validates as written.

    [dim]Example: peftcli init --method dora --model ./models/tiny --out my-recipe.yaml[/]
    """
    from peftcli.cli._starter import starter
    from peftcli.methods import DEFAULT_METHOD, REGISTRY

    method = method or DEFAULT_METHOD
    if method not in REGISTRY:
        raise UserError(f"--method {method!r}: unknown method", hint=f"methods: {', '.join(REGISTRY)}")
    name = "run" if str(out) == "-" else out.stem
    text = starter(method, model, data, name, out)
    if str(out) == "-":
        console.out.print(text, markup=False, end="")
        return
    if out.exists() and not out.is_file():
        raise UserError(f"--out {out} exists and is not a file", hint="give the path of the recipe file to write")
    if out.exists() and not force:
        raise UserError(f"--out {out} already exists", hint="choose another name, or add --force")
    from peftcli.rundir import atomic_write_text

    atomic_write_text(out, text)
    console.out.print(f"wrote {out}; next: peftcli validate {out}")
