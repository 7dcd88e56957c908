"""Runs that survive: determinism, resume, graceful interruption, kill -9 during a save, memory
guard, and the safety defaults (no pickle, no remote code, no token leaks)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from helpers import (
    ROOT,
    adapter_weights,
    interrupt_at,
    interrupted_run,
    read_json,
    resumable_recipe,
    train,
    write_recipe,
)

from peftcli.errors import Interrupted
from peftcli.training.checkpoints import missing_files


@pytest.mark.slow
def test_same_recipe_and_seed_give_the_same_loss_history(tmp_path, tiny_model):
    first = train(write_recipe(tmp_path / "a.yaml", resumable_recipe(tiny_model, tmp_path / "a")))
    second = train(write_recipe(tmp_path / "b.yaml", resumable_recipe(tiny_model, tmp_path / "b")))
    assert (
        read_json(first.run_dir / "metrics.json")["loss_history"]
        == read_json(second.run_dir / "metrics.json")["loss_history"]
    )


@pytest.mark.slow
def test_interrupted_then_resumed_equals_uninterrupted(tmp_path, tiny_model, monkeypatch):
    reference = train(write_recipe(tmp_path / "ref.yaml", resumable_recipe(tiny_model, tmp_path / "ref")))

    # Same recipe; a SIGTERM arrives during step 6 (mid-epoch, between saves).
    path = write_recipe(tmp_path / "run.yaml", resumable_recipe(tiny_model, tmp_path / "run"))
    before = signal.getsignal(signal.SIGTERM)
    interrupt_at(monkeypatch, 5)
    with pytest.raises(Interrupted) as info:
        train(path)
    assert info.value.exit_code == 143
    assert (tmp_path / "run" / "checkpoint-6").is_dir() and not missing_files(tmp_path / "run" / "checkpoint-6")
    assert read_json(tmp_path / "run" / "metrics.json")["status"] == "interrupted"
    assert not (tmp_path / "run" / "adapter").exists()
    assert signal.getsignal(signal.SIGTERM) is before  # the handler is put back after the run

    resumed = train(path, resume="latest")
    expected, got = adapter_weights(reference.run_dir), adapter_weights(resumed.run_dir)
    assert expected.keys() == got.keys()
    assert max((expected[k] - got[k]).abs().max().item() for k in expected) <= 1e-6
    assert (
        read_json(resumed.run_dir / "metrics.json")["loss_history"]
        == read_json(reference.run_dir / "metrics.json")["loss_history"]
    )


@pytest.mark.slow
def test_checkpoints_hold_no_pickle(tmp_path, tiny_model):
    run = train(write_recipe(tmp_path / "r.yaml", resumable_recipe(tiny_model, tmp_path / "run", steps=4))).run_dir
    files = [p.name for p in run.rglob("*") if p.is_file()]
    assert "optimizer.safetensors" in files and "rng_state.json" in files
    assert not [f for f in files if f.endswith((".pt", ".pth", ".bin", ".pkl"))], files
    for path in run.rglob("*"):
        if path.is_file() and path.suffix not in (".png",):
            head = path.read_bytes()[:4]
            assert not head.startswith(b"PK\x03\x04"), f"{path} is a torch zip/pickle archive"
            assert not head.startswith(b"\x80"), f"{path} is a raw pickle"


def test_no_unsafe_loading_in_the_code():
    source = "\n".join(p.read_text() for p in (ROOT / "peftcli").rglob("*.py"))
    for unsafe in ("yaml.load(", "import pickle", "pickle.load", "torch.save(", "dill"):
        assert unsafe not in source, unsafe
    for line in source.splitlines():
        if "torch.load(" in line:
            assert "weights_only=True" in line, line


@pytest.mark.slow
def test_resume_unpickles_nothing(tmp_path, tiny_model, monkeypatch):
    """Resuming reads no pickle, in peftcli or in the libraries it drives (a checkpoint from an
    untrusted source cannot run code)."""
    import pickle

    path = interrupted_run(
        write_recipe(tmp_path / "r.yaml", resumable_recipe(tiny_model, tmp_path / "run")), monkeypatch, 5
    )
    calls = []
    for owner, name in ((torch, "load"), (pickle, "load"), (pickle, "loads")):
        real = getattr(owner, name)
        monkeypatch.setattr(owner, name, lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k))
    assert train(path, resume="latest").result.steps == 12
    assert calls == []


@pytest.mark.slow
def test_resume_refuses_a_changed_recipe_unless_forced(tmp_path, tiny_model, cli, monkeypatch):
    path = interrupted_run(
        write_recipe(tmp_path / "r.yaml", resumable_recipe(tiny_model, tmp_path / "run")), monkeypatch, 5
    )
    changed = cli("train", path, "--resume", "--set", "training.learning_rate=0.1", "--set", "training.save_steps=2")
    assert changed.code == 2 and "training.learning_rate" in changed.err and "save_steps" not in changed.err
    assert "--force" in changed.err
    forced = cli("train", path, "--resume", "--force", "--set", "training.learning_rate=0.1")
    assert forced.code == 0, forced.err
    assert "learning_rate: 0.1" in (tmp_path / "run" / "recipe.yaml").read_text()
    again = cli("train", path, "--resume")
    assert again.code == 2 and "already finished" in again.err


@pytest.mark.slow
def test_resume_picks_the_newest_complete_checkpoint(tmp_path, tiny_model, cli, monkeypatch):
    path = interrupted_run(
        write_recipe(tmp_path / "r.yaml", resumable_recipe(tiny_model, tmp_path / "run")), monkeypatch, 9
    )
    run = tmp_path / "run"
    assert {p.name for p in run.glob("checkpoint-*")} == {"checkpoint-4", "checkpoint-8", "checkpoint-10"}
    (run / "checkpoint-10" / "optimizer.safetensors").unlink()  # damaged
    (run / ".tmp-checkpoint-12").mkdir()  # a save that never finished
    damaged = cli("train", path, "--resume", run / "checkpoint-10")
    assert damaged.code == 2 and "incomplete checkpoint" in damaged.err
    result = cli("train", path, "--resume")
    assert result.code == 0, result.err
    assert "skipping checkpoint-10: incomplete (missing optimizer.safetensors)" in result.err
    assert "ignoring .tmp-checkpoint-12" in result.err and "resuming from checkpoint-8" in result.err
    assert not (run / ".tmp-checkpoint-12").exists()
    assert read_json(run / "metrics.json")["steps"] == 12


@pytest.mark.slow
def test_resume_from_an_older_checkpoint_starts_a_new_timeline(tmp_path, tiny_model, cli, monkeypatch):
    """`--resume PATH` goes back to that checkpoint: the run ends as an uninterrupted one, and the
    later checkpoints of the abandoned timeline are gone (a later --resume must not pick them)."""
    reference = train(write_recipe(tmp_path / "ref.yaml", resumable_recipe(tiny_model, tmp_path / "ref"))).run_dir
    path = interrupted_run(
        write_recipe(tmp_path / "r.yaml", resumable_recipe(tiny_model, tmp_path / "run")), monkeypatch, 9
    )
    run = tmp_path / "run"
    result = cli("train", path, "--resume", run / "checkpoint-4")
    assert result.code == 0, result.err
    assert "resuming from checkpoint-4: removed the later checkpoint-8, checkpoint-10" in result.err
    assert {p.name for p in run.glob("checkpoint-*")} == {"checkpoint-4", "checkpoint-8", "checkpoint-12"}
    expected, got = adapter_weights(reference), adapter_weights(run)
    assert max((expected[k] - got[k]).abs().max().item() for k in expected) <= 1e-6
    assert read_json(run / "metrics.json")["loss_history"] == read_json(reference / "metrics.json")["loss_history"]


@pytest.mark.slow
def test_the_resume_hint_holds_the_overrides(tmp_path, tiny_model, cli, monkeypatch):
    """After `--set` overrides, the recipe file alone would resume another run: the hint names the
    run's saved recipe.yaml, which holds them, and that command does resume."""
    path = write_recipe(tmp_path / "r.yaml", resumable_recipe(tiny_model, tmp_path / "run"))
    other = tmp_path / "other"
    interrupt_at(monkeypatch, 2)
    result = cli("train", path, "--set", f"output.dir={other}", "--set", "training.learning_rate=0.01")
    assert result.code == 143, result.err
    hint = f"peftcli train {other / 'recipe.yaml'} --resume"
    assert hint in result.err
    resumed = cli(*hint.split()[1:])
    assert resumed.code == 0, resumed.err
    assert read_json(other / "metrics.json")["steps"] == 12 and not (tmp_path / "run").exists()


