"""Recipe validation: the contract's sections, strict keys with suggestions, --set, paths, errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from helpers import ROOT, base_recipe, write_recipe

from peftcli.errors import UserError
from peftcli.recipe import load_recipe, recipe_to_yaml


def _error(tmp_path: Path, text: str, overrides=()) -> str:
    path = tmp_path / "recipe.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(UserError) as info:
        load_recipe(path, list(overrides))
    return info.value.message


MINIMAL = "model:\n  name: some/model\ndata:\n  train: train.jsonl\n"


def test_minimal_recipe_fills_defaults(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(MINIMAL, encoding="utf-8")
    recipe = load_recipe(path, cwd=tmp_path)
    assert recipe.peft.method == "lora" and recipe.peft.r == 8
    assert recipe.training.epochs is None and recipe.training.max_steps is None  # = 1 epoch
    assert recipe.model.name == "some/model"  # a hub id stays a hub id
    assert recipe.data.train[0].path == str(tmp_path / "train.jsonl")  # data resolves next to the recipe
    assert recipe.output.dir == str(tmp_path / "runs" / "r")


def test_unknown_key_names_section_line_and_suggestion(tmp_path):
    message = _error(tmp_path, MINIMAL + "training:\n  max_steps: 3\n  lerning_rate: 0.1\n")
    assert "line 7" in message
    assert "training.lerning_rate" in message
    assert "did you mean 'learning_rate'" in message


def test_unknown_section_suggests_closest(tmp_path):
    message = _error(tmp_path, MINIMAL + "trainig:\n  max_steps: 3\n")
    assert "unknown section 'trainig'" in message and "did you mean 'training'" in message


def test_method_key_on_wrong_method_lists_valid_keys(tmp_path):
    message = _error(tmp_path, MINIMAL + "peft:\n  method: lora\n  alhpa: 3\n")
    assert "'alhpa' is not a key of peft.method 'lora'" in message
    assert "did you mean 'alpha'" in message and "target_modules" in message


@pytest.mark.parametrize(
    "text, expected",
    [
        ("peft:\n  r: 0\n", "peft.r"),
        ("training:\n  learning_rate: -1\n", "training.learning_rate"),
        ("training:\n  learning_rate: .nan\n", "training.learning_rate"),
        ("training:\n  batch_size: four\n", "training.batch_size"),
        ("data:\n  train: t.jsonl\n  eval_split: 1.5\n", "data.eval_split"),
        ("quantization:\n  bits: 3\n", "quantization.bits"),
        ("model:\n  name: m\n  dtype: float8\n", "model.dtype"),
    ],
)
def test_wrong_type_or_range_names_the_key(tmp_path, text, expected):
    body = yaml.safe_load(MINIMAL)
    for section, values in yaml.safe_load(text).items():
        body[section] = {**body.get(section, {}), **values}
    message = _error(tmp_path, yaml.safe_dump(body))
    assert expected in message


def test_cross_field_checks_run_before_any_model(tmp_path):
    assert "quant_type applies to 4-bit only" in _error(
        tmp_path, MINIMAL + "quantization:\n  bits: 8\n  quant_type: nf4\n"
    )
    assert "data.eval and data.eval_split" in _error(
        tmp_path, "model:\n  name: m\ndata:\n  train: a.jsonl\n  eval: b.jsonl\n  eval_split: 0.1\n"
    )
    assert "max_steps and training.epochs" in _error(tmp_path, MINIMAL + "training:\n  max_steps: 3\n  epochs: 1\n")


def test_yaml_syntax_error_has_line_number(tmp_path):
    message = _error(tmp_path, "model:\n  name: [unclosed\ndata:\n  train: x\n")
    assert "YAML syntax error at line 3, column 5" in message
    assert "flow sequence that starts at line 2" in message  # where the unclosed [ is


def test_duplicate_keys_are_refused(tmp_path):
    message = _error(tmp_path, MINIMAL + "training:\n  max_steps: 3\n  max_steps: 4\n")
    assert "duplicate key 'max_steps'" in message


@pytest.mark.parametrize(
    "content, expected",
    [(b"", "empty"), (b"- a\n- b\n", "mapping of sections"), (b"\xff\xfe\x00bad", "UTF-8")],
)
def test_unreadable_recipes(tmp_path, content, expected):
    path = tmp_path / "r.yaml"
    path.write_bytes(content)
    with pytest.raises(UserError) as info:
        load_recipe(path)
    assert expected in info.value.message


def test_overrides_are_parsed_as_yaml_and_validated(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(MINIMAL, encoding="utf-8")
    recipe = load_recipe(
        path,
        ["training.learning_rate=1e-4", "peft.target_modules=[q_proj, v_proj]", "quantization.bits=4"],
        cwd=tmp_path,
    )
    assert recipe.training.learning_rate == 1e-4
    assert recipe.peft.target_modules == ["q_proj", "v_proj"]
    assert recipe.quantization.bits == 4 and recipe.quantization.effective_quant_type == "nf4"
    assert "learning_rate: 0.0001" in recipe_to_yaml(recipe)


def test_override_errors(tmp_path):
    assert "(from --set)" in _error(tmp_path, MINIMAL, ["training.lerning_rate=1"])
    assert "expected KEY=VALUE" in _error(tmp_path, MINIMAL, ["training.learning_rate"])
    assert "cannot parse" in _error(tmp_path, MINIMAL, ["training.learning_rate=[1, 2"])


def test_override_paths_resolve_against_the_working_directory(tmp_path):
    recipe_dir = tmp_path / "recipes"
    recipe_dir.mkdir()
    path = recipe_dir / "r.yaml"
    path.write_text(MINIMAL, encoding="utf-8")
    recipe = load_recipe(path, ["data.eval=held.jsonl"], cwd=tmp_path)
    assert recipe.data.train[0].path == str(recipe_dir / "train.jsonl")
    assert recipe.data.eval[0].path == str(tmp_path / "held.jsonl")


def test_dora_shorthand_sets_use_dora(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(MINIMAL + "peft:\n  method: dora\n", encoding="utf-8")
    assert load_recipe(path).peft.use_dora is True


@pytest.mark.parametrize("recipe_file", sorted((ROOT / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_validates(recipe_file):
    recipe = load_recipe(recipe_file)
    assert recipe.model.name and recipe.data.train


def test_validate_command(cli, tmp_path, tiny_model):
    good = write_recipe(tmp_path / "good.yaml", base_recipe(tiny_model, tmp_path / "run"))
    result = cli("validate", good, "--set", "peft.r=4")
    assert result.code == 0, result.err
    assert yaml.safe_load(result.out)["peft"]["r"] == 4
    assert not (tmp_path / "run").exists()  # validate writes nothing

    bad = write_recipe(tmp_path / "bad.yaml", base_recipe(tiny_model, tmp_path / "run", training={"lr": 1}))
    result = cli("validate", bad)
    assert result.code == 2
    assert len(result.error_lines) == 1 and "training.lr" in result.error_lines[0]
    assert "Traceback" not in result.err


def test_a_saved_recipe_takes_overrides_like_the_original(tmp_path):
    """Unset keys stay unset in the resolved recipe, so it can be re-run with other values."""
    path = tmp_path / "r.yaml"
    path.write_text(MINIMAL + "quantization:\n  bits: 4\n", encoding="utf-8")
    resolved = tmp_path / "resolved.yaml"
    resolved.write_text(recipe_to_yaml(load_recipe(path, cwd=tmp_path)), encoding="utf-8")
    again = load_recipe(resolved, ["training.max_steps=50", "quantization.bits=8"], cwd=tmp_path)
    assert again.training.max_steps == 50 and again.quantization.bits == 8
    assert again.quantization.describe() == "8-bit"


def test_relative_paths_never_resolve_against_the_working_directory(tmp_path, monkeypatch):
    """A model folder next to where the user stands must not be picked up by a recipe elsewhere."""
    (tmp_path / "cwd" / "models" / "tiny").mkdir(parents=True)
    (tmp_path / "recipes").mkdir()
    path = tmp_path / "recipes" / "r.yaml"
    path.write_text("model:\n  name: models/tiny\ndata:\n  train: data/x.jsonl\n", encoding="utf-8")
    monkeypatch.chdir(tmp_path / "cwd")
    # transformers would load ./models/tiny of the working directory for the "hub id" models/tiny
    with pytest.raises(UserError, match="model.name: 'models/tiny' is not next to the recipe"):
        load_recipe(path)
    elsewhere = tmp_path / "elsewhere"
    assert load_recipe(path, [f"model.name={elsewhere}"]).model.name == str(elsewhere)  # --set fixes it
    monkeypatch.chdir(tmp_path)
    recipe = load_recipe(path)
    assert recipe.model.name == "models/tiny"  # nothing of that name here: a hub id
    assert recipe.data.train[0].path == str(tmp_path / "recipes" / "data" / "x.jsonl")
    monkeypatch.chdir(tmp_path / "cwd")
    (tmp_path / "recipes" / "models" / "tiny").mkdir(parents=True)
    assert load_recipe(path).model.name == str(tmp_path / "recipes" / "models" / "tiny")


def test_switching_method_with_set_says_how(tmp_path, cli, tiny_model):
    """`--set peft.method=ia3` on a LoRA recipe leaves LoRA's keys behind: one line names them all and
    the way to replace the section, and that way works."""
    recipe = ROOT / "recipes" / "demo.yaml"
    model = f"model.name={tiny_model}"  # the demo's own model is built by `make demo`
    result = cli("validate", recipe, "--set", model, "--set", "peft.method=ia3")
    assert result.code == 2
    assert "'r', 'alpha', 'dropout' are not keys of peft.method 'ia3'" in result.err
    assert "--set 'peft={method: ia3}'" in result.err
    switched = cli("validate", recipe, "--set", model, "--set", "peft={method: ia3}")
    assert switched.code == 0, switched.err
