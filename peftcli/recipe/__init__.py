"""The recipe contract: schema (`schema.py`) and reading it from YAML + `--set` (`load.py`)."""

from peftcli.recipe.load import load_recipe, recipe_to_yaml
from peftcli.recipe.schema import DataSection, DataSource, ModelSection, QuantizationSection, Recipe

__all__ = [
    "DataSection",
    "DataSource",
    "ModelSection",
    "QuantizationSection",
    "Recipe",
    "load_recipe",
    "recipe_to_yaml",
]
