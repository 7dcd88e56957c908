"""The first hour: `methods --model` answers at once on any size, `validate` estimates memory for the
recipes' hub models without downloading them (or says why it cannot), and `train` reports what
`validate` would find before it loads torch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import base_recipe, write_recipe

from peftcli.model.known_shapes import LLAMA_3_1_8B

# Run `peftcli ARGV` in a fresh interpreter; exit status 3 when it imported torch.
NO_TORCH = (
    "import sys; from peftcli.cli import main\n"
    "try:\n    main({argv!r})\nexcept SystemExit as e:\n    code = e.code\nelse:\n    code = 0\n"
    "sys.exit(3 if 'torch' in sys.modules else code)"
)


def run_without_torch(*argv: str) -> subprocess.CompletedProcess:
    code = NO_TORCH.format(argv=[str(a) for a in argv])
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


@pytest.fixture
def empty_hub_cache(tmp_path, monkeypatch) -> Path:
    """A Hugging Face cache with nothing in it (huggingface_hub reads the constant at each look-up)."""
    import huggingface_hub.constants

    cache = tmp_path / "hub-cache"
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


@pytest.mark.slow
def test_methods_on_an_8b_config_counts_without_building_a_model(tmp_path):
    model = tmp_path / "llama-8b-shape"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({**LLAMA_3_1_8B, "architectures": ["LlamaForCausalLM"]}))
    result = run_without_torch("methods", "--model", model, "--markdown")
    assert result.returncode == 0, result.stderr[-800:]  # 3: it imported torch (and built models)
    rows = {line.split("|")[1].strip(): line for line in result.stdout.splitlines() if line.startswith("| ")}
    # peft's own print for LoRA r=8 on every linear of Llama-3-8B: 20,971,520 of 8,051,232,768.
    assert "| 20,971,520 (0.260 %) |" in rows["lora"]
    assert "| 8,030,261,248 (100.000 %) |" in rows["full"]
    assert all("n/a" not in rows[name] for name in ("boft", "oft", "vera", "prefix_tuning"))


@pytest.mark.slow
def test_methods_counts_match_peft_on_a_model_with_biases(cli, tiny_qwen):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    listed = cli("methods", "--model", tiny_qwen, "--markdown")
    assert listed.code == 0, listed.err
    rows = {line.split("|")[1].strip(): line for line in listed.out.splitlines() if line.startswith("| ")}
    assert "n/a (qwen2)" in rows["adaption_prompt"]  # Llama/Mistral only
    # The total counts Qwen2's q/k/v biases, as peft does.
    config = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM")
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_qwen), config)
    trainable, total = model.get_nb_trainable_parameters()
    assert f"| {trainable:,} ({100 * trainable / total:.3f} %) |" in rows["lora"]


def _hub_recipe(tmp_path: Path, tiny_model: Path, name: str) -> Path:
    recipe = base_recipe(tiny_model, tmp_path / "run", model={"name": name})
    return write_recipe(tmp_path / "r.yaml", recipe)


def test_validate_estimates_a_recipe_hub_model_from_its_known_shape(cli, tmp_path, tiny_model, empty_hub_cache):
    result = cli("validate", _hub_recipe(tmp_path, tiny_model, "Qwen/Qwen2.5-0.5B-Instruct"))
    assert result.code == 0, result.err
    assert "base: qwen2, 24 layers, hidden 896, vocab 151936" in result.err
    assert "parameters: 494.0M in the base" in result.err  # Qwen2.5-0.5B's published size
    assert "GiB peak" in result.err
    assert "model shape: from peftcli's copy of Qwen/Qwen2.5-0.5B-Instruct's shape" in result.err


def test_validate_reads_a_hub_model_from_the_local_cache(cli, tmp_path, tiny_model, empty_hub_cache):
    repo = empty_hub_cache / "models--someorg--tiny"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text((tiny_model / "config.json").read_text())
    result = cli("validate", _hub_recipe(tmp_path, tiny_model, "someorg/tiny"))
    assert result.code == 0, result.err
    assert "base: llama, 2 layers, hidden 64, vocab 640" in result.err
    assert "model shape: from the local Hugging Face cache" in result.err
    assert "GiB peak" in result.err


def test_validate_says_why_it_cannot_estimate_an_unknown_hub_model(cli, tmp_path, tiny_model, empty_hub_cache):
    result = cli("validate", _hub_recipe(tmp_path, tiny_model, "someorg/not-downloaded"))
    assert result.code == 0, result.err
    assert "fit estimate: cannot estimate" in result.err
    assert "someorg/not-downloaded is a hub id that is not in the local Hugging Face cache" in result.err
    assert "GiB peak" not in result.err


def _missing_data(tmp_path: Path, recipe: dict) -> str:
    recipe["data"] = {**recipe["data"], "train": str(tmp_path / "missing.jsonl")}
    return "missing.jsonl"


def _bad_row(tmp_path: Path, recipe: dict) -> str:
    data = tmp_path / "train.jsonl"
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    data.write_text(json.dumps(good) + "\n{oops\n")
    recipe["data"] = {**recipe["data"], "train": str(data)}
    return "train.jsonl"


def _occupied_output(tmp_path: Path, recipe: dict) -> str:
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("mine")
    return "output.dir"


@pytest.mark.slow
@pytest.mark.parametrize("mistake", [_missing_data, _bad_row, _occupied_output])
def test_train_reports_what_validate_finds_before_loading_torch(mistake, tmp_path, tiny_model):
    recipe = base_recipe(tiny_model, tmp_path / "run")
    named = mistake(tmp_path, recipe)
    result = run_without_torch("train", write_recipe(tmp_path / "r.yaml", recipe))
    assert result.returncode == 2, (result.returncode, result.stderr[-800:])  # 3: torch was imported
    assert "error:" in result.stderr and named in result.stderr and "hint:" in result.stderr
