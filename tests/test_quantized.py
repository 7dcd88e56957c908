"""QLoRA on CPU: bitsandbytes 4-bit (and 8-bit) bases train, and merge into an unquantized base."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import base_recipe, read_json, write_recipe


@pytest.fixture(scope="module")
def qlora_outcome(tmp_path_factory, tiny_model):
    from peftcli.recipe import load_recipe
    from peftcli.training.run import run_training

    tmp = tmp_path_factory.mktemp("qlora")
    recipe = base_recipe(
        tiny_model,
        tmp / "run",
        quantization={"bits": 4, "quant_type": "nf4", "double_quant": True},
        training={"max_steps": 16},
    )
    outcome = run_training(load_recipe(write_recipe(tmp / "recipe.yaml", recipe)))
    quantized = [m for m in outcome.model.modules() if type(m).__name__ == "Linear4bit"]
    return outcome.run_dir, quantized


@pytest.fixture
def qlora_run(qlora_outcome):
    return qlora_outcome[0]


def _probe_logits(model, tokenizer_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    ids = tokenizer(["What comes after Monday? Tuesday then"], return_tensors="pt")
    with torch.no_grad():
        return model(**ids).logits


@pytest.mark.slow
def test_qlora_trains_on_a_4bit_base(qlora_outcome):
    qlora_run, quantized = qlora_outcome
    # The base really was quantized (the recipe echo in metrics.json alone would not show it).
    assert quantized and all(m.weight.quant_type == "nf4" for m in quantized)
    metrics = read_json(qlora_run / "metrics.json")
    assert metrics["quantization"] == "4-bit nf4"
    losses = [h["loss"] for h in metrics["loss_history"]]
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.3
    config = json.loads((qlora_run / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"


@pytest.mark.slow
def test_qlora_adapter_weights_stay_fp32(qlora_run):
    from safetensors.torch import load_file

    weights = load_file(qlora_run / "adapter" / "adapter_model.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.float32}


@pytest.mark.slow
def test_qlora_merges_into_the_unquantized_base(qlora_run, tiny_model, cli, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "merged"
    result = cli("merge", qlora_run, "--out", out)
    assert result.code == 0, result.err
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config  # a plain full-precision model
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert all(p.dtype == torch.float32 for p in merged.parameters())
    from peft import PeftModel

    # Folded into the original full-precision weights, not the 4-bit ones the run trained on: the
    # merged model is the fp32 base plus the adapter (the quantization error is not baked in).
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    base_logits = _probe_logits(base, tiny_model)
    expected = _probe_logits(PeftModel.from_pretrained(base, qlora_run / "adapter").eval(), tiny_model)
    got = _probe_logits(merged.eval(), tiny_model)
    assert (got - expected).abs().max() < 1e-4
    assert (expected - base_logits).abs().max() > 1e-3  # the update really was folded in


@pytest.mark.slow
def test_8bit_base_trains(tmp_path, tiny_model):
    from peftcli.recipe import load_recipe
    from peftcli.training.run import run_training

    recipe = base_recipe(tiny_model, tmp_path / "run", quantization={"bits": 8}, training={"max_steps": 3})
    outcome = run_training(load_recipe(write_recipe(tmp_path / "recipe.yaml", recipe)))
    assert any(type(m).__name__ == "Linear8bitLt" for m in outcome.model.modules())
    metrics = read_json(outcome.run_dir / "metrics.json")
    assert metrics["quantization"] == "8-bit" and metrics["steps"] == 3
    assert all(torch.isfinite(torch.tensor([h["loss"] for h in metrics["loss_history"]])))
    from safetensors.torch import load_file

    weights = load_file(outcome.run_dir / "adapter" / "adapter_model.safetensors")
    assert max(t.abs().max().item() for name, t in weights.items() if "lora_B" in name) > 0  # it learned
