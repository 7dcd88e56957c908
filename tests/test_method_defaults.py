"""Per-method facts of the registry reach every stage that shows or uses them: why a method cannot
train on a quantized base (init's comment, the recipe error), and the learning rate a recipe that
leaves it unset trains with (validate, the saved recipe, compare's other methods)."""

from __future__ import annotations

import json

import pytest
import yaml
from helpers import base_recipe, write_recipe

from peftcli.methods import REGISTRY

WHY_NOT_QUANTIZED = {
    "loha": "loha cannot train on a quantized base: PEFT's LoHa has no 4-bit or 8-bit (bitsandbytes) layer",
    "lokr": "lokr cannot train on a quantized base: PEFT's LoKr has no 4-bit or 8-bit (bitsandbytes) layer",
    "full": "full cannot train on a quantized base: it updates the base weights themselves",
}


@pytest.mark.parametrize("method", list(WHY_NOT_QUANTIZED))
def test_init_says_why_the_base_cannot_be_quantized(method, cli, tmp_path):
    out = tmp_path / "r.yaml"
    result = cli("init", "--method", method, "--model", "org/some-model", "--out", out)
    assert result.code == 0, result.err
    text = out.read_text()
    comments = " ".join(line.removeprefix("#").strip() for line in text.splitlines() if line.startswith("#"))
    assert WHY_NOT_QUANTIZED[method] in comments
    assert "quantization:" not in text  # no section to uncomment
    if method != "full":  # LoHa and LoKr train adapters: the base weights stay frozen
        assert "trains the base weights" not in text


@pytest.mark.parametrize("method", ["loha", "full"])
def test_a_quantized_base_is_refused_with_the_reason(method, cli, tmp_path, tiny_model):
    recipe = base_recipe(tiny_model, tmp_path / "run", quantization={"bits": 4})
    recipe["peft"] = {"method": method}
    result = cli("validate", write_recipe(tmp_path / "r.yaml", recipe))
    assert result.code == 2
    assert WHY_NOT_QUANTIZED[method].split(": ", 1)[1] in result.error_lines[0]


def test_a_method_that_refuses_a_quantized_base_must_say_why():
    from dataclasses import replace

    with pytest.raises(ValueError, match="why_no_quantized_base"):
        replace(REGISTRY["full"], why_no_quantized_base="")
    with pytest.raises(ValueError, match="why_no_quantized_base"):
        replace(REGISTRY["lora"], why_no_quantized_base="a reason for a method that can")


def _resolved(tmp_path, method: str, **training) -> dict:
    from peftcli.recipe import load_recipe, recipe_to_yaml

    recipe = base_recipe(tmp_path / "model", tmp_path / "run", peft=None, training=None)
    recipe.update(peft={"method": method}, training={"max_steps": 2, **training})
    path = write_recipe(tmp_path / f"{method}.yaml", recipe)
    return yaml.safe_load(recipe_to_yaml(load_recipe(path)))  # what the run directory's recipe.yaml holds


def test_an_unset_learning_rate_is_the_methods_own(tmp_path):
    assert REGISTRY["full"].learning_rate == 2e-5 and REGISTRY["lora"].learning_rate == 2e-4
    assert _resolved(tmp_path, "full")["training"]["learning_rate"] == 2e-5
    assert _resolved(tmp_path, "lora")["training"]["learning_rate"] == 2e-4
    assert _resolved(tmp_path, "ia3")["training"]["learning_rate"] == REGISTRY["ia3"].learning_rate
    # Set in the recipe, it is the recipe's, whatever the method.
    assert _resolved(tmp_path, "full", learning_rate=1e-3)["training"]["learning_rate"] == 1e-3


def test_validate_shows_the_learning_rate_the_run_will_use(tmp_path, cli, tiny_model):
    recipe = base_recipe(tiny_model, tmp_path / "run")
    recipe["peft"] = {"method": "full"}
    recipe["training"].pop("learning_rate")
    path = write_recipe(tmp_path / "r.yaml", recipe)
    result = cli("validate", path, "--json")
    assert result.code == 0, result.err
    assert json.loads(result.out)["recipe"]["training"]["learning_rate"] == 2e-5
    shown = cli("validate", path)
    assert "lr 2e-05" in shown.err and "learning_rate: 2.0e-05" in shown.out


def test_compare_gives_each_method_its_own_rate_unless_the_recipe_sets_one(tmp_path):
    from peftcli.recipe import load_recipe
    from peftcli.training.compare import variant

    recipe = base_recipe(tmp_path / "model", tmp_path / "run")
    recipe["training"].pop("learning_rate")
    unset = load_recipe(write_recipe(tmp_path / "unset.yaml", recipe))
    assert variant(unset, "lora", tmp_path / "cmp").training.learning_rate == 2e-4
    assert variant(unset, "full", tmp_path / "cmp").training.learning_rate == 2e-5
    recipe["training"]["learning_rate"] = 1e-3
    given = load_recipe(write_recipe(tmp_path / "given.yaml", recipe))
    assert variant(given, "full", tmp_path / "cmp").training.learning_rate == 1e-3
