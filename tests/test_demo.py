"""The demo's story and README's figures of it: a fresh run of the demo's steps must tell the story
README tells (a new skill, little forgetting, far fewer trainable parameters and a far smaller
checkpoint than full fine-tuning), with figures of the order of magnitude README quotes."""

from __future__ import annotations

import pytest
from helpers import ROOT, _load_script, make_tiny_model

demo_figures = _load_script("demo_figures")
README = ROOT / "README.md"

FIGURES = {
    "base_general_perplexity": 2.3,
    "base_pretrain_tokens": 271070,
    "skill_loss_base": 2.47,
    "skill_loss_lora": 0.28,
    "skill_accuracy_base": 0.67,
    "skill_accuracy_lora": 0.92,
    "skill_exact_base": 0.0,
    "skill_exact_lora": 0.53,
    "skill_questions": 19,
    "lora_forgetting_percent": 3.8,
    "lora_trainable_params": 57344,
    "lora_trainable_percent": 6.3,
    "lora_checkpoint_mb": 0.22,
    "lora_eval_loss": 0.28,
    "lora_compare_forgetting_percent": 3.8,
    "full_trainable_params": 853120,
    "full_trainable_percent": 100.0,
    "full_checkpoint_mb": 3.26,
    "full_eval_loss": 0.0017,
    "full_compare_forgetting_percent": 213.4,
}


def test_readme_block_round_trips_its_figures():
    block = demo_figures.render(FIGURES)
    assert demo_figures.quoted(block) == FIGURES
    assert "+3.8 %" in block and "57,344 (6.3 %)" in block and "3.26 MiB" in block
    assert "of 19 held-out questions it answers 0 exactly before and 10 after" in block


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("lora_compare_forgetting_percent", 40.0),  # README's "+3.8 %" would now be +40 %: stale
        ("full_checkpoint_mb", 33.0),  # ten times larger
        ("lora_trainable_params", 57345),  # counts are exact
        ("skill_exact_lora", 0.1),  # 2 right answers where README says 10
        ("skill_loss_lora", 1.5),  # five times the loss README quotes
    ],
)
def test_a_figure_that_moved_beyond_its_magnitude_is_caught(key, value):
    fresh = {**FIGURES, key: value}
    problems = demo_figures.disagreements(FIGURES, fresh)
    assert len(problems) == 1 and problems[0].startswith(key)


def test_the_same_story_with_other_digits_passes():
    fresh = {
        **FIGURES,
        "lora_forgetting_percent": 2.1,
        "full_compare_forgetting_percent": 150.0,
        "skill_loss_lora": 0.4,
        "skill_exact_lora": 0.42,
    }
    assert demo_figures.disagreements(FIGURES, fresh) == []
    assert demo_figures.story_breaks(fresh) == []


def test_a_run_that_tells_another_story_is_caught():
    # full fine-tuning forgetting no more than LoRA: the figures may be in range, the story is not
    assert demo_figures.story_breaks({**FIGURES, "full_compare_forgetting_percent": 2.0})
    assert demo_figures.story_breaks({**FIGURES, "lora_forgetting_percent": 9.0})  # the check would flag LoRA
    assert demo_figures.story_breaks({**FIGURES, "skill_exact_lora": 0.05})  # learned in loss, not in answers


@pytest.mark.slow
def test_a_fresh_demo_matches_readme(tmp_path, cli):
    """`make demo`'s steps, into a temporary folder: pre-train the base, then LoRA and full fine-tuning
    of the same recipe (compare), each evaluated for the skill and for forgetting."""
    make_tiny_model.build_tiny_model(tmp_path / "demo-init", **make_tiny_model.DEMO)
    base_run = tmp_path / "demo-base"
    pretrain = cli(
        "train",
        ROOT / "recipes" / "demo-base.yaml",
        "--set",
        f"model.name={tmp_path / 'demo-init'}",
        "--set",
        f"output.dir={base_run}",
    )
    assert pretrain.code == 0, pretrain.err
    compare = tmp_path / "demo-compare"
    result = cli(
        "compare",
        ROOT / "recipes" / "demo.yaml",
        "--methods",
        "lora,full",
        "--out",
        compare,
        "--set",
        f"model.name={base_run / 'model'}",
    )
    assert result.code == 0, result.err
    # compare's LoRA run is `make demo`'s runs/demo: the same recipe, evaluated the same way
    answered = cli("eval", compare / "lora", "--generate")
    assert answered.code == 0, answered.err
    fresh = demo_figures.figures(base_run, compare / "lora", compare)
    readme = demo_figures.quoted(README.read_text(encoding="utf-8"))
    assert demo_figures.disagreements(readme, fresh) + demo_figures.story_breaks(fresh) == []
