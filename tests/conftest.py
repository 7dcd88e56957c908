"""Shared fixtures: tiny models built offline once per session, recipe writing, in-process CLI runs."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DEMO_TRAIN = ROOT / "recipes" / "data" / "demo_train.jsonl"
DEMO_EVAL = ROOT / "recipes" / "data" / "demo_eval.jsonl"

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
# Nothing in the suite may reach for a hub. huggingface_hub reads these once, at import, so they are
# set here, before any test imports it: a hub id then fails at once instead of after retries.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


make_tiny_model = _load_script("make_tiny_model")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A ~150K-parameter random Llama with a BPE tokenizer and a ChatML template (no pad token)."""
    return make_tiny_model.build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture(scope="session")
def tiny_qwen(tmp_path_factory) -> Path:
    return make_tiny_model.build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-qwen2", arch="qwen2")


@pytest.fixture
def tokenizer(tiny_model):
    """A fresh tokenizer per test: the data stage installs the chosen chat template on it."""
    from peftcli.modeling import load_tokenizer
    from peftcli.recipe import ModelSection

    return load_tokenizer(ModelSection(name=str(tiny_model)))


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


@pytest.fixture
def cli(capsys):
    """Run `peftcli ARGS...` in-process; returns exit code, stdout, stderr."""
    from peftcli.cli import main

    def run(*args: str) -> CliResult:
        capsys.readouterr()
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run


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


def pytest_collection_modifyitems(config, items):
    cuda = False
    if "torch" in sys.modules or importlib.util.find_spec("torch"):
        import torch

        cuda = torch.cuda.is_available()
    if cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run `make test-gpu` on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
