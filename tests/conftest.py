"""Shared fixtures: tiny models built offline once per session, recipe writing, in-process CLI runs."""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
from pathlib import Path

import pytest

# Nothing in the suite may reach for a hub. huggingface_hub reads these once, at import, so they are
# set here, before any test (or the helpers) imports it: a hub id then fails at once instead of
# after retries.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

from helpers import CliResult, make_tiny_model  # noqa: E402 (after the environment above)


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
    from peftcli.model.load import load_tokenizer
    from peftcli.recipe import ModelSection

    return load_tokenizer(ModelSection(name=str(tiny_model)))


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
