"""The method registry owns every per-method fact: each method's parameter count matches what peft
builds, no module outside `peftcli/methods/` switches on a method name, and a method added at run
time flows through validate, the fit estimate, train and `peftcli methods` with nothing else to edit."""

from __future__ import annotations

import ast
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import pytest
from helpers import ROOT, base_recipe, read_json, write_recipe

from peftcli.methods import REGISTRY, Method, MethodSpec, register, unregister
from peftcli.methods.base import chosen_linears, via_peft
from peftcli.model.size import Shape

# A small Llama shape whose sizes tell the methods' counts apart (GQA, intermediate != 4 x hidden).
SMALL = dict(
    model_type="llama",
    hidden_size=256,
    intermediate_size=688,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=4,
    vocab_size=1000,
    tie_word_embeddings=False,
)
# Keys that change how a method counts, beside its defaults.
VARIANTS = {
    "lora": [{"modules_to_save": ["lm_head"], "layers_to_transform": [0, 2]}, {"target_modules": ["q_proj"]}],
    "lokr": [{"r": 64, "decompose_both": True}],
    "p_tuning": [{"encoder": "lstm"}],
    "prefix_tuning": [{"prefix_projection": True}],
    "freeze": [{"layers": 1, "train_head": True}],
    "oft": [{"block_share": True}],
    "ia3": [{"target_modules": ["q_proj", "down_proj"]}],
}
CASES = [(name, {}) for name in REGISTRY] + [(n, v) for n, vs in VARIANTS.items() for v in vs]


@pytest.mark.parametrize(("name", "keys"), CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CASES)])
def test_the_fit_estimate_counts_what_peft_trains(name, keys, tmp_path):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from peftcli.methods import MethodContext
    from peftcli.model.load import count_params

    method = REGISTRY[name]
    spec = method.spec.model_validate({"method": name, **keys})
    config = AutoConfig.for_model(**SMALL)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    real, _ = count_params(method.apply(spec, model, MethodContext("unused", 100, tmp_path)))
    assert method.count_trainable(spec, Shape.from_config(config.to_dict())) == real


def _string_constants(path: Path) -> set[str]:
    return {
        n.value
        for n in ast.walk(ast.parse(path.read_text()))
        if isinstance(n, ast.Constant) and isinstance(n.value, str)
    }


def test_no_module_outside_the_registry_names_a_method():
    """A method's facts live in its registry row: a module that compares with or lists a method's
    name is a fact kept elsewhere, and a new method would silently miss it."""
    outside = [p for p in (ROOT / "peftcli").rglob("*.py") if "methods" not in p.relative_to(ROOT).parts]
    naming = {str(p.relative_to(ROOT)): sorted(_string_constants(p) & set(REGISTRY)) for p in outside}
    assert {path: names for path, names in naming.items() if names} == {}


class HalfLoraSpec(MethodSpec):
    """A made-up method: LoRA on the attention's query and value projections only."""

    method: Literal["half_lora"]
    r: int = 2


def _count_half_lora(spec: HalfLoraSpec, shape) -> int:
    picked = {k: v for k, v in chosen_linears(spec, shape).items() if k in ("q_proj", "v_proj")}
    return shape.layers * sum(spec.r * (a + b) for a, b in picked.values())


HALF_LORA = Method(
    "half_lora",
    HalfLoraSpec,
    via_peft("LoraConfig", extra=lambda spec, model, ctx: {"target_modules": ["q_proj", "v_proj"]}),
    "Test-only: LoRA on q and v.",
    mergeable=True,
    quantized_base=True,
    count_trainable=_count_half_lora,
    learning_rate=1e-2,
)


@contextmanager
def registered(method: Method):
    from peftcli.recipe.schema import rebuild

    register(method)
    rebuild()
    try:
        yield
    finally:
        unregister(method.name)
        rebuild()


@pytest.mark.slow
def test_a_new_method_flows_through_validate_fit_train_and_methods(tmp_path, tiny_model, cli):
    from peftcli.recipe import load_recipe
    from peftcli.training.run import run_training

    recipe = base_recipe(tiny_model, tmp_path / "run", training={"max_steps": 4})
    recipe["peft"] = {"method": "half_lora", "r": 2}
    path = write_recipe(tmp_path / "r.yaml", recipe)
    assert cli("validate", path).code == 2  # not a method until it is registered

    with registered(HALF_LORA):
        shape = Shape.from_config(read_json(tiny_model / "config.json"))
        expected = _count_half_lora(HalfLoraSpec(method="half_lora", r=2), shape)

        checked = cli("validate", path)
        assert checked.code == 0, checked.err
        assert "method: half_lora — Test-only: LoRA on q and v." in checked.err
        assert f"{expected / 1e6:,.3f}M trainable" in checked.err  # the fit estimate used its count

        run = run_training(load_recipe(path))
        metrics = read_json(run.run_dir / "metrics.json")
        assert metrics["method"] == "half_lora" and metrics["trainable_params"] == expected
        assert metrics["loss_history"][-1]["loss"] < metrics["loss_history"][0]["loss"]
        assert (run.run_dir / "adapter" / "adapter_model.safetensors").exists()

        listed = cli("methods", "--model", tiny_model, "--markdown")
        assert listed.code == 0 and "half_lora" in listed.out and f"{expected:,}" in listed.out
        assert "learning_rate: 0.01" in cli("init", "--method", "half_lora", "--out", "-").out
    assert cli("validate", path).code == 2
