"""`peftcli compare`: the same recipe once per method, one table (training/compare.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from peftcli import interruption
from peftcli.cli._options import RecipeArg, SetOpt, load


def compare(
    recipe: RecipeArg,
    methods_: Annotated[
        str,
        typer.Option(
            "--methods", help="Comma-separated methods, e.g. lora,dora,ia3,prompt_tuning.", show_default=False
        ),
    ],
    set_: SetOpt = None,
    out: Annotated[
        Path | None,
        typer.Option("--out", help="Folder for the runs and the comparison (default: <output.dir>-compare)."),
    ] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing comparison folder.")] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print compare.json's object on stdout; the table goes to stderr.")
    ] = False,
) -> None:
    """Train the same recipe once per method and compare params, size, memory, speed and loss.

    Every method is checked first, as `validate` does (exit 2 if one cannot run).
    A method that fails while training gets a `failed` row; the command then exits non-zero.

    [dim]Example: peftcli compare recipes/demo.yaml --methods lora,dora,ia3,prompt_tuning[/]
    """
    from peftcli.training.compare import parse_methods, run_compare

    names = parse_methods(methods_)
    resolved = load(recipe, set_)
    target = out.resolve() if out else Path(f"{resolved.output.dir}-compare")
    finished = f"the methods that finished are in {target}/<method>/; the comparison report was not written"
    with interruption.saving(finished):
        run_compare(resolved, names, target, overwrite=overwrite, as_json=as_json)
