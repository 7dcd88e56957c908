"""Helpers shared by test modules (fixtures stay in conftest.py): short resumable recipes, training
in-process, and signals delivered at a chosen point of a run."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
from conftest import base_recipe


def resumable_recipe(tiny_model, out: Path, steps: int = 12, **sections) -> dict:
    """A LoRA recipe that saves every 4 steps and keeps every checkpoint."""
    recipe = base_recipe(
        tiny_model, out, training={"max_steps": steps, "save_steps": 4, "save_total_limit": None}, **sections
    )
    recipe["peft"] = {"method": "lora", "r": 4, "dropout": 0.1}  # dropout: the RNG must be restored too
    return recipe


def train(path: Path, **kwargs):
    from peftcli.recipe import load_recipe
    from peftcli.training import run_training

    return run_training(load_recipe(path), **kwargs)


def interrupt_at(monkeypatch, step: int, signum: int = signal.SIGTERM) -> None:
    """Make the next training run receive `signum` while it runs step `step` + 1."""
    from transformers import TrainerCallback

    from peftcli.training import stage

    class SignalAtStep(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == step:
                os.kill(os.getpid(), signum)

    real_build = stage.build_trainer

    def build_with_signal(*args, callbacks, **kwargs):
        monkeypatch.setattr(stage, "build_trainer", real_build)  # only this run
        return real_build(*args, callbacks=[*callbacks, SignalAtStep()], **kwargs)

    monkeypatch.setattr(stage, "build_trainer", build_with_signal)


def interrupted_run(path: Path, monkeypatch, step: int) -> Path:
    from peftcli.errors import Interrupted

    interrupt_at(monkeypatch, step)
    with pytest.raises(Interrupted):
        train(path)
    return path


def signal_when_called(monkeypatch, owner, name: str, signum: int) -> None:
    """Deliver `signum` to this process when `owner.name` is next called (instead of calling it)."""

    def fire(*args, **kwargs):
        os.kill(os.getpid(), signum)
        raise AssertionError("the signal handler should have raised")

    monkeypatch.setattr(owner, name, fire)


def adapter_weights(run: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(run / "adapter" / "adapter_model.safetensors")
