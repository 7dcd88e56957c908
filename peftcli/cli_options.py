"""Arguments and options shared by the commands of cli.py and cli_explore.py."""

from __future__ import annotations

from pathlib import Path

import typer

RecipeArg = typer.Argument(..., help="Recipe YAML file.", show_default=False)
SetOpt = typer.Option(
    [],
    "--set",
    help="Override a recipe key before validation, e.g. --set training.learning_rate=1e-4 (repeatable).",
    metavar="KEY=VALUE",
)


def load(recipe: Path, overrides: list[str]):
    from peftcli.recipe import load_recipe

    return load_recipe(recipe, overrides)
