"""`peftcli merge`: one run folded into full weights, or several combined (export/)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from peftcli import interruption
from peftcli.errors import UserError

DTYPES = ("auto", "bfloat16", "float16", "float32")


def merge(
    runs: Annotated[
        list[Path],
        typer.Argument(
            help="Run directories written by `peftcli train` (one, or several to combine).", show_default=False
        ),
    ],
    out: Annotated[
        Path, typer.Option("--out", help="Folder for the merged model (or combined adapter).", show_default=False)
    ],
    dtype: Annotated[
        str, typer.Option("--dtype", help="auto | bfloat16 | float16 | float32 (saved weights).")
    ] = "auto",
    force: Annotated[bool, typer.Option("--force", help="Replace a non-empty --out folder.")] = False,
    weights: Annotated[
        str | None,
        typer.Option("--weights", help="Several runs: comma-separated weights, e.g. 0.7,0.3 (default: equal)."),
    ] = None,
    combination: Annotated[
        str,
        typer.Option(
            "--combination", help="Several runs: linear | cat | svd | ties | dare_linear | dare_ties | magnitude_prune."
        ),
    ] = "linear",
    density: Annotated[
        float | None, typer.Option("--density", help="ties/dare/magnitude_prune: fraction of weights kept.")
    ] = None,
    as_adapter: Annotated[
        bool, typer.Option("--as-adapter", help="Several runs: save the combined adapter, not a merged model.")
    ] = False,
) -> None:
    """Fold an adapter into the base weights (or combine several), verify logits, save a plain HF model.

    [dim]Examples: peftcli merge runs/demo --out merged/demo
    peftcli merge runs/a runs/b --weights 0.7,0.3 --combination ties --density 0.5 --out merged/ab[/]
    """
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype!r}: expected auto, bfloat16, float16 or float32")
    if len(runs) == 1:
        extra = [
            flag
            for flag, used in (
                ("--weights", weights is not None),
                ("--density", density is not None),
                ("--as-adapter", as_adapter),
            )
            if used
        ]
        if extra:
            raise UserError(f"{', '.join(extra)} combine several runs; give two or more run directories")
        from peftcli.export.merge import run_merge

        with interruption.saving(f"nothing was written to {out}"):
            run_merge(runs[0], out, dtype=dtype, force=force)
        return
    from peftcli.export.combine import run_combine

    with interruption.saving(f"nothing was written to {out}"):
        run_combine(
            runs,
            out,
            weights=weights,
            combination=combination,
            density=density,
            as_adapter=as_adapter,
            dtype=dtype,
            force=force,
        )
