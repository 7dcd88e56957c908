"""A run is a folder of its own, wherever it lies: never inside a folder that is read as data (its
checkpoints and predictions would be read back as rows), and a copied or moved run's own recipe
trains that copy, never the folder it was first written in."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from helpers import DEMO_TRAIN, base_recipe, read_json, resumable_recipe, write_recipe


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


def _rows(path: Path) -> int:
    return sum(1 for line in path.read_text(encoding="utf-8").splitlines() if line.strip())


def _a_run_in(folder: Path) -> Path:
    """What `peftcli train` and `eval` leave in a run: the marker, a checkpoint's RNG state (JSON
    that is no table) and predictions.jsonl, whose rows have the shape of chat data."""
    (folder / "checkpoint-2").mkdir(parents=True)
    (folder / "peftcli.json").write_text(json.dumps({"kind": "run", "peftcli": "0"}))
    (folder / "checkpoint-2" / "rng_state.json").write_text(json.dumps({"python": [3, [1, 2], None], "seed": 1}))
    prediction = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    (folder / "predictions.jsonl").write_text(json.dumps(prediction) + "\n")
    return folder


def _data_folder(tmp: Path) -> Path:
    data = tmp / "dd"
    data.mkdir()
    shutil.copy(DEMO_TRAIN, data / "train.jsonl")
    return data


# --- output.dir inside the data ------------------------------------------------------------------


@pytest.mark.parametrize("key", ["train", "eval"])
def test_output_dir_inside_a_data_folder_is_refused(tmp_path, tiny_model, cli, key):
    """data.train: dd with output.dir: dd/run once trained, and --overwrite then read the run's
    checkpoint JSON as rows ("rng_state.json: columns have different lengths")."""
    data = _data_folder(tmp_path)
    train = str(DEMO_TRAIN) if key == "eval" else str(data)
    recipe = base_recipe(tiny_model, data / "run", data={"train": train, "eval": str(data) if key == "eval" else None})
    path = write_recipe(tmp_path / "r.yaml", recipe)
    before = _snapshot(tmp_path)
    result = cli("train", path)
    assert result.code == 2 and len(result.error_lines) == 1, result.err
    assert f"inside the data folder of data.{key}" in result.error_lines[0] and "hint:" in result.err
    assert _snapshot(tmp_path) == before


def test_output_dir_where_a_data_glob_reaches_is_refused(tmp_path, tiny_model, cli):
    data = _data_folder(tmp_path)
    recipe = base_recipe(tiny_model, data / "runs" / "a", data={"train": str(data / "**" / "*.jsonl"), "eval": None})
    path = write_recipe(tmp_path / "r.yaml", recipe)
    before = _snapshot(tmp_path)
    result = cli("train", path)
    assert result.code == 2 and len(result.error_lines) == 1, result.err
    assert "where the pattern of data.train reaches" in result.error_lines[0]
    assert _snapshot(tmp_path) == before
    # A pattern that cannot reach the run leaves it alone: runs/ beside train-*.jsonl is the usual layout
    # (the model is missing, so the command stops at the next check, after the output folder's).
    recipe = base_recipe(tmp_path / "no-model", data / "runs" / "a", data={"train": str(data / "*.jsonl")})
    result = cli("train", write_recipe(tmp_path / "r.yaml", recipe))
    assert result.code == 2 and "output.dir" not in result.err and "model.name" in result.err, result.err


# --- reading a data folder skips what peftcli wrote into it --------------------------------------


@pytest.mark.parametrize("shape", ["folder", "glob"])
def test_a_run_inside_a_data_folder_is_not_read_as_data(tmp_path, tiny_model, cli, shape):
    """A run left in a data folder (made before this check, or moved there) is skipped, with a note:
    its checkpoint JSON is no data, and its predictions.jsonl would be trained on without a word."""
    data = _data_folder(tmp_path)
    _a_run_in(data / "old-run")
    train = str(data) if shape == "folder" else str(data / "**" / "*.json*")
    recipe = base_recipe(tiny_model, tmp_path / "runs" / "a", data={"train": train, "eval": None})
    result = cli("validate", write_recipe(tmp_path / "r.yaml", recipe))
    assert result.code == 0, result.err
    assert f"data.train: {_rows(DEMO_TRAIN)} rows" in result.err
    assert "skipped 1 folder that peftcli wrote" in result.err and str(data / "old-run") in result.err


def test_a_run_folder_named_as_data_is_refused(tmp_path, tiny_model, cli):
    run = _a_run_in(tmp_path / "old-run")
    recipe = base_recipe(tiny_model, tmp_path / "runs" / "a", data={"train": str(run), "eval": None})
    result = cli("validate", write_recipe(tmp_path / "r.yaml", recipe))
    assert result.code == 2 and len(result.error_lines) == 1, result.err
    assert "is a folder peftcli wrote" in result.error_lines[0] and "predictions.jsonl" in result.err
    # Its file named as such is data like any other file.
    recipe["data"]["train"] = str(run / "predictions.jsonl")
    result = cli("validate", write_recipe(tmp_path / "r.yaml", recipe))
    assert result.code == 0 and "data.train: 1 rows" in result.err, result.err


def test_a_data_folder_holding_only_a_run_names_it(tmp_path, tiny_model, cli):
    data = tmp_path / "dd"
    _a_run_in(data / "old-run")
    recipe = base_recipe(tiny_model, tmp_path / "runs" / "a", data={"train": str(data), "eval": None})
    result = cli("validate", write_recipe(tmp_path / "r.yaml", recipe))
    assert result.code == 2 and len(result.error_lines) == 1, result.err
    assert "outside the folder peftcli wrote there" in result.error_lines[0] and "old-run" in result.error_lines[0]


def test_the_data_reader_knows_the_run_marker():
    """The data layer sits below rundir, so it names the marker itself: the two names must agree."""
    from peftcli.data.sources import PEFTCLI_MARKER
    from peftcli.rundir import MARKER

    assert PEFTCLI_MARKER == MARKER


# --- a copied or moved run trains itself ---------------------------------------------------------


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_model) -> Path:
    from helpers import train

    tmp = tmp_path_factory.mktemp("finished")
    recipe = base_recipe(tiny_model, tmp / "run", training={"max_steps": 4, "save_steps": 2})
    return train(write_recipe(tmp / "recipe.yaml", recipe)).run_dir


def _saved_as_before(run: Path, output_dir: Path) -> None:
    """The run's recipe as peftcli saved it before runs named themselves: an absolute output.dir."""
    saved = yaml.safe_load((run / "recipe.yaml").read_text())
    saved["output"]["dir"] = str(output_dir)
    (run / "recipe.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))


@pytest.mark.slow
@pytest.mark.parametrize("saved", ["as saved now", "absolute, as saved before"])
def test_overwriting_a_copied_run_retrains_the_copy(finished_run, tmp_path, cli, saved):
    """`cp -a fin elsewhere/copy; peftcli train elsewhere/copy/recipe.yaml --overwrite` once retrained
    the original (deleting its eval.json) through the absolute output.dir its recipe held."""
    original = tmp_path / "fin"
    shutil.copytree(finished_run, original)
    (original / "eval.json").write_text("{}")  # what `peftcli eval` adds to a run
    if saved != "as saved now":
        _saved_as_before(original, original)
    copy = tmp_path / "elsewhere" / "copy"
    shutil.copytree(original, copy)
    before = _snapshot(original)
    result = cli("train", copy / "recipe.yaml", "--overwrite")
    assert result.code == 0, result.err
    assert _snapshot(original) == before
    assert not (copy / "eval.json").exists() and read_json(copy / "metrics.json")["status"] == "completed"
    assert f"run written to {copy}" in result.out
    assert (f"training that run (its output.dir, {original}" in result.err) == (saved != "as saved now")
    # The retrained copy's recipe names the folder it lies in, so it survives the next move too.
    assert yaml.safe_load((copy / "recipe.yaml").read_text())["output"]["dir"] == "."


@pytest.mark.slow
def test_a_runs_recipe_copied_out_alone_names_no_run(finished_run, tmp_path, cli):
    """A run's recipe.yaml copied beside other files is a recipe like any other: its output.dir (`.`)
    is its new folder, which holds it, so training it is refused instead of aimed at the run."""
    original = tmp_path / "fin"
    shutil.copytree(finished_run, original)
    project = tmp_path / "project"
    project.mkdir()
    shutil.copy(original / "recipe.yaml", project / "again.yaml")
    before = _snapshot(tmp_path)
    result = cli("train", project / "again.yaml", "--overwrite")
    assert result.code == 2 and len(result.error_lines) == 1 and "holds the recipe file" in result.err, result.err
    assert _snapshot(tmp_path) == before


@pytest.mark.slow
@pytest.mark.parametrize("saved", ["as saved now", "absolute, as saved before"])
def test_resuming_a_moved_run_resumes_it_where_it_lies(tiny_model, tmp_path, cli, monkeypatch, saved):
    from helpers import interrupted_run

    first = tmp_path / "first"
    path = write_recipe(tmp_path / "r.yaml", resumable_recipe(tiny_model, first, steps=8))
    interrupted_run(path, monkeypatch, step=4)
    assert (first / "checkpoint-4").is_dir() and not (first / "adapter").exists()
    # (the interruption itself saves a checkpoint of the step it stopped at)
    newest = max((p for p in first.glob("checkpoint-*")), key=lambda p: int(p.name.split("-")[1])).name
    if saved != "as saved now":
        _saved_as_before(first, first)
    moved = tmp_path / "moved"
    first.rename(moved)
    result = cli("train", moved / "recipe.yaml", "--resume")
    assert result.code == 0, result.err
    assert not first.exists()
    assert f"resuming from {newest}" in result.err
    assert read_json(moved / "metrics.json")["steps"] == 8 and (moved / "adapter").is_dir()
