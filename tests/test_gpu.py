"""CUDA checks (skipped without a GPU; `make test-gpu` runs them): bf16 LoRA and 4-bit QLoRA."""

from __future__ import annotations

import pytest
from conftest import base_recipe, read_json, write_recipe

pytestmark = pytest.mark.gpu


def _train(tmp_path, tiny_model, **sections):
    from peftcli.recipe import load_recipe
    from peftcli.training import run_training

    recipe = base_recipe(tiny_model, tmp_path / "run", training={"max_steps": 20}, **sections)
    return run_training(load_recipe(write_recipe(tmp_path / "recipe.yaml", recipe))).run_dir


def _losses(run):
    return [h["loss"] for h in read_json(run / "metrics.json")["loss_history"]]


def test_bf16_lora_on_cuda(tmp_path, tiny_model, cli):
    import torch

    run = _train(tmp_path, tiny_model)
    metrics = read_json(run / "metrics.json")
    expected = "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
    assert metrics["dtype"] == expected and metrics["device"] != "cpu"
    assert metrics["peak_memory_kind"] == "cuda_allocated" and metrics["peak_memory_mb"] > 0
    losses = _losses(run)
    assert sum(losses[-4:]) < sum(losses[:4])
    result = cli("merge", run, "--out", tmp_path / "merged")
    assert result.code == 0, result.err


def test_qlora_4bit_on_cuda(tmp_path, tiny_model, cli):
    run = _train(tmp_path, tiny_model, quantization={"bits": 4})
    metrics = read_json(run / "metrics.json")
    assert metrics["quantization"] == "4-bit nf4" and metrics["device"] != "cpu"
    losses = _losses(run)
    assert sum(losses[-4:]) < sum(losses[:4])
    result = cli("merge", run, "--out", tmp_path / "merged")
    assert result.code == 0, result.err
    assert cli("eval", run).code == 0
