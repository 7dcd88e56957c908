"""An adapter that does not fit its base, a damaged adapter_config.json, and text no tokenizer can
encode: each is one `error:` line naming the file (or row), exit 2; never a traceback, never a
silent exit 0 with an adapter that changes nothing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from helpers import DEMO_TRAIN, base_recipe, make_tiny_model, write_recipe


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_model) -> Path:
    from helpers import train

    tmp = tmp_path_factory.mktemp("finished")
    recipe = base_recipe(tiny_model, tmp / "run", training={"max_steps": 2, "save_steps": 2})
    return train(write_recipe(tmp / "recipe.yaml", recipe)).run_dir


@pytest.fixture(scope="module")
def shallow_model(tmp_path_factory) -> Path:
    """Same width and module names as tiny_model, one layer instead of two."""
    return make_tiny_model.build_tiny_model(tmp_path_factory.mktemp("models") / "shallow", layers=1)


def _copy_run(run: Path, tmp: Path, base: Path | None = None) -> Path:
    copy = tmp / "run-copy"
    shutil.copytree(run, copy)
    saved = yaml.safe_load((copy / "recipe.yaml").read_text())
    saved["output"]["dir"] = str(copy)
    if base is not None:  # the model folder was replaced by another model
        saved["model"]["name"] = str(base)
    (copy / "recipe.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    return copy


def _one_error(result, *needles: str) -> None:
    assert result.code == 2, result.err
    assert len(result.error_lines) == 1 and "Traceback" not in result.err, result.err
    for needle in needles:
        assert needle in result.error_lines[0], result.err


@pytest.mark.slow
def test_an_adapter_for_a_deeper_base_is_refused(finished_run, shallow_model, tmp_path, cli):
    """Trained on 2 layers, loaded on 1 of the same width: PEFT drops layer 1's weights in silence."""
    result = cli("generate", "--base", shallow_model, "--adapter", f"a={finished_run}", "--prompt", "hi")
    _one_error(result, "does not fit the base", "adapter_model.safetensors", "no place in the base", "layers.1.")
    run = _copy_run(finished_run, tmp_path, base=shallow_model)
    for argv in (("eval", run), ("merge", run, "--out", tmp_path / "merged")):
        _one_error(cli(*argv), "does not fit the base", "layers.1.")
    assert not (tmp_path / "merged").exists()


@pytest.mark.slow
def test_an_adapter_file_without_its_weights_is_refused(finished_run, tmp_path, cli):
    import torch
    from safetensors.torch import save_file

    run = _copy_run(finished_run, tmp_path)
    save_file({"foo": torch.zeros(2)}, str(run / "adapter" / "adapter_model.safetensors"))
    for argv in (("eval", run), ("merge", run, "--out", tmp_path / "merged")):
        _one_error(cli(*argv), "does not fit the base", "missing weights", "lora_A")
    result = cli("generate", "--adapter", f"a={run}", "--prompt", "hi")
    _one_error(result, "does not fit the base", "missing weights")


@pytest.mark.slow
@pytest.mark.parametrize(
    "damage, needle",
    [
        (lambda config: {}, "has no peft_type"),
        (lambda config: {**config, "peft_type": "SHINY"}, "'SHINY'"),
        (lambda config: {**config, "target_modules": ["nowhere_proj"]}, "match no module"),
    ],
    ids=["empty", "unknown-peft-type", "foreign-target-modules"],
)
def test_a_damaged_adapter_config_is_one_error_line(finished_run, tmp_path, cli, damage, needle):
    run = _copy_run(finished_run, tmp_path)
    config_file = run / "adapter" / "adapter_config.json"
    config_file.write_text(json.dumps(damage(json.loads(config_file.read_text()))))
    _one_error(cli("eval", run), "adapter_config.json", needle)
    _one_error(cli("generate", "--adapter", f"a={run}", "--prompt", "hi"), "adapter_config.json", needle)


def test_a_lone_surrogate_in_a_jsonl_row_is_a_bad_row(tmp_path, tiny_model, cli):
    """`\\ud800` parses as JSON but is no text: the tokenizer failed on it mid-training (exit 1)."""
    data = tmp_path / "train.jsonl"
    good = DEMO_TRAIN.read_text(encoding="utf-8").splitlines()[:8]
    broken = '{"messages": [{"role": "user", "content": "\\ud800 x"}, {"role": "assistant", "content": "y"}]}'
    data.write_text("\n".join([*good[:3], broken, *good[3:]]) + "\n", encoding="utf-8")
    recipe = base_recipe(tiny_model, tmp_path / "run", data={"train": str(data), "eval": None})
    result = cli("validate", write_recipe(tmp_path / "r.yaml", recipe))
    _one_error(result, "train.jsonl line 4", "surrogate")
    recipe["data"]["bad_rows"] = "skip"
    result = cli("validate", write_recipe(tmp_path / "r.yaml", recipe))
    assert result.code == 0, result.err


def test_a_lone_surrogate_in_a_json_record_is_a_bad_row(tmp_path):
    from peftcli.data.jsonrows import read_json_records

    data = tmp_path / "train.json"
    data.write_text('[{"text": "fine"}, {"text": "\\udfff"}]', encoding="utf-8")
    records = read_json_records(data)
    assert records[0].problem is None and records[0].value == {"text": "fine"}
    assert records[1].value is None and "surrogate" in (records[1].problem or "")


def test_generate_refuses_a_prompt_that_is_not_utf8(tmp_path, tiny_model, cli):
    # A non-UTF-8 byte on the command line reaches Python as a surrogate escape ('\udcff').
    result = cli("generate", "--base", tiny_model, "--prompt", "hi \udcff")
    _one_error(result, "--prompt", "not UTF-8")
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(b"hello\ncaf\xe9\n")  # Latin-1
    _one_error(cli("generate", "--base", tiny_model, "--prompts", prompts), "prompts.txt", "line 2", "not UTF-8")
    prompts.write_text('{"prompt": "\\ud800"}\n', encoding="utf-8")
    _one_error(cli("generate", "--base", tiny_model, "--prompts", prompts), "prompts.txt line 1", "not UTF-8")
