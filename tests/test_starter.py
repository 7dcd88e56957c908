"""`peftcli init`: the starter recipe validates as written, whatever the paths look like and wherever
it is written, and refuses a method the local model cannot run."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import yaml
from helpers import DEMO_TRAIN

from peftcli.cli._starter import starter
from peftcli.recipe import load_recipe


def _place(tiny_model: Path, root: Path) -> tuple[Path, Path]:
    """A copy of the tiny model and of the demo data under `root`: (model folder, data file)."""
    model = root / "models" / "tiny"
    shutil.copytree(tiny_model, model)
    data = root / "recipes" / "data" / "demo_train.jsonl"
    data.parent.mkdir(parents=True)
    shutil.copyfile(DEMO_TRAIN, data)
    return model, data


def _no_value_glued_to_a_comment(text: str) -> None:
    for line in text.splitlines():
        body = line.lstrip("# ")
        if "#" in body and not body.startswith("#"):
            value_part = body.split("#", 1)[0]
            assert value_part.endswith(" "), f"comment glued to the value: {line!r}"


@pytest.mark.parametrize(
    "folder",
    [
        "a-walkthrough-folder-with-quite-a-long-name/nested",  # pushes values past the comment column
        "odd #1: names/- and more",  # '#', ': ' and a leading '-' that YAML must not misread
    ],
)
def test_init_writes_long_and_odd_absolute_paths_exactly(folder, cli, tiny_model, tmp_path):
    model, data = _place(tiny_model, tmp_path / folder)
    out = tmp_path / "r.yaml"
    result = cli("init", "--model", model, "--data", data, "--out", out)
    assert result.code == 0, result.err
    text = out.read_text()
    _no_value_glued_to_a_comment(text)
    recipe = load_recipe(out)
    assert recipe.model.name == str(model)
    assert [source.path for source in recipe.data.train] == [str(data)]
    assert cli("validate", out).code == 0
    preview = cli("data", "preview", out, "--rows", "1")
    assert preview.code == 0, preview.err


@pytest.mark.parametrize("value", ["x" * 80, "/p/with: colon", "#not-a-comment", "- dash", "@at", "yes", "a\nb"])
def test_starter_values_round_trip_through_yaml(value):
    text = starter("lora", value, value, "r")
    parsed = yaml.safe_load(text)
    assert parsed["model"]["name"] == value
    assert parsed["data"]["train"] == value


def test_init_relative_paths_resolve_from_a_recipe_in_a_subfolder(cli, tiny_model, tmp_path, monkeypatch):
    model, data = _place(tiny_model, tmp_path / "work")
    monkeypatch.chdir(tmp_path / "work")
    out = Path("sub/dir/r.yaml")
    result = cli("init", "--model", "./models/tiny", "--data", "recipes/data/demo_train.jsonl", "--out", out)
    assert result.code == 0, result.err
    checked = cli("validate", out)
    assert checked.code == 0, checked.err
    recipe = load_recipe(out)
    assert Path(recipe.model.name) == model.resolve()
    assert [Path(source.path) for source in recipe.data.train] == [data.resolve()]
    # Run from elsewhere, the recipe still finds them: they are written relative to its folder (or absolute).
    monkeypatch.chdir(tmp_path)
    assert cli("validate", "work" / out).code == 0


def test_starter_writes_existing_relative_paths_relative_to_the_recipe(tiny_model, tmp_path, monkeypatch):
    _place(tiny_model, tmp_path)
    monkeypatch.chdir(tmp_path)
    data = "recipes/data/demo_train.jsonl"
    parsed = yaml.safe_load(starter("lora", "./models/tiny", data, "r", out="sub/dir/r.yaml"))
    assert parsed["model"]["name"] == os.path.join("..", "..", "models", "tiny")
    assert parsed["data"]["train"] == os.path.join("..", "..", "recipes", "data", "demo_train.jsonl")
    beside = yaml.safe_load(starter("lora", "./models/tiny", data, "r", out="r.yaml"))
    assert beside["model"]["name"] == "models/tiny"
    # Printed (no recipe file): absolute, so it resolves wherever the text is saved.
    printed = yaml.safe_load(starter("lora", "./models/tiny", data, "r", out="-"))
    assert printed["model"]["name"] == str((tmp_path / "models" / "tiny").resolve())
    # Names that exist nowhere here (a hub id, data still to come) are written as given.
    other = yaml.safe_load(starter("lora", "org/some-model", "data/train.jsonl", "r", out="sub/dir/r.yaml"))
    assert other["model"]["name"] == "org/some-model"
    assert other["data"]["train"] == "data/train.jsonl"


def test_init_max_length_follows_the_local_model_context(cli, tiny_model, tmp_path):
    out = tmp_path / "r.yaml"
    result = cli("init", "--model", tiny_model, "--data", DEMO_TRAIN, "--out", out)
    assert result.code == 0, result.err
    assert load_recipe(out).data.max_length == 512  # the tiny model's max_position_embeddings
    checked = cli("validate", out)
    assert checked.code == 0, checked.err
    hub = tmp_path / "hub.yaml"
    assert cli("init", "--model", "org/some-model", "--out", hub).code == 0
    assert load_recipe(hub).data.max_length == 1024  # context unknown: the usual default


def test_init_refuses_adaption_prompt_on_a_model_it_cannot_run(cli, tiny_qwen, tiny_model, tmp_path):
    out = tmp_path / "r.yaml"
    result = cli("init", "--method", "adaption_prompt", "--model", tiny_qwen, "--data", DEMO_TRAIN, "--out", out)
    assert result.code == 2
    assert len(result.error_lines) == 1
    assert "adaption_prompt" in result.error_lines[0] and "qwen2" in result.error_lines[0]
    assert not out.exists()
    assert not list(tmp_path.iterdir())  # nothing written at all
    llama = cli("init", "--method", "adaption_prompt", "--model", tiny_model, "--data", DEMO_TRAIN, "--out", out)
    assert llama.code == 0, llama.err
    checked = cli("validate", out)
    assert checked.code == 0, checked.err
