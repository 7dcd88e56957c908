"""Every method in the registry, one row each: trains, reloads identically in plain PEFT, merges (or
refuses to, saying why), and trains on a 4-bit base where the registry says it can."""

from __future__ import annotations

import pytest
import torch
from helpers import ROOT, base_recipe, read_json, write_recipe

from peftcli.methods import REGISTRY

# Settings that make each method learn something in a handful of steps on the tiny model.
METHOD_KEYS = {
    "lora": {"r": 4},
    "dora": {"r": 4},
    "adalora": {"init_r": 6, "target_r": 4, "tinit": 1, "tfinal": 1},
    "ia3": {},
    "loha": {"r": 4},
    "lokr": {"r": 4},
    "vera": {"r": 32},
    "oft": {"block_size": 16},
    "boft": {"block_size": 4},
    "ln_tuning": {},
    "prefix_tuning": {"num_virtual_tokens": 4},
    "prompt_tuning": {"num_virtual_tokens": 4, "init": "text", "init_text": "Answer with one word."},
    "p_tuning": {"num_virtual_tokens": 4, "encoder_hidden_size": 32},
    "adaption_prompt": {"adapter_len": 4},
    "full": {},
    "freeze": {"layers": 1},
}
LEARNING_RATE = {
    "full": 1e-3,
    "freeze": 1e-3,
    "ia3": 5e-2,
    "ln_tuning": 5e-2,
    "vera": 5e-2,
    "prompt_tuning": 5e-2,
    "prefix_tuning": 1e-2,
    "p_tuning": 1e-2,
    "adaption_prompt": 5e-2,
}


def test_every_registered_method_has_a_test_row():
    assert set(METHOD_KEYS) == set(REGISTRY)


def _train(tmp_path, tiny_model, method, steps=8, **sections):
    from peftcli.recipe import load_recipe
    from peftcli.training.run import run_training

    recipe = base_recipe(
        tiny_model,
        tmp_path / "run",
        peft={"method": method, **METHOD_KEYS[method]},
        training={"max_steps": steps, "learning_rate": LEARNING_RATE.get(method, 1e-2), "save_steps": 100},
        **sections,
    )
    # base_recipe's LoRA keys do not belong to other methods
    recipe["peft"] = {"method": method, **METHOD_KEYS[method]}
    return run_training(load_recipe(write_recipe(tmp_path / "recipe.yaml", recipe)))


def _probe(tiny_model):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    tokenizer.pad_token = tokenizer.eos_token
    return tokenizer(["What comes after Monday?", "Add two and three please."], return_tensors="pt", padding=True)


def _logits(model, probe):
    model.eval()
    with torch.no_grad():
        out = model(**probe).logits
    return out[:, -probe["input_ids"].shape[1] :, :]  # prompt methods prepend virtual positions


@pytest.mark.parametrize("method", list(REGISTRY))
@pytest.mark.slow
def test_method_trains_reloads_and_merges(method, tmp_path, tiny_model, cli):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    outcome = _train(tmp_path, tiny_model, method)
    losses = [h["loss"] for h in read_json(outcome.run_dir / "metrics.json")["loss_history"]]
    assert len(losses) == 8 and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) / 3 <= sum(losses[:3]) / 3 + 0.05, losses  # decreasing or flat

    probe = _probe(tiny_model)
    trained = _logits(outcome.model, probe)
    untouched = _logits(AutoModelForCausalLM.from_pretrained(tiny_model), probe)
    assert (trained - untouched).abs().max() > 1e-3, "training left the model as it was"
    registry_row = REGISTRY[method]
    if registry_row.saves_full_model:
        reloaded = AutoModelForCausalLM.from_pretrained(outcome.run_dir / "model")
        assert not (outcome.run_dir / "adapter").exists()
    else:
        base = AutoModelForCausalLM.from_pretrained(tiny_model)
        reloaded = PeftModel.from_pretrained(base, outcome.run_dir / "adapter")
    reload_diff = (_logits(reloaded, probe) - trained).abs().max().item()
    # AdaLoRA saves its pruned ranks as smaller matrices, so the reload sums in a different order.
    assert reload_diff <= (1e-5 if method == "adalora" else 0.0), f"reloaded model differs by {reload_diff}"

    result = cli("merge", outcome.run_dir, "--out", tmp_path / "merged")
    if registry_row.mergeable:
        assert result.code == 0, result.err
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
        assert (_logits(merged, probe) - trained).abs().max() < 1e-4
    else:
        assert result.code == 2
        assert "cannot be merged" in result.err and "PeftModel.from_pretrained" in result.err
        assert not (tmp_path / "merged").exists()


