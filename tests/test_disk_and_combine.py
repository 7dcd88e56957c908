"""Nothing lost, two more ways: a disk that refuses a save during training (full, over quota,
read-only) is one `error:` line naming the folder being written, the space left and what is saved,
and the unfinished save is removed so the disk is not left full; and `merge RUN_A RUN_B` (combining
adapters) refuses an adapter that does not fit the base, where PEFT alone loaded it in silence.

(tests/test_nothing_lost.py covers a full disk while `eval` writes its report.)"""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import pytest
import yaml
from helpers import base_recipe, make_tiny_model, read_json, write_recipe

# safetensors (Rust) says "disk full" in its own words, with no path at all.
SAFETENSORS_FULL = RuntimeError(
    'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'
)


def _recipe(tmp: Path, tiny_model: Path) -> Path:
    """4 steps, a checkpoint every 2, all kept."""
    training = {"max_steps": 4, "save_steps": 2, "save_total_limit": None}
    return write_recipe(tmp / "r.yaml", base_recipe(tiny_model, tmp / "run", data={"eval": None}, training=training))


def _disk_refuses_checkpoint(monkeypatch, step: int, failure: Exception) -> None:
    """The disk refuses checkpoint-`step` after part of it was written (the RNG state comes last)."""
    from peftcli.training import checkpoints

    original = checkpoints.SafeCheckpoints._save_rng_state

    def save(self, output_dir):
        original(self, output_dir)
        if self.state.global_step == step:
            raise failure

    monkeypatch.setattr(checkpoints.SafeCheckpoints, "_save_rng_state", save)


def _one_error(result, *needles: str) -> str:
    assert result.code == 2 and len(result.error_lines) == 1 and "Traceback" not in result.err, result.err
    for needle in needles:
        assert needle in result.err, result.err
    return result.error_lines[0]


def _staging(run: Path) -> list[str]:
    return [p.name for p in run.glob(".tmp-*")] if run.is_dir() else []


@pytest.mark.slow
def test_a_full_disk_at_a_checkpoint_names_it_cleans_up_and_resumes(tmp_path, tiny_model, cli, monkeypatch):
    path, run = _recipe(tmp_path, tiny_model), tmp_path / "run"
    _disk_refuses_checkpoint(monkeypatch, 4, OSError(errno.ENOSPC, "No space left on device"))
    line = _one_error(cli("train", path), "--resume", "checkpoint-2 is complete")
    assert f"cannot write {run / 'checkpoint-4'}: no space left on device" in line and "free there" in line
    assert _staging(run) == [] and not (run / "checkpoint-4").exists()  # the unfinished save is gone
    monkeypatch.undo()  # space was freed
    result = cli("train", path, "--resume")
    assert result.code == 0 and "resuming from checkpoint-2" in result.err, result.err
    assert read_json(run / "metrics.json")["steps"] == 4 and (run / "adapter").is_dir()


@pytest.mark.slow
@pytest.mark.parametrize(
    "failure, said, hinted",
    [
        (OSError(errno.EDQUOT, "Disk quota exceeded"), "disk quota exceeded", "raise the disk quota"),
        (OSError(errno.EROFS, "Read-only file system"), "read-only file system", "writable folder"),
        (SAFETENSORS_FULL, "no space left on device", "free some space"),
    ],
    ids=["quota", "read-only", "safetensors' wording"],
)
def test_a_refused_first_checkpoint_leaves_no_folder(tmp_path, tiny_model, cli, monkeypatch, failure, said, hinted):
    """Nothing was saved yet: the new run's folder goes, and the hint says to run it again."""
    path, run = _recipe(tmp_path, tiny_model), tmp_path / "run"
    _disk_refuses_checkpoint(monkeypatch, 2, failure)
    line = _one_error(cli("train", path), hinted)
    assert f"cannot write {run / 'checkpoint-2'}: {said}" in line
    assert not run.exists()


@pytest.mark.slow
def test_a_full_disk_while_saving_the_adapter_names_it_and_keeps_checkpoints(tmp_path, tiny_model, cli, monkeypatch):
    from peftcli.training import artifact

    path, run = _recipe(tmp_path, tiny_model), tmp_path / "run"
    original = artifact.save_artifact

    def full(recipe, setup, model, folder):
        original(recipe, setup, model, folder)  # written, then the disk fills up
        raise SAFETENSORS_FULL

    monkeypatch.setattr(artifact, "save_artifact", full)
    line = _one_error(cli("train", path), "checkpoint-4 is complete", "--resume")
    assert f"cannot write {run / 'adapter'}: no space left on device" in line, line
    assert _staging(run) == [] and not (run / "adapter").exists()
    monkeypatch.undo()
    result = cli("train", path, "--resume")  # checkpoint-4 is the last step: only the results are written
    assert result.code == 0 and (run / "adapter" / "adapter_model.safetensors").is_file(), result.err


# --- combining adapters: every adapter goes through the checked loader -------------------------------


@pytest.fixture(scope="module")
def shallow_model(tmp_path_factory) -> Path:
    """Same width and module names as tiny_model, one layer instead of two."""
    return make_tiny_model.build_tiny_model(tmp_path_factory.mktemp("models") / "shallow", layers=1)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model, shallow_model) -> dict[str, Path]:
    """`shallow`: a run on the one-layer base; `deep`: a run on the two-layer base whose recipe now
    names the one-layer base (the model folder was replaced), as combining it would see it."""
    from helpers import train

    tmp = tmp_path_factory.mktemp("combine")
    trained = {}
    for name, base in (("shallow", shallow_model), ("trained-deep", tiny_model)):
        training = {"max_steps": 2, "save_steps": 2}
        recipe = base_recipe(base, tmp / name, data={"eval": None}, training=training)
        trained[name] = train(write_recipe(tmp / f"{name}.yaml", recipe)).run_dir
    deep = tmp / "deep"
    shutil.copytree(trained.pop("trained-deep"), deep)
    saved = yaml.safe_load((deep / "recipe.yaml").read_text())
    saved["model"]["name"], saved["output"]["dir"] = str(shallow_model), str(deep)
    (deep / "recipe.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    return {"shallow": trained["shallow"], "deep": deep}


@pytest.mark.slow
@pytest.mark.parametrize("order", [("deep", "shallow"), ("shallow", "deep")], ids=["first", "second"])
def test_combining_an_adapter_for_a_deeper_base_is_refused(runs, tmp_path, cli, order):
    """PEFT dropped the second layer's weights in silence and the combination exited 0."""
    out = tmp_path / "combined"
    result = cli("merge", *(runs[name] for name in order), "--as-adapter", "--out", out)
    line = _one_error(result, "does not fit the base", "no place in the base", "layers.1.")
    assert "deep" in line and not out.exists()


@pytest.mark.slow
def test_combining_an_adapter_config_without_its_rank_is_one_error(runs, tmp_path, cli):
    damaged = tmp_path / "damaged"
    shutil.copytree(runs["shallow"], damaged)
    config_file = damaged / "adapter" / "adapter_config.json"
    config = json.loads(config_file.read_text())
    del config["r"]
    config_file.write_text(json.dumps(config))
    saved = yaml.safe_load((damaged / "recipe.yaml").read_text())
    saved["output"]["dir"] = str(damaged)
    (damaged / "recipe.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    result = cli("merge", runs["shallow"], damaged, "--out", tmp_path / "combined")
    _one_error(result, str(config_file), "rank")
