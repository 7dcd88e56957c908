"""Helpers shared by test modules (fixtures stay in conftest.py, which uses these too): the tiny
model builder, recipes, JSON and mask reading, short resumable recipes, training in-process, and
signals delivered at a chosen point of a run."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DEMO_TRAIN = ROOT / "recipes" / "data" / "demo_train.jsonl"
DEMO_EVAL = ROOT / "recipes" / "data" / "demo_eval.jsonl"


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


make_tiny_model = _load_script("make_tiny_model")


# A short conversation the mask tests render through many templates: (role, content) turns.
TURNS = [
    ("system", "Be brief."),
    ("user", "After Monday?"),
    ("assistant", "Tuesday"),
    ("user", "And after that?"),
    ("assistant", "Wednesday"),
]


def base_recipe(base_model: Path, out: Path, **sections) -> dict:
    """A small, fast recipe on the demo data; sections given as dicts are merged over the defaults."""
    recipe = {
        "model": {"name": str(base_model)},
        "peft": {"method": "lora", "r": 8, "alpha": 16, "dropout": 0.0},
        "data": {"train": str(DEMO_TRAIN), "eval": str(DEMO_EVAL), "max_length": 64},
        "training": {"max_steps": 12, "batch_size": 16, "learning_rate": 5e-3, "save_steps": 6, "seed": 7},
        "output": {"dir": str(out)},
    }
    for name, body in sections.items():
        if body is None:
            recipe.pop(name, None)
        elif isinstance(body, dict) and isinstance(recipe.get(name), dict):
            recipe[name] = {**recipe[name], **body}
        else:
            recipe[name] = body
    return recipe


def write_recipe(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    return path


@dataclass
class CliResult:
    code: int
    out: str
    err: str

    @property
    def error_lines(self) -> list[str]:
        return [line for line in self.err.splitlines() if line.startswith("error:")]


def trained_pieces(tokenizer, item) -> list[str]:
    """Decoded runs of consecutive trained tokens of an encoded example (one per trained span)."""
    pieces, current = [], []
    for token, label in zip(item.input_ids, item.labels):
        if label != -100:
            current.append(token)
        elif current:
            pieces.append(tokenizer.decode(current))
            current = []
    return pieces + ([tokenizer.decode(current)] if current else [])


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def resumable_recipe(tiny_model, out: Path, steps: int = 12, **sections) -> dict:
    """A LoRA recipe that saves every 4 steps and keeps every checkpoint."""
    recipe = base_recipe(
        tiny_model, out, training={"max_steps": steps, "save_steps": 4, "save_total_limit": None}, **sections
    )
    recipe["peft"] = {"method": "lora", "r": 4, "dropout": 0.1}  # dropout: the RNG must be restored too
    return recipe


def train(path: Path, **kwargs):
    from peftcli.recipe import load_recipe
    from peftcli.training.run import run_training

    return run_training(load_recipe(path), **kwargs)


def interrupt_at(monkeypatch, step: int, signum: int = signal.SIGTERM) -> None:
    """Make the next training run receive `signum` while it runs step `step` + 1."""
    from transformers import TrainerCallback

    from peftcli.training import run as stage

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