@pytest.mark.slow
def test_a_signal_during_the_last_step_still_finishes_the_run(tmp_path, tiny_model, monkeypatch):
    path = write_recipe(tmp_path / "r.yaml", resumable_recipe(tiny_model, tmp_path / "run"))
    interrupt_at(monkeypatch, 11)  # SIGTERM while step 12 of 12 runs
    outcome = train(path)
    assert outcome.result.status == "completed" and (tmp_path / "run" / "adapter").is_dir()


@pytest.mark.slow
def test_resume_from_a_checkpoint_at_the_last_step(tmp_path, tiny_model, cli):
    """A process killed right after its last checkpoint: resuming writes the results without
    training again (upstream Trainer would train one step too many)."""
    import shutil

    path = write_recipe(tmp_path / "r.yaml", resumable_recipe(tiny_model, tmp_path / "run"))
    assert cli("train", path).code == 0
    run = tmp_path / "run"
    shutil.rmtree(run / "adapter")  # as if killed after checkpoint-12 was saved
    (run / "metrics.json").unlink()
    moved = tmp_path / "moved"  # and restarted on a machine that mounts it elsewhere
    run.rename(moved)
    run = moved
    result = cli("train", path, "--resume", "--set", f"output.dir={moved}")
    assert result.code == 0, result.err
    assert yaml.safe_load((run / "recipe.yaml").read_text())["output"]["dir"] == "."  # its folder: moved
    assert "checkpoint-12 is the last step: nothing left to train" in result.err
    metrics = read_json(run / "metrics.json")
    assert metrics["steps"] == 12 and [h["step"] for h in metrics["loss_history"]] == list(range(1, 13))
    assert (run / "adapter" / "adapter_model.safetensors").exists()


