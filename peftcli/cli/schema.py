"""`peftcli schema`: the recipe's JSON Schema, for editors and for checking recipe files; with
`--markdown`, the recipe reference for people (docs/recipe.md is this output)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer

from peftcli import console
from peftcli.errors import UserError

REFERENCE_TITLE = "# Recipe reference"


def schema(
    out: Annotated[Path | None, typer.Option("--out", help="Write to this file instead of printing.")] = None,
    markdown: Annotated[
        bool, typer.Option("--markdown", help="The recipe reference in Markdown (every key, default, meaning).")
    ] = False,
    force: Annotated[
        bool, typer.Option("--force", help="Replace an existing file that is not an earlier schema.")
    ] = False,
) -> None:
    """Print the recipe's JSON Schema (for editor completion and checks of recipe files).

    [dim]Example: peftcli schema --out peftcli.schema.json[/]
    """
    from peftcli.recipe import Recipe

    if markdown:
        from peftcli.recipe.reference import markdown as reference

        text = reference()
        earlier: Callable[[str], bool] = lambda old: old.startswith(REFERENCE_TITLE)  # noqa: E731
    else:
        schema_ = Recipe.model_json_schema()
        text = json.dumps(schema_, indent=2) + "\n"
        earlier = lambda old: _json_title(old) == schema_["title"]  # noqa: E731
    if out is None:
        console.out.print(text, markup=False, end="")
        return
    _check_target(out, earlier, force)
    from peftcli.rundir import atomic_write_text

    atomic_write_text(out, text)
    console.out.print(f"wrote {out}")


def _json_title(text: str) -> str | None:
    try:
        return json.loads(text).get("title")
    except (ValueError, AttributeError):
        return None


def _check_target(out: Path, earlier: Callable[[str], bool], force: bool) -> None:
    """--out may replace an earlier output of this command (refreshing it is the point), not any other file."""
    if out.exists() and not out.is_file():
        raise UserError(f"--out {out} exists and is not a file")
    if not out.exists() or force:
        return
    try:
        replaceable = earlier(out.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError):
        replaceable = False
    if not replaceable:
        raise UserError(
            f"--out {out} already exists and is not a peftcli schema",
            hint="add --force to replace it",
        )
