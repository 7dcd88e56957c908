"""`training.batch_size: auto`: the largest micro-batch the fit estimate puts in the free GPU memory
(with a margin), gradient accumulation that keeps `training.effective_batch_size`, a trial step that
backs off when it runs out of memory, a small batch on CPU, and `validate` saying what it picked."""

from __future__ import annotations

import json

import pytest
from helpers import DEMO_EVAL, DEMO_TRAIN, base_recipe, read_json, train, write_recipe

GIB = 2**30
# A Llama-3.2-1B-shaped config.json (no weights: the fit estimate reads the shape only).
LLAMA_1B = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 2048,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "intermediate_size": 8192,
    "vocab_size": 128256,
    "max_position_embeddings": 131072,
    "tie_word_embeddings": True,
}


@pytest.mark.parametrize(
    ("budget", "fixed", "per_example", "effective", "expected"),
    [
        (10 * GIB, 2 * GIB, 1 * GIB, 16, (4, 4)),  # 6 fit after the margin: 4 x 4 keeps 16 exactly
        (10 * GIB, 2 * GIB, 1 * GIB, 6, (6, 1)),  # everything fits in one micro-batch
        (80 * GIB, 2 * GIB, 0.01 * GIB, 64, (64, 1)),  # never more than the effective batch
        (10 * GIB, 9.5 * GIB, 1 * GIB, 16, (1, 16)),  # not even one example fits: one, and the trial step says
        (10 * GIB, 2 * GIB, 0.6 * GIB, 17, (9, 2)),  # 17 is prime: the most even split, one example over
    ],
)
def test_pick_keeps_the_effective_batch_within_the_budget(budget, fixed, per_example, effective, expected):
    from peftcli.model.size import pick

    micro, steps = pick(budget, per_example, fixed, 0.15, effective)
    assert (micro, steps) == expected
    assert micro == 1 or fixed + micro * per_example <= budget / 1.15  # inside the budget, margin included
    assert effective <= micro * steps < effective + steps  # the effective batch, or the nearest above


def test_the_margin_costs_examples():
    from peftcli.model.size import pick

    # 8 examples of 1 GiB fit exactly in 10 GiB with 2 GiB fixed; a 15 % margin leaves room for 6.
    assert pick(10 * GIB, GIB, 2 * GIB, 0.0, 32)[0] == 8
    assert pick(10 * GIB, GIB, 2 * GIB, 0.15, 32)[0] < 8


def _llama_1b_recipe(tmp_path, **training):
    from peftcli.recipe import load_recipe

    model = tmp_path / "llama-1b"
    model.mkdir(exist_ok=True)
    (model / "config.json").write_text(json.dumps(LLAMA_1B))
    recipe = base_recipe(
        model, tmp_path / "run", data={"max_length": 1024}, training={"batch_size": "auto", **training}
    )
    return load_recipe(write_recipe(tmp_path / "r.yaml", recipe))


def test_a_bigger_gpu_gets_a_bigger_micro_batch_and_the_same_effective_batch(tmp_path):
    from peftcli.model.size import estimate
    from peftcli.model.speed import Machine, decide

    recipe = _llama_1b_recipe(tmp_path, effective_batch_size=64)
    small = decide(recipe, Machine(cuda=True, capability=(9, 0), free_gib=12.0))
    large = decide(recipe, Machine(cuda=True, capability=(9, 0), free_gib=139.0))
    assert 1 <= small.batch_size < large.batch_size
    for chosen in (small, large):
        assert chosen.batch_size * chosen.gradient_accumulation == 64
        assert "fits" in chosen.batch_reason and "keep 64 examples per step" in chosen.batch_reason
        # what it picked fits by the estimate, with the margin and the reserve
        need = estimate(recipe, LLAMA_1B, chosen.gradient_checkpointing, tokens=chosen.batch_size * 1024).total_gib
        free = 12.0 if chosen is small else 139.0
        assert need <= (free - 1.0) / 1.15