def test_resume_without_a_run(tmp_path, tiny_model, cli):
    path = write_recipe(tmp_path / "r.yaml", resumable_recipe(tiny_model, tmp_path / "run"))
    result = cli("train", path, "--resume")
    assert result.code == 2 and "no run to resume" in result.err
    assert not (tmp_path / "run").exists()


def _start(recipe_path: Path, *extra: str, wrapper: str | None = None) -> subprocess.Popen:
    if wrapper:
        args = [sys.executable, "-c", wrapper, "train", str(recipe_path), *extra]
    else:
        args = [sys.executable, "-m", "peftcli", "train", str(recipe_path), *extra]
    return subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"}
    )


def _wait_for(process: subprocess.Popen, needle: str, timeout: float = 120) -> list[str]:
    seen, deadline = [], time.time() + timeout
    while time.time() < deadline:
        line = process.stderr.readline()
        if not line and process.poll() is not None:
            break
        seen.append(line)
        if needle in line:
            return seen
    process.kill()
    raise AssertionError(f"never saw {needle!r}: {''.join(seen)[-2000:]}")


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
@pytest.mark.slow
def test_signal_saves_a_checkpoint_and_exits_with_its_code(tmp_path, tiny_model, signum, code):
    path = write_recipe(tmp_path / "r.yaml", resumable_recipe(tiny_model, tmp_path / "run", steps=4000))
    process = _start(path)
    _wait_for(process, "training: step")
    process.send_signal(signum)
    _, err = process.communicate(timeout=120)
    assert process.returncode == code, err
    metrics = read_json(tmp_path / "run" / "metrics.json")
    assert metrics["status"] == "interrupted"
    step = metrics["steps"]
    assert not missing_files(tmp_path / "run" / f"checkpoint-{step}")
    assert f"peftcli train {path} --resume" in err and "Traceback" not in err
    assert "interrupted" in (tmp_path / "run" / "report.md").read_text()


# Runs peftcli with the save triggered by a stop request stalled, so a second signal lands mid-save.
SLOW_STOP_SAVE = """
import os, sys, time
from peftcli.training import checkpoints
original = checkpoints.SafeCheckpoints._save_rng_state
def slow(self, output_dir):
    original(self, output_dir)
    if self.control.should_training_stop:
        print("saving the stop checkpoint", file=sys.stderr, flush=True)
        time.sleep(600)
checkpoints.SafeCheckpoints._save_rng_state = slow
from peftcli.cli import main
main(sys.argv[1:])
"""


@pytest.mark.slow
def test_second_signal_exits_at_once_keeping_the_last_checkpoint(tmp_path, tiny_model):
    recipe = resumable_recipe(tiny_model, tmp_path / "run", steps=4000)
    recipe["training"]["save_steps"] = 20
    path = write_recipe(tmp_path / "r.yaml", recipe)
    process = _start(path, wrapper=SLOW_STOP_SAVE)
    _wait_for(process, "training: step")
    process.send_signal(signal.SIGTERM)
    _wait_for(process, "saving the stop checkpoint")
    process.send_signal(signal.SIGTERM)
    process.communicate(timeout=60)
    assert process.returncode == -signal.SIGTERM  # killed at once, not the graceful 143
    run = tmp_path / "run"
    complete = [p for p in run.glob("checkpoint-*") if not missing_files(p)]
    assert complete and len(complete) == len(list(run.glob("checkpoint-*")))  # no partial checkpoint-N
    assert list(run.glob(".tmp-checkpoint-*"))  # the interrupted save stays hidden in its staging folder


