"""Nothing lost: peftcli deletes only what it wrote, checks a checkpoint before it drops anything
for it, never reads a pickle, holds a lock on the run it writes, and never exits 0 when interrupted.
Each test is a case a user can produce; each was seen to fail on the code before these rules."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from helpers import (
    DEMO_TRAIN,
    base_recipe,
    interrupted_run,
    read_json,
    resumable_recipe,
    signal_when_called,
    write_recipe,
)


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


def _project(tmp: Path, tiny_model: Path, output_dir: str) -> Path:
    """A user's project folder: recipe.yaml (init's name), the data, notes."""
    project = tmp / "project"
    project.mkdir()
    shutil.copy(DEMO_TRAIN, project / "train.jsonl")
    (project / "notes.md").write_text("my notes")
    recipe = base_recipe(tiny_model, Path(output_dir), data={"train": "train.jsonl", "eval": None})
    recipe["output"]["dir"] = output_dir
    return write_recipe(project / "recipe.yaml", recipe)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_model) -> Path:
    from helpers import train

    tmp = tmp_path_factory.mktemp("finished")
    recipe = base_recipe(tiny_model, tmp / "run", training={"max_steps": 4, "save_steps": 2})
    return train(write_recipe(tmp / "recipe.yaml", recipe)).run_dir


def _copy_run(run: Path, tmp: Path) -> Path:
    copy = tmp / "run-copy"
    shutil.copytree(run, copy)
    saved = yaml.safe_load((copy / "recipe.yaml").read_text())
    saved["output"]["dir"] = str(copy)
    (copy / "recipe.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    return copy


# --- deletion touches only what peftcli wrote ------------------------------------------------------


@pytest.mark.parametrize("flags", [(), ("--overwrite",)])
def test_output_dir_on_the_project_folder_is_refused(tmp_path, tiny_model, cli, flags):
    """`output.dir: .` beside recipe.yaml once let --overwrite delete the recipe, the data and notes."""
    recipe = _project(tmp_path, tiny_model, ".")
    before = _snapshot(tmp_path)
    result = cli("train", recipe, *flags)
    assert result.code == 2 and len(result.error_lines) == 1, result.err
    assert "holds the recipe file" in result.error_lines[0]
    assert _snapshot(tmp_path) == before


@pytest.mark.parametrize("flags", [(), ("--overwrite",)])
def test_a_project_folder_holding_only_run_named_files_is_not_a_run(tmp_path, tiny_model, cli, flags):
    """The same with the data elsewhere and only run-named files beside the recipe (its notes in a
    report.md): the folder once passed for an unmarked old run, and --overwrite emptied it."""
    project = tmp_path / "project"
    project.mkdir()
    recipe = base_recipe(tiny_model, ".", data={"train": str(DEMO_TRAIN), "eval": None})
    path = write_recipe(project / "recipe.yaml", recipe)
    (project / "report.md").write_text("my notes\n")
    before = _snapshot(tmp_path)
    result = cli("train", path, *flags)
    assert result.code == 2 and len(result.error_lines) == 1, result.err
    assert _snapshot(tmp_path) == before


@pytest.mark.parametrize("where", ["model", "data folder", "ancestor of the data"])
def test_output_dir_may_not_hold_the_model_or_the_data(tmp_path, tiny_model, cli, where):
    data = tmp_path / "sets" / "mine" / "train.jsonl"
    data.parent.mkdir(parents=True)
    shutil.copy(DEMO_TRAIN, data)
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    out = {"model": model, "data folder": data.parent, "ancestor of the data": tmp_path / "sets"}[where]
    recipe = base_recipe(model, out, data={"train": str(data), "eval": None})
    path = write_recipe(tmp_path / "r.yaml", recipe)
    before = _snapshot(tmp_path)
    result = cli("train", path, "--overwrite")
    assert result.code == 2 and "a run directory must be a folder of its own" in result.err, result.err
    assert _snapshot(tmp_path) == before


def test_a_recipe_yaml_naming_its_folder_does_not_make_it_a_run(tmp_path, tiny_model, cli):
    """A folder is a run because peftcli marked it, not because it holds a recipe.yaml."""
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "recipe.yaml").write_text(f"output: {{dir: {folder}}}\n")
    (folder / "data.jsonl").write_text(DEMO_TRAIN.read_text())
    path = write_recipe(tmp_path / "r.yaml", base_recipe(tiny_model, folder))
    before = _snapshot(tmp_path)
    result = cli("train", path, "--overwrite")
    assert result.code == 2 and "is not a peftcli run" in result.err, result.err
    assert _snapshot(tmp_path) == before


@pytest.mark.slow
def test_overwrite_keeps_files_it_did_not_write(finished_run, tmp_path, cli):
    run = _copy_run(finished_run, tmp_path)
    (run / "notes.txt").write_text("keep me")
    before = _snapshot(run)
    result = cli("train", run / "recipe.yaml", "--overwrite")
    assert result.code == 2 and "notes.txt" in result.err and "did not write" in result.err, result.err
    assert _snapshot(run) == before
    (run / "notes.txt").unlink()
    assert cli("train", run / "recipe.yaml", "--overwrite").code == 0  # its own files only: replaced


@pytest.mark.slow
def test_merge_force_keeps_files_it_did_not_write(finished_run, tmp_path, cli):
    out = tmp_path / "merged"
    assert cli("merge", finished_run, "--out", out).code == 0
    assert "model.safetensors" in read_json(out / "peftcli.json")["files"]
    (out / "deploy.sh").write_text("#!/bin/sh\n")
    result = cli("merge", finished_run, "--out", out, "--force")
    assert result.code == 2 and "deploy.sh" in result.err, result.err
    assert (out / "deploy.sh").exists() and (out / "model.safetensors").exists()


# --- resume: check first, remove later ------------------------------------------------------------


def _interrupted(tmp: Path, tiny_model, monkeypatch, name: str = "run", **peft) -> tuple[Path, Path]:
    recipe = resumable_recipe(tiny_model, tmp / name)
    recipe["peft"].update(peft)
    return interrupted_run(write_recipe(tmp / f"{name}.yaml", recipe), monkeypatch, 9), tmp / name


@pytest.mark.slow
def test_resume_from_another_runs_checkpoint_removes_nothing(tmp_path, tiny_model, cli, monkeypatch):
    path, run = _interrupted(tmp_path, tiny_model, monkeypatch)
    _, other = _interrupted(tmp_path, tiny_model, monkeypatch, name="other", r=8)
    before = _snapshot(run)
    refused = cli("train", path, "--resume", other / "checkpoint-4")
    assert refused.code == 2 and "belongs to another run" in refused.err and "peft.r" in refused.err, refused.err
    assert _snapshot(run) == before
    forced = cli("train", path, "--resume", other / "checkpoint-4", "--force")
    assert forced.code == 2 and "does not fit this model" in forced.err, forced.err
    assert "Traceback" not in forced.err
    assert {p.name for p in run.glob("checkpoint-*")} == {"checkpoint-4", "checkpoint-8", "checkpoint-10"}


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize(
    "damage, named",
    [
        (lambda c: _truncate(c / "adapter_model.safetensors"), "adapter_model.safetensors: truncated"),
        (lambda c: _truncate(c / "optimizer.safetensors"), "optimizer.safetensors: truncated"),
        (lambda c: _truncate(c / "trainer_state.json"), "trainer_state.json: damaged"),
        # JSON that parses but holds nothing resumable: once a KeyError after the run had started
        (lambda c: (c / "rng_state.json").write_text("{}"), "rng_state.json lacks"),
        (lambda c: (c / "optimizer.json").write_text("{}"), "optimizer.json lacks"),
        (lambda c: (c / "scheduler.json").write_text("[]"), "scheduler.json lacks"),
    ],
    ids=[
        "truncated adapter",
        "truncated optimizer",
        "cut trainer_state.json",
        "empty rng",
        "empty optimizer",
        "scheduler",
    ],
)
@pytest.mark.slow
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous(tmp_path, tiny_model, cli, monkeypatch, damage, named):
    path, run = _interrupted(tmp_path, tiny_model, monkeypatch)
    damage(run / "checkpoint-10")
    result = cli("train", path, "--resume")
    assert result.code == 0, result.err
    assert f"skipping checkpoint-10: damaged ({named}" in result.err and "resuming from checkpoint-8" in result.err
    assert read_json(run / "metrics.json")["steps"] == 12
    named_path = cli("train", path, "--resume", run / "checkpoint-8")  # finished now: nothing to resume
    assert named_path.code == 2


@pytest.mark.slow
def test_resume_from_a_named_checkpoint_that_cannot_load_removes_nothing(tmp_path, tiny_model, cli, monkeypatch):
    """The later checkpoints go only once the named one has loaded: a damaged RNG state used to
    remove checkpoint-8 and -10 and then fail with "this is a bug"."""
    path, run = _interrupted(tmp_path, tiny_model, monkeypatch)
    (run / "checkpoint-4" / "rng_state.json").write_text("{}")
    result = cli("train", path, "--resume", run / "checkpoint-4")
    assert result.code == 2 and "rng_state.json" in result.err and "bug" not in result.err, result.err
    assert {p.name for p in run.glob("checkpoint-*")} == {"checkpoint-4", "checkpoint-8", "checkpoint-10"}


@pytest.mark.slow
def test_a_pickled_optimizer_is_not_taken_for_the_optimizer_state(tmp_path, tiny_model, cli, monkeypatch):
    """A checkpoint without optimizer.json but with an optimizer.pt once resumed with a fresh optimizer."""
    path, run = _interrupted(tmp_path, tiny_model, monkeypatch)
    for name in ("optimizer.json", "optimizer.safetensors"):
        (run / "checkpoint-10" / name).unlink()
    (run / "checkpoint-10" / "optimizer.pt").write_bytes(b"\x80\x04K\x01.")
    calls = []
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(a) or pytest.fail("torch.load called"))
    result = cli("train", path, "--resume")
    assert result.code == 0, result.err
    assert "skipping checkpoint-10" in result.err and "optimizer.pt is a PyTorch pickle" in result.err
    assert "resuming from checkpoint-8" in result.err and calls == []


# --- no pickle is ever handed to torch.load -----------------------------------------------------------


@pytest.mark.parametrize("command", ["eval", "merge", "generate"])
@pytest.mark.slow
def test_a_pickled_adapter_is_refused_unread(finished_run, tmp_path, cli, monkeypatch, command):
    run = _copy_run(finished_run, tmp_path)
    (run / "adapter" / "adapter_model.safetensors").unlink()
    (run / "adapter" / "adapter_model.bin").write_bytes(b"\x80\x04K\x01.")
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load called"))
    argv = {
        "eval": ["eval", run],
        "merge": ["merge", run, "--out", tmp_path / "merged"],
        "generate": ["generate", "--adapter", f"a={run}", "--prompt", "hi"],
    }[command]
    result = cli(*argv)
    assert result.code == 2 and len(result.error_lines) == 1, result.err
    assert "adapter_model.bin, a PyTorch pickle" in result.err
    assert not (tmp_path / "merged").exists()


def test_a_model_with_pickled_weights_only_is_refused(tmp_path, tiny_model, cli):
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    (model / "model.safetensors").unlink()
    (model / "pytorch_model.bin").write_bytes(b"\x80\x04K\x01.")
    path = write_recipe(tmp_path / "r.yaml", base_recipe(model, tmp_path / "run"))
    for command in ("validate", "train"):
        result = cli(command, path)
        assert result.code == 2 and "pytorch_model.bin, a PyTorch pickle" in result.err, result.err
    assert not (tmp_path / "run").exists()


# --- interruption anywhere: 130/143, never 0, saying what was saved ------------------------------------


def test_ctrl_c_while_loading_exits_130_and_leaves_no_folder(tmp_path, tiny_model, cli, monkeypatch):
    from peftcli.training import run as stage

    signal_when_called(monkeypatch, stage, "build_setup", signal.SIGINT)
    result = cli("train", write_recipe(tmp_path / "r.yaml", base_recipe(tiny_model, tmp_path / "run")))
    assert result.code == 130, result.err
    assert "interrupted: SIGINT received; nothing was saved" in result.err
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_sigterm_before_the_first_step_leaves_a_folder_one_command_gets_past(tmp_path, tiny_model, cli, monkeypatch):
    from peftcli.training import run as stage

    path = write_recipe(tmp_path / "r.yaml", base_recipe(tiny_model, tmp_path / "run", training={"max_steps": 2}))
    signal_when_called(monkeypatch, stage, "build_trainer", signal.SIGTERM)
    result = cli("train", path)
    assert result.code == 143 and "SIGTERM received" in result.err, result.err
    assert not (tmp_path / "run").exists()
    monkeypatch.undo()
    assert cli("train", path).code == 0  # the same command again, nothing to clean up first


@pytest.mark.slow
def test_ctrl_c_during_the_final_save_says_how_to_finish(tmp_path, tiny_model, cli, monkeypatch):
    from peftcli.training import run as stage

    path = write_recipe(tmp_path / "r.yaml", resumable_recipe(tiny_model, tmp_path / "run", steps=4))
    signal_when_called(monkeypatch, stage, "keep_artifact", signal.SIGINT)
    result = cli("train", path)
    assert result.code == 130, result.err
    assert "checkpoint-4 is saved" in result.err and "the final adapter was not written" in result.err
    assert f"peftcli train {path} --resume" in result.err
    assert not (tmp_path / "run" / "adapter").exists()
    monkeypatch.undo()
    finished = cli("train", path, "--resume")
    assert finished.code == 0, finished.err
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").exists()


@pytest.mark.slow
def test_ctrl_c_in_eval_exits_130_and_writes_no_results(finished_run, tmp_path, cli, monkeypatch):
    from peftcli.evaluation import evaluate

    run = _copy_run(finished_run, tmp_path)
    signal_when_called(monkeypatch, evaluate, "score", signal.SIGINT)
    result = cli("eval", run)
    assert result.code == 130 and "the eval results were not written" in result.err, result.err
    assert not (run / "eval.json").exists() and not (run / ".peftcli.lock").exists()


@pytest.mark.slow
def test_sigterm_in_merge_exits_143_and_writes_nothing(finished_run, tmp_path, cli, monkeypatch):
    from peftcli.export import merge

    signal_when_called(monkeypatch, merge, "compare", signal.SIGTERM)
    result = cli("merge", finished_run, "--out", tmp_path / "merged")
    assert result.code == 143 and f"nothing was written to {tmp_path / 'merged'}" in result.err, result.err
    assert not list(tmp_path.iterdir())  # not the folder, nor a staging sibling


# --- one writer per run ---------------------------------------------------------------------------------


@pytest.mark.parametrize("argv", [("train", "--resume"), ("train", "--overwrite"), ("eval",), ("merge",)])
@pytest.mark.slow
def test_a_run_in_use_is_refused_naming_the_process(finished_run, tmp_path, cli, argv):
    from peftcli.rundir.lock import RunLock

    run = _copy_run(finished_run, tmp_path)
    if argv == ("train", "--resume"):
        shutil.rmtree(run / "adapter")  # as if interrupted after its last checkpoint
    if argv[0] == "train":
        args = [argv[0], run / "recipe.yaml", *argv[1:]]
    else:
        args = [*argv, run, *(["--out", tmp_path / "merged"] if argv[0] == "merge" else [])]
    with RunLock(run):
        before = _snapshot(run)
        result = cli(*args)
        assert result.code == 2 and len(result.error_lines) == 1, result.err
        assert f"in use by another peftcli process: PID {os.getpid()}" in result.err
        assert _snapshot(run) == before
    assert not (run / ".peftcli.lock").exists()


@pytest.mark.slow
def test_a_lock_left_by_a_killed_process_is_taken_over(finished_run, tmp_path, cli):
    run = _copy_run(finished_run, tmp_path)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (run / ".peftcli.lock").write_text(json.dumps({"pid": int(dead.stdout), "host": os.uname().nodename}))
    result = cli("eval", run)
    assert result.code == 0, result.err
    assert not (run / ".peftcli.lock").exists()


@pytest.mark.slow
def test_a_second_train_cannot_write_into_a_live_run(tmp_path, tiny_model):
    recipe = resumable_recipe(tiny_model, tmp_path / "run", steps=4000)
    path = write_recipe(tmp_path / "r.yaml", recipe)
    first = subprocess.Popen(
        [sys.executable, "-m", "peftcli", "train", str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (tmp_path / "run" / ".peftcli.lock").exists():
            time.sleep(0.05)
        second = subprocess.run(
            [sys.executable, "-m", "peftcli", "train", str(path), "--overwrite"], capture_output=True, text=True
        )
        assert second.returncode == 2 and f"PID {first.pid}" in second.stderr, second.stderr
        assert first.poll() is None  # the first run goes on, undisturbed
    finally:
        first.send_signal(signal.SIGTERM)
        _, err = first.communicate(timeout=120)
    assert first.returncode == 143, err


# --- the environment, and artifacts that are not what they should be ----------------------------------


@pytest.fixture(scope="module")
def wider_model(tmp_path_factory) -> Path:
    """A base of another size than tiny_model (same architecture and module names)."""
    from helpers import make_tiny_model

    return make_tiny_model.build_tiny_model(tmp_path_factory.mktemp("models") / "wider", hidden=96)


@pytest.mark.slow
def test_an_adapter_on_another_base_is_a_clear_error(finished_run, wider_model, tmp_path, cli):
    result = cli("generate", "--base", wider_model, "--adapter", f"a={finished_run}", "--prompt", "hi")
    assert result.code == 2 and "does not fit the base" in result.err and "Traceback" not in result.err, result.err
    run = _copy_run(finished_run, tmp_path)
    saved = yaml.safe_load((run / "recipe.yaml").read_text())
    saved["model"]["name"] = str(wider_model)  # the model folder was replaced by another model
    (run / "recipe.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    for argv in (("eval", run), ("merge", run, "--out", tmp_path / "merged")):
        result = cli(*argv)
        assert result.code == 2 and "does not fit the base" in result.err, result.err


@pytest.mark.slow
def test_a_truncated_adapter_is_named(finished_run, tmp_path, cli):
    run = _copy_run(finished_run, tmp_path)
    _truncate(run / "adapter" / "adapter_model.safetensors")
    result = cli("eval", run)
    assert result.code == 2 and "adapter_model.safetensors: truncated" in result.err, result.err


def test_an_invalid_config_json_is_a_user_error(tmp_path, tiny_model, cli):
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    (model / "config.json").write_text('{"model_type": "llama", ')
    path = write_recipe(tmp_path / "r.yaml", base_recipe(model, tmp_path / "run"))
    for command in ("validate", "train"):
        result = cli(command, path)
        assert result.code == 2 and "config.json is not valid JSON" in result.err, result.err


@pytest.mark.parametrize(
    "failure",
    [
        OSError(errno.ENOSPC, "No space left on device", "/data/runs/x/eval.json"),
        RuntimeError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: ... })"),
    ],
    ids=["OSError", "safetensors' wording"],
)
@pytest.mark.slow
def test_a_full_disk_is_an_environment_error(finished_run, tmp_path, cli, monkeypatch, failure):
    from peftcli.rundir import eval_report

    def full(*args, **kwargs):
        raise failure

    monkeypatch.setattr(eval_report, "atomic_write_json", full)
    result = cli("eval", _copy_run(finished_run, tmp_path))
    assert result.code == 2 and len(result.error_lines) == 1, result.err
    assert "space left on device" in result.err.lower() and "this is a bug" not in result.err


def test_schema_and_init_replace_only_their_own_files(tmp_path, cli):
    notes = tmp_path / "notes.json"
    notes.write_text('{"mine": true}')
    refused = cli("schema", "--out", notes)
    assert refused.code == 2 and "not a peftcli schema" in refused.err, refused.err
    assert notes.read_text() == '{"mine": true}'
    schema = tmp_path / "peftcli.schema.json"
    assert cli("schema", "--out", schema).code == 0 and cli("schema", "--out", schema).code == 0  # a refresh
    folder = tmp_path / "folder"
    folder.mkdir()
    result = cli("init", "--out", folder, "--force")
    assert result.code == 2 and "is not a file" in result.err, result.err
