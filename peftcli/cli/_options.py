"""Arguments and options several commands share, as `Annotated` aliases (the `hf` CLI's shape)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

RecipeArg = Annotated[Path, typer.Argument(help="Recipe YAML file.", show_default=False)]
SetOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        help="Override a recipe key before validation, e.g. --set training.learning_rate=1e-4 (repeatable).",
        metavar="KEY=VALUE",
    ),
]
RunArg = Annotated[Path, typer.Argument(help="Run directory written by `peftcli train`.", show_default=False)]


def load(recipe: Path, overrides: list[str] | None):
    """The recipe file with its --set overrides, validated (a UserError names what is wrong)."""
    from peftcli.recipe import load_recipe

    return load_recipe(recipe, overrides or [])