@pytest.mark.parametrize("method", [name for name, m in REGISTRY.items() if m.quantized_base])
@pytest.mark.slow
def test_method_trains_on_a_4bit_base(method, tmp_path, tiny_model):
    outcome = _train(tmp_path, tiny_model, method, steps=6, quantization={"bits": 4})
    metrics = read_json(outcome.run_dir / "metrics.json")
    assert any(type(m).__name__ == "Linear4bit" for m in outcome.model.modules())  # really quantized
    assert metrics["quantization"] == "4-bit nf4"
    losses = [h["loss"] for h in metrics["loss_history"]]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-2:]) / 2 <= sum(losses[:2]) / 2 + 0.05, losses  # decreasing or flat


@pytest.mark.parametrize("method", [name for name, m in REGISTRY.items() if not m.quantized_base])
def test_method_refuses_a_quantized_base_before_loading(method, tmp_path, tiny_model, cli):
    recipe = base_recipe(tiny_model, tmp_path / "run", quantization={"bits": 4})
    recipe["peft"] = {"method": method}
    result = cli("train", write_recipe(tmp_path / "r.yaml", recipe))
    assert result.code == 2 and "cannot train on a quantized base" in result.err
    assert not (tmp_path / "run").exists()


def test_method_specific_keys_are_checked(cli, tmp_path, tiny_model):
    recipe = base_recipe(tiny_model, tmp_path / "run")
    recipe["peft"] = {"method": "ia3", "alpha": 16}
    result = cli("validate", write_recipe(tmp_path / "a.yaml", recipe))
    assert result.code == 2 and "'alpha' is not a key of peft.method 'ia3'" in result.err
    assert "ia3 takes: target_modules, feedforward_modules" in result.err
    recipe["peft"] = {"method": "lora", "num_virtual_tokens": 8}
    result = cli("validate", write_recipe(tmp_path / "b.yaml", recipe))
    assert result.code == 2 and "'num_virtual_tokens' is not a key of peft.method 'lora'" in result.err


def test_unsupported_architecture_fails_before_training(cli, tmp_path, tiny_qwen):
    recipe = base_recipe(tiny_qwen, tmp_path / "run")
    recipe["peft"] = {"method": "adaption_prompt"}
    result = cli("train", write_recipe(tmp_path / "r.yaml", recipe))
    assert result.code == 2 and "does not support model type 'qwen2'" in result.err
    assert not (tmp_path / "run").exists()


def test_target_modules_that_match_nothing_list_what_exists(cli, tmp_path, tiny_model):
    recipe = base_recipe(tiny_model, tmp_path / "run", peft={"target_modules": ["query", "value"]})
    result = cli("train", write_recipe(tmp_path / "r.yaml", recipe))
    assert result.code == 2 and "match no module" in result.err
    assert "q_proj" in result.err and "down_proj" in result.err


def test_methods_command_lists_every_method_with_shares(cli, tiny_model):
    result = cli("methods", "--model", tiny_model, "--markdown")
    assert result.code == 0, result.err
    for name in REGISTRY:
        assert f"| {name} |" in result.out
    assert "100.000 %" in result.out  # `full` trains every parameter
    # lora's share is what PEFT itself counts on the real model with the method's defaults.
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model),
        LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"),
    )
    trainable, total = model.get_nb_trainable_parameters()
    assert f"| {trainable:,} ({100 * trainable / total:.3f} %) |" in result.out.split("| lora |")[1].splitlines()[0]


def test_the_methods_doc_carries_the_methods_table(cli):
    result = cli("methods", "--markdown")
    assert result.out.strip() in (ROOT / "docs" / "methods.md").read_text(), (
        "docs/methods.md's methods table is stale: paste `peftcli methods --markdown`"
    )


@pytest.mark.parametrize(
    "keys",
    [
        {"init": "pissa"},
        {"init": "olora"},
        {"layers_to_transform": [1]},
        {"modules_to_save": ["lm_head"]},
        {"use_rslora": True, "init": "gaussian"},
    ],
    ids=["pissa", "olora", "layers_to_transform", "modules_to_save", "rslora-gaussian"],
)
@pytest.mark.slow
def test_lora_variants_reload_on_the_original_base(keys, tmp_path, tiny_model, cli):
    """PiSSA/OLoRA rewrite the base weights while training; the saved adapter must still apply to
    the *original* base (converted to a plain LoRA), and merge must reproduce the trained model."""
    import json

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from peftcli.recipe import load_recipe
    from peftcli.training.run import run_training

    recipe = base_recipe(tiny_model, tmp_path / "run", training={"max_steps": 6, "save_steps": 100})
    recipe["peft"] = {"method": "lora", "r": 4, **keys}
    outcome = run_training(load_recipe(write_recipe(tmp_path / "r.yaml", recipe)))
    probe = _probe(tiny_model)
    trained = _logits(outcome.model, probe)
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), outcome.run_dir / "adapter")
    assert (_logits(reloaded, probe) - trained).abs().max() < 1e-4
    config = json.loads((outcome.run_dir / "adapter" / "adapter_config.json").read_text())
    if "init" in keys and keys["init"] in ("pissa", "olora"):
        assert config["init_lora_weights"] is True and config["r"] == 8  # a plain LoRA, rank doubled
    if "layers_to_transform" in keys:
        adapted = {name for name, _ in reloaded.named_parameters() if "lora_A" in name}
        assert adapted and all(".layers.1." in name for name in adapted)
    if "modules_to_save" in keys:
        assert config["modules_to_save"] == ["lm_head"]
    assert cli("merge", outcome.run_dir, "--out", tmp_path / "merged").code == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert (_logits(merged, probe) - trained).abs().max() < 1e-4