def test_auto_on_cpu_or_without_a_shape_is_a_small_batch(tmp_path, tiny_model):
    from peftcli.model.speed import Machine, decide
    from peftcli.recipe import load_recipe

    recipe = load_recipe(
        write_recipe(tmp_path / "r.yaml", base_recipe(tiny_model, tmp_path / "run", training={"batch_size": "auto"}))
    )
    cpu = decide(recipe, Machine(cuda=False))
    assert (cpu.batch_size, cpu.gradient_accumulation) == (4, 4)  # 16 examples per step by default
    assert "CPU" in cpu.batch_reason
    unknown = decide(recipe, Machine(cuda=True, capability=(9, 0), free_gib=None))
    assert unknown.batch_size * unknown.gradient_accumulation == 16 and "unknown" in unknown.batch_reason
    fixed = decide(
        recipe.model_copy(update={"training": recipe.training.model_copy(update={"batch_size": 8})}),
        Machine(cuda=False),
    )
    assert (fixed.batch_size, fixed.gradient_accumulation, fixed.batch_reason) == (8, 1, "set in the recipe")


def _oom_above(limit: int, tried: list[int]):
    import torch

    def step(micro: int) -> None:
        tried.append(micro)
        if micro > limit:
            raise torch.OutOfMemoryError(f"CUDA out of memory (micro-batch {micro})")

    return step


def test_the_trial_step_backs_off_until_a_micro_batch_fits():
    from peftcli.training.batch import back_off

    tried: list[int] = []
    micro, steps, failed = back_off(_oom_above(5, tried), 16, 32)
    assert micro <= 5 and micro * steps == 32
    assert failed == tried[:-1] and all(size > 5 for size in failed) and tried[-1] == micro
    assert tried == sorted(tried, reverse=True)  # always smaller
    tried.clear()
    assert back_off(_oom_above(64, tried), 16, 32) == (16, 2, [])  # the first try fits: one step only


def test_the_trial_step_gives_up_at_one_example_and_passes_other_errors_on():
    import torch

    from peftcli.training.batch import back_off

    with pytest.raises(torch.OutOfMemoryError):
        back_off(_oom_above(0, []), 8, 8)

    def broken(micro):
        raise ValueError("not a memory problem")

    with pytest.raises(ValueError):
        back_off(broken, 8, 8)


