"""QLoRA on CPU: bitsandbytes 4-bit (and 8-bit) bases train, and merge into an unquantized base."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import base_recipe, read_json, write_recipe


@pytest.fixture(scope="module")
def qlora_run(tmp_path_factory, tiny_model):
    from peftcli.recipe import load_recipe
    from peftcli.training import run_training

    tmp = tmp_path_factory.mktemp("qlora")
    recipe = base_recipe(
        tiny_model,
        tmp / "run",
        quantization={"bits": 4, "quant_type": "nf4", "double_quant": True},
        training={"max_steps": 16},
    )
    outcome = run_training(load_recipe(write_recipe(tmp / "recipe.yaml", recipe)))
    return outcome.run_dir


def test_qlora_trains_on_a_4bit_base(qlora_run):
    metrics = read_json(qlora_run / "metrics.json")
    assert metrics["quantization"] == "4-bit nf4"
    losses = [h["loss"] for h in metrics["loss_history"]]
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.3
    config = json.loads((qlora_run / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"


def test_qlora_adapter_weights_stay_fp32(qlora_run):
    from safetensors.torch import load_file

    weights = load_file(qlora_run / "adapter" / "adapter_model.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.float32}


def test_qlora_merges_into_the_unquantized_base(qlora_run, tiny_model, cli, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "merged"
    result = cli("merge", qlora_run, "--out", out)
    assert result.code == 0, result.err
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config  # a plain full-precision model
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert all(p.dtype == torch.float32 for p in merged.parameters())
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    changed = max((a - b).abs().max().item() for a, b in zip(merged.parameters(), base.parameters()))
    assert changed > 1e-4  # the update really was folded in


def test_8bit_base_trains(tmp_path, tiny_model):
    from peftcli.recipe import load_recipe
    from peftcli.training import run_training

    recipe = base_recipe(tiny_model, tmp_path / "run", quantization={"bits": 8}, training={"max_steps": 3})
    outcome = run_training(load_recipe(write_recipe(tmp_path / "recipe.yaml", recipe)))
    metrics = read_json(outcome.run_dir / "metrics.json")
    assert metrics["quantization"] == "8-bit" and metrics["steps"] == 3