# Runs peftcli with a save that stalls while writing checkpoint-8, so the test can kill -9 it mid-save.
SLOW_SAVE = """
import os, sys, time
from peftcli.training import checkpoints
original = checkpoints.SafeCheckpoints._save_rng_state
def slow(self, output_dir):
    original(self, output_dir)
    if self.state.global_step == 8:
        open(os.environ["MARKER"], "w").close()
        time.sleep(600)
checkpoints.SafeCheckpoints._save_rng_state = slow
from peftcli.cli import main
main(sys.argv[1:])
"""


@pytest.mark.slow
def test_kill_during_save_leaves_the_previous_checkpoint(tmp_path, tiny_model, cli):
    path = write_recipe(tmp_path / "r.yaml", resumable_recipe(tiny_model, tmp_path / "run", steps=12))
    marker = tmp_path / "saving"
    os.environ["MARKER"] = str(marker)
    try:
        process = _start(path, wrapper=SLOW_SAVE)
        deadline = time.time() + 120
        while not marker.exists() and time.time() < deadline and process.poll() is None:
            time.sleep(0.05)
        assert marker.exists(), process.communicate()[1]
        process.send_signal(signal.SIGKILL)
        process.communicate(timeout=30)
    finally:
        del os.environ["MARKER"]
    run = tmp_path / "run"
    assert not (run / "checkpoint-8").exists()  # the half-written save is not visible as a checkpoint
    assert [p.name for p in run.glob(".tmp-checkpoint-8")]
    assert not missing_files(run / "checkpoint-4")
    result = cli("train", path, "--resume")
    assert result.code == 0, result.err
    assert "resuming from checkpoint-4" in result.err and "ignoring .tmp-checkpoint-8" in result.err
    assert read_json(run / "metrics.json")["steps"] == 12


@pytest.mark.slow
def test_out_of_memory_is_a_user_error_with_the_knobs(tmp_path, tiny_model, cli, monkeypatch):
    from transformers.models.llama.modeling_llama import LlamaModel

    # The decoder stack (accelerate wraps the top-level forward, not this one) fails on its 7th call.
    original = LlamaModel.forward
    calls = {"n": 0}

    def forward(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 7:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(LlamaModel, "forward", forward)
    recipe = resumable_recipe(tiny_model, tmp_path / "run", steps=12)
    recipe["training"]["save_steps"] = 2
    result = cli("train", write_recipe(tmp_path / "r.yaml", recipe))
    assert result.code == 2 and len(result.error_lines) == 1
    assert "out of memory at step 7" in result.err and "batch_size 16" in result.err
    assert "gradient_accumulation" in result.err and "gradient_checkpointing" in result.err
    assert "Traceback" not in result.err
    assert read_json(tmp_path / "run" / "metrics.json")["status"] == "out_of_memory"
    assert not missing_files(tmp_path / "run" / "checkpoint-6")


def test_remote_code_is_refused_unless_trusted(tmp_path, tiny_model, cli):
    import shutil

    model = tmp_path / "custom-model"
    shutil.copytree(tiny_model, model)
    config = json.loads((model / "config.json").read_text())
    config["auto_map"] = {
        "AutoConfig": "configuration_custom.CustomConfig",
        "AutoModelForCausalLM": "modeling_custom.CustomModel",
    }
    config["model_type"] = "custom-tiny"
    (model / "config.json").write_text(json.dumps(config))
    result = cli("train", write_recipe(tmp_path / "r.yaml", resumable_recipe(model, tmp_path / "run")))
    assert result.code == 2 and "trust_remote_code" in result.err
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_tokens_never_reach_files_or_output(tmp_path, tiny_model, cli, monkeypatch):
    token = "hf_" + "FakeToken1234567890abcdefghijk"
    monkeypatch.setenv("HF_TOKEN", token)
    path = write_recipe(tmp_path / "r.yaml", resumable_recipe(tiny_model, tmp_path / "run", steps=2))
    as_key = cli("train", path, "--set", f"model.token={token}")
    assert as_key.code == 2 and token not in as_key.err + as_key.out
    # A token pasted into a real key (local models ignore `revision`): the run trains, and neither
    # its files nor the merged model nor any output may show it.
    trained = cli("train", path, "--set", f"model.revision={token}")
    assert trained.code == 0, trained.err
    assert "<redacted>" in (tmp_path / "run" / "recipe.yaml").read_text()
    merged = cli("merge", tmp_path / "run", "--out", tmp_path / "merged")
    assert merged.code == 0, merged.err
    evaluated = cli("eval", tmp_path / "run")
    for result in (trained, merged, evaluated):
        assert token not in result.err + result.out
    for root in (tmp_path / "run", tmp_path / "merged"):
        for file in root.rglob("*"):
            if file.is_file():
                assert token.encode() not in file.read_bytes(), file