def _packed_adalora(tmp_path, tiny_model, tinit: int) -> dict:
    """One epoch, packed: the real step count is only known once the trainer has packed the rows."""
    recipe = base_recipe(
        tiny_model,
        tmp_path / "run",
        data={"packing": True},
        training={"max_steps": None, "epochs": 1, "save_steps": 1000},
    )
    recipe["peft"] = {"method": "adalora", "init_r": 6, "target_r": 2, "tinit": tinit, "tfinal": 1}
    return recipe


@pytest.mark.slow
def test_adalora_budget_follows_the_real_step_count(tmp_path, tiny_model):
    """With epochs and packing the step count is only known to the trainer; AdaLoRA must use it."""
    from peftcli.recipe import load_recipe
    from peftcli.training.run import run_training

    recipe = _packed_adalora(tmp_path, tiny_model, tinit=1)
    outcome = run_training(load_recipe(write_recipe(tmp_path / "r.yaml", recipe)))
    steps = read_json(outcome.run_dir / "metrics.json")["steps"]
    assert outcome.model.peft_config["default"].total_step == steps
    assert steps < 488 // 16  # packing made fewer, fuller rows than the unpacked estimate


@pytest.mark.slow
def test_adalora_budget_too_short_for_the_real_steps_leaves_no_run(tmp_path, tiny_model, cli):
    """The estimate (unpacked rows) leaves room for tinit, the packed step count does not: the error
    comes once training starts, and the half-made run folder must not block a corrected rerun."""
    recipe = _packed_adalora(tmp_path, tiny_model, tinit=25)
    result = cli("train", write_recipe(tmp_path / "r.yaml", recipe))
    assert result.code == 2, result.err
    assert "peft.tinit (25)" in result.err and "training steps" in result.err
    assert not (tmp_path / "run").exists()


def test_loftq_needs_a_4bit_base_and_cuda(tmp_path, tiny_model, cli):
    recipe = base_recipe(tiny_model, tmp_path / "run")
    recipe["peft"] = {"method": "lora", "init": "loftq"}
    result = cli("validate", write_recipe(tmp_path / "a.yaml", recipe))
    assert result.code == 2 and "quantization.bits: 4" in result.err
    recipe["quantization"] = {"bits": 4}
    result = cli("train", write_recipe(tmp_path / "b.yaml", recipe))
    if not torch.cuda.is_available():
        assert result.code == 2 and "runs on a CUDA GPU only" in result.err
        assert not (tmp_path / "run").exists()
    recipe["model"] = {"name": "org/model", "revision": "v2"}  # LoftQ would read another revision's weights
    result = cli("validate", write_recipe(tmp_path / "c.yaml", recipe))
    assert result.code == 2 and "model.revision" in result.err


@pytest.mark.slow
def test_loftq_runs_merge_into_the_dequantized_base(tmp_path, tiny_model, cli):
    """A LoftQ adapter corrects the 4-bit weights it was fitted to, so merge folds it into those.
    (LoftQ's initialisation needs CUDA; the merge path is checked on a QLoRA run relabelled loftq.)"""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from peftcli.recipe import load_recipe
    from peftcli.training.run import run_training

    recipe = base_recipe(tiny_model, tmp_path / "run", quantization={"bits": 4}, training={"max_steps": 4})
    run = run_training(load_recipe(write_recipe(tmp_path / "r.yaml", recipe))).run_dir
    saved = run / "recipe.yaml"
    saved.write_text(saved.read_text().replace("init: default", "init: loftq"))
    assert cli("merge", run, "--out", tmp_path / "merged").code == 0

    probe = _probe(tiny_model)
    merged = _logits(AutoModelForCausalLM.from_pretrained(tmp_path / "merged"), probe)
    quantized = AutoModelForCausalLM.from_pretrained(
        tiny_model,
        dtype=torch.float32,
        quantization_config=(
            BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=torch.float32,
            )
        ),
    )
    dequantized = quantized.dequantize(dtype=torch.float32)
    adapter_on_dequantized = _logits(PeftModel.from_pretrained(dequantized, run / "adapter"), probe)
    original = _logits(
        PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), run / "adapter"), probe
    )
    assert (merged - adapter_on_dequantized).abs().max() < 1e-4
    assert (merged - original).abs().max() > 1e-3  # not the original base