@pytest.mark.slow
def test_the_trial_step_leaves_the_model_as_it_was(tiny_model):
    """A real forward and backward pass: no gradients left behind, the random state untouched."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from peftcli.training.batch import trial_step

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model), LoraConfig(r=4, lora_dropout=0.1))
    model.eval()
    rng = torch.get_rng_state()
    trial_step(model, micro=4, length=16, vocab=640)
    assert torch.equal(rng, torch.get_rng_state()) and not model.training
    assert all(p.grad is None for p in model.parameters())


def test_training_keeps_what_the_trial_step_confirmed(tmp_path, tiny_model, monkeypatch):
    """On a (mocked) GPU, the settings training uses are the backed-off ones, and say why."""
    import torch

    from peftcli.model.speed import Machine, decide
    from peftcli.recipe import load_recipe
    from peftcli.training import batch

    recipe = load_recipe(
        write_recipe(
            tmp_path / "r.yaml",
            base_recipe(tiny_model, tmp_path / "run", training={"batch_size": "auto", "effective_batch_size": 48}),
        )
    )
    picked = decide(recipe, Machine(cuda=True, capability=(9, 0), free_gib=79.0))
    assert (picked.batch_size, picked.gradient_accumulation) == (48, 1)  # a tiny model: all of it fits
    tried: list[int] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(batch, "trial_step", lambda model, micro, length, vocab: _oom_above(20, tried)(micro))
    confirmed = batch.confirm_batch(recipe, None, picked, vocab=640)
    assert confirmed.batch_size <= 20 and confirmed.batch_size * confirmed.gradient_accumulation == 48
    assert "ran out of memory in a trial step" in confirmed.batch_reason and "48" in confirmed.batch_reason

    monkeypatch.setattr(batch, "trial_step", lambda model, micro, length, vocab: _oom_above(0, [])(micro))
    from peftcli.errors import UserError

    with pytest.raises(UserError, match="one example of data.max_length 64 tokens does not fit"):
        batch.confirm_batch(recipe, None, picked, vocab=640)


def test_validate_says_what_auto_picks(cli, tmp_path, tiny_model):
    recipe = base_recipe(tiny_model, tmp_path / "run", training={"batch_size": "auto", "effective_batch_size": 32})
    path = write_recipe(tmp_path / "r.yaml", recipe)
    result = cli("validate", path)
    assert result.code == 0, result.err
    assert "batch: 4 x 8 accumulation per device (auto: a small micro-batch on CPU" in result.err
    assert "training: 12 steps, 4 x 8 examples per step (batch_size: auto, on this machine)" in result.err
    shown = json.loads(cli("validate", path, "--json").out)
    assert (shown["settings"]["batch_size"], shown["settings"]["gradient_accumulation"]) == (4, 8)
    assert shown["recipe"]["training"]["batch_size"] == "auto"  # the recipe itself keeps auto


@pytest.mark.parametrize(
    ("training", "named"),
    [
        ({"batch_size": "aut"}, "training.batch_size"),
        ({"batch_size": 0}, "training.batch_size"),
        ({"batch_size": True}, "training.batch_size"),
        ({"batch_size": "auto", "gradient_accumulation": 4}, "gradient_accumulation is chosen by batch_size: auto"),
        ({"batch_size": 4, "effective_batch_size": 10}, "effective_batch_size 10 is not a multiple"),
        ({"effective_batch_size": 0}, "training.effective_batch_size"),
    ],
)
def test_batch_keys_that_disagree_are_refused(cli, tmp_path, tiny_model, training, named):
    path = write_recipe(tmp_path / "r.yaml", base_recipe(tiny_model, tmp_path / "run", training=training))
    result = cli("validate", path)
    assert result.code == 2 and len(result.error_lines) == 1 and named in result.error_lines[0], result.err


@pytest.mark.slow
def test_auto_trains_with_the_batch_it_picked_and_records_it(tmp_path, tiny_model):
    recipe = base_recipe(
        tiny_model,
        tmp_path / "run",
        data={"train": str(DEMO_TRAIN), "eval": str(DEMO_EVAL)},
        training={"batch_size": "auto", "effective_batch_size": 8, "max_steps": 3, "save_steps": 3},
    )
    run = train(write_recipe(tmp_path / "r.yaml", recipe)).run_dir
    metrics = read_json(run / "metrics.json")
    assert (metrics["settings"]["batch_size"], metrics["settings"]["gradient_accumulation"]) == (4, 2)
    # 3 steps of 8 examples (4 x 2): the epochs say how many examples went by
    assert metrics["epochs"] == pytest.approx(3 * 8 / metrics["data"]["train"]["rows"], rel=0.05)
    assert "batch 4 (auto) x 2 accumulation" in (run / "report.md").read_text()


@pytest.mark.gpu
def test_auto_backs_off_on_a_real_gpu_that_runs_out(tmp_path, tiny_model):
    """A GPU capped below what the estimate sees as free: the trial step runs out, backs off, and
    training runs with the micro-batch that fitted."""
    import torch

    recipe = base_recipe(
        tiny_model,
        tmp_path / "run",
        data={"max_length": 512},
        training={"batch_size": "auto", "effective_batch_size": 8192, "max_steps": 1, "save_steps": 1},
    )
    torch.cuda.set_per_process_memory_fraction(2 * GIB / torch.cuda.get_device_properties(0).total_memory)
    try:
        run = train(write_recipe(tmp_path / "r.yaml", recipe)).run_dir
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()
    settings = read_json(run / "metrics.json")["settings"]
    assert settings["batch_size"] < 8192 and settings["batch_size"] * settings["gradient_accumulation"] >= 8192
    assert "ran out of memory in a trial step" in settings["batch_reason"], settings["batch_reason"]
