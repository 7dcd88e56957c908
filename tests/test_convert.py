"""`peftcli convert axolotl|llamafactory`: a recipe from another tool's config that validates as
written, carries each setting to the right key with the right value, names every key it cannot carry
(on stderr and at the top of the file), and refuses what peftcli cannot train with exit 2."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from peftcli.recipe import load_recipe

ALPACA_ROWS = [
    {"instruction": "Name a colour.", "input": "", "output": "Blue.", "sys": "Be brief."},
    {"instruction": "Add two and two.", "input": "", "output": "Four.", "sys": "Be brief."},
]
SHAREGPT_ROWS = [
    {
        "conversations": [
            {"from": "human", "value": "What is the weather?"},
            {"from": "gpt", "value": "Sunny."},
        ],
        "tools": "[]",
    }
]
MESSAGES_ROWS = [{"chat": [{"speaker": "usr", "text": "Hi"}, {"speaker": "bot", "text": "Hello!"}]}]


def _write_json(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows), encoding="utf-8")
    return path


def _write_jsonl(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def _write_yaml(path: Path, config: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


def _header(path: Path) -> str:
    """The comment block at the top of a written recipe."""
    return "\n".join(line for line in path.read_text(encoding="utf-8").splitlines() if line.startswith("#"))


def _not_carried(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("warning: not carried: ")]


# --- Axolotl -----------------------------------------------------------------------------------


def _axolotl_config(tmp_path: Path, tiny_model: Path, **extra) -> Path:
    _write_json(tmp_path / "cfg" / "data" / "alpaca.json", ALPACA_ROWS)
    _write_jsonl(tmp_path / "cfg" / "data" / "chat.jsonl", MESSAGES_ROWS)
    _write_json(tmp_path / "cfg" / "data" / "eval.json", ALPACA_ROWS)
    config = {
        "base_model": str(tiny_model),
        "datasets": [
            {"path": "data/alpaca.json", "type": "alpaca"},
            {
                "path": "data/chat.jsonl",
                "type": "chat_template",
                "field_messages": "chat",
                "message_property_mappings": {"role": "speaker", "content": "text"},
                "roles": {"user": ["usr"], "assistant": ["bot"]},
            },
            {"path": "data/alpaca.json", "type": "alpaca_w_system.load_open_orca"},
        ],
        "test_datasets": [{"path": "data/eval.json", "type": "alpaca"}],
        "output_dir": "./outputs/lora-out",
        "adapter": "lora",
        "lora_model_dir": None,
        "sequence_len": 2048,
        "sample_packing": False,
        "lora_r": 16,
        "lora_alpha": 32,
        "lora_dropout": 0.1,
        "lora_target_modules": ["q_proj", "v_proj"],
        "gradient_accumulation_steps": 2,
        "micro_batch_size": 3,
        "num_epochs": 2,
        "optimizer": "adamw_torch_fused",
        "lr_scheduler": "cosine",
        "learning_rate": "2e-4",  # YAML reads 2e-4 as text; Axolotl accepts it
        "warmup_ratio": 0.1,
        "weight_decay": 0.01,
        "max_grad_norm": 0.5,
        "seed": 3,
        "eval_steps": 5,
        "save_steps": 10,
        "logging_steps": 2,
        "gradient_checkpointing": True,
        "chat_template": "chatml",
        "train_on_inputs": False,
        "evals_per_epoch": 4,
        "special_tokens": {"pad_token": "<|end_of_text|>"},
        "wandb_project": "my-project",
        "loss_watchdog_threshold": 5.0,
        "some_future_key": 1,
        **extra,
    }
    return _write_yaml(tmp_path / "cfg" / "lora.yml", config)


def test_axolotl_config_becomes_a_recipe_that_validates(tmp_path, tiny_model, cli):
    config = _axolotl_config(tmp_path, tiny_model)
    out = tmp_path / "recipes" / "lora.yaml"
    out.parent.mkdir()
    result = cli("convert", "axolotl", config, "--out", out)
    assert result.code == 0, result.err
    assert cli("validate", out).code == 0

    recipe = load_recipe(out)
    assert recipe.model.name == str(tiny_model)
    peft = recipe.peft.model_dump()
    assert (peft["method"], peft["r"], peft["alpha"], peft["dropout"]) == ("lora", 16, 32, 0.1)
    assert peft["target_modules"] == ["q_proj", "v_proj"]
    data = tmp_path / "cfg" / "data"
    alpaca, chat = recipe.data.train
    assert (alpaca.path, alpaca.format) == (str(data / "alpaca.json"), "alpaca")
    assert (chat.path, chat.format) == (str(data / "chat.jsonl"), "messages")
    assert chat.columns == {"messages": "chat", "role": "speaker", "content": "text"}
    assert chat.roles == {"usr": "user", "bot": "assistant"}
    assert [s.path for s in recipe.data.eval] == [str(data / "eval.json")]
    assert recipe.data.max_length == 512  # 2048 is past the tiny model's context: said as a change
    assert recipe.data.packing is False and recipe.data.chat_template == "chatml"
    t = recipe.training
    assert (t.batch_size, t.gradient_accumulation, t.epochs, t.learning_rate) == (3, 2, 2.0, 2e-4)
    assert (t.optimizer, t.lr_scheduler, t.warmup_ratio, t.weight_decay) == ("adamw_torch_fused", "cosine", 0.1, 0.01)
    assert (t.max_grad_norm, t.seed, t.eval_steps, t.save_steps, t.logging_steps) == (0.5, 3, 5, 10, 2)
    assert t.gradient_checkpointing is True
    assert recipe.output.dir == str(tmp_path / "cfg" / "outputs" / "lora-out")
    # Paths are written relative to the recipe, so the recipe can move with its data.
    written = yaml.safe_load(out.read_text())
    assert not Path(written["model"]["name"]).is_absolute()
    assert (out.parent / written["model"]["name"]).resolve() == tiny_model.resolve()
    assert written["data"]["train"][0]["path"] == "../cfg/data/alpaca.json"

    header = _header(out)
    assert "sequence_len: 2048 -> data.max_length: 512" in header and "sequence_len" in result.err
    for key in ("evals_per_epoch", "special_tokens", "wandb_project", "loss_watchdog_threshold", "some_future_key"):
        assert f"#   {key}: " in header, key
        assert any(line.startswith(f"warning: not carried: {key}: ") for line in _not_carried(result.err)), key
    # A dataset type peftcli has no format for is left out and named, with its path.
    assert "datasets[2].type: alpaca_w_system.load_open_orca" in header
    assert "datasets[2].type" in result.err and "data/alpaca.json) is left out" in result.err
    assert "lora_model_dir" in header  # empty in the config: named too


def test_every_axolotl_key_is_carried_or_named(tmp_path, tiny_model):
    from peftcli.convert import from_axolotl

    config = _axolotl_config(tmp_path, tiny_model, bf16="auto", model_type="LlamaForCausalLM", load_in_4bit=False)
    ledger = from_axolotl(config, tmp_path / "r.yaml")
    header = "\n".join(ledger.header("peftcli convert axolotl"))
    for key in yaml.safe_load(config.read_text()):
        assert key in ledger.carried_keys or re.search(rf"\b{re.escape(key)}\b", header), key


def test_axolotl_qlora_with_dora_and_rslora(tmp_path, tiny_model, cli):
    config = _axolotl_config(
        tmp_path,
        tiny_model,
        adapter="qlora",
        load_in_4bit=True,
        peft_use_dora=True,
        peft_use_rslora=True,
        lora_target_linear=True,
        lora_target_modules=None,
        bnb_config_kwargs={"bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True},
    )
    out = tmp_path / "q.yaml"
    result = cli("convert", "axolotl", config, "--out", out)
    assert result.code == 0, result.err
    assert cli("validate", out).code == 0
    recipe = load_recipe(out)
    assert recipe.quantization.bits == 4 and recipe.quantization.quant_type == "nf4"
    assert recipe.quantization.double_quant is True
    peft = recipe.peft.model_dump()
    assert peft["use_dora"] is True and peft["use_rslora"] is True and peft["target_modules"] == "all-linear"


def test_axolotl_without_an_adapter_is_a_full_fine_tune(tmp_path, tiny_model, cli):
    config = _axolotl_config(tmp_path, tiny_model, adapter=None)
    out = tmp_path / "full.yaml"
    result = cli("convert", "axolotl", config, "--out", out)
    assert result.code == 0, result.err
    assert load_recipe(out).peft.method == "full"
    assert cli("validate", out).code == 0
    # LoRA keys mean nothing to a full fine-tune: listed, not dropped silently.
    for key in ("lora_r", "lora_alpha", "lora_target_modules"):
        assert f"not carried: {key}: " in result.err and f"#   {key}: " in _header(out)


def test_axolotl_sharegpt_user_defined_and_completion_types(tmp_path, tiny_model, cli):
    _write_json(tmp_path / "sg.json", SHAREGPT_ROWS)
    _write_jsonl(tmp_path / "qa.jsonl", [{"q": "Hi?", "a": "Hello.", "ctx": ""}])
    (tmp_path / "corpus.txt").write_text("one line of text\nanother line\n", encoding="utf-8")
    config = _write_yaml(
        tmp_path / "c.yml",
        {
            "base_model": str(tiny_model),
            "datasets": [
                {"path": "sg.json", "type": "sharegpt", "conversation": "chatml"},
                {
                    "path": "qa.jsonl",
                    "type": {
                        "field_instruction": "q",
                        "field_input": "ctx",
                        "field_output": "a",
                        "format": "[INST] {instruction}",
                    },
                },
                {"path": "corpus.txt", "type": "completion"},
                {"path": "qa.jsonl", "type": "input_output"},
            ],
            "val_set_size": 0.25,
        },
    )
    out = tmp_path / "c.yaml"
    result = cli("convert", "axolotl", config, "--out", out)
    assert result.code == 0, result.err
    assert cli("validate", out).code == 0
    recipe = load_recipe(out)
    sharegpt, user, completion = recipe.data.train
    assert sharegpt.format == "sharegpt"
    assert user.format == "alpaca" and user.columns == {"instruction": "q", "input": "ctx", "output": "a"}
    assert completion.format == "text"
    assert recipe.data.eval_split == 0.25 and recipe.data.max_length == 512  # Axolotl's default sequence_len
    assert recipe.training.batch_size == 1  # Axolotl's default micro_batch_size, written: peftcli's is 4
    for key in ("datasets[0].conversation", "datasets[1].type.format", "datasets[3].type: input_output"):
        assert key in result.err and key in _header(out), key


def test_axolotl_message_keys_peftcli_reads_are_honoured_not_listed(tmp_path, tiny_model, cli):
    weighted = [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo", "weight": 1}]}]
    _write_jsonl(tmp_path / "cfg" / "data" / "weighted.jsonl", weighted)
    _write_json(tmp_path / "cfg" / "data" / "glaive.json", [{"chat": SHAREGPT_ROWS[0]["conversations"], "fns": "[]"}])
    (tmp_path / "cfg" / "chat.jinja").write_text("{{ messages[0]['content'] }}", encoding="utf-8")
    datasets = [
        {
            "path": "data/weighted.jsonl",
            "type": "chat_template",
            "message_property_mappings": {"role": "role", "content": "content", "weight": "weight"},
        },
        {
            "path": "data/glaive.json",
            "type": "chat_template",
            "field_messages": "chat",
            "field_tools": "fns",
            "message_field_role": "from",
            "message_field_content": "value",
            "roles_to_train": ["gpt", "assistant"],
        },
    ]
    config = _axolotl_config(
        tmp_path, tiny_model, datasets=datasets, chat_template="jinja", chat_template_jinja="chat.jinja"
    )
    out = tmp_path / "r.yaml"
    result = cli("convert", "axolotl", config, "--out", out)
    assert result.code == 0, result.err
    for key in ("message_property_mappings.weight", "field_tools", "roles_to_train", "chat_template"):
        assert not any(key in line for line in _not_carried(result.err)), key
    header = _header(out)
    assert "chat_template_jinja" not in header.split("WHAT PEFTCLI DOES ANYWAY")[-1]  # carried, not "anyway"
    recipe = load_recipe(out)
    assert recipe.data.chat_template == str(tmp_path / "cfg" / "chat.jinja")
    assert recipe.data.train[1].columns == {"conversations": "chat", "tools": "fns"}

    # A weight under a key peftcli does not read is listed, with the key it reads.
    datasets[0]["message_property_mappings"]["weight"] = "w"
    result = cli("convert", "axolotl", _axolotl_config(tmp_path, tiny_model, datasets=datasets), "--out", "-")
    assert any(
        "weight: w -- peftcli reads a turn's weight from the key 'weight'" in line for line in _not_carried(result.err)
    )


@pytest.mark.parametrize(
    ("config", "named"),
    [
        ({"base_model": "m", "datasets": [{"path": "x.json", "type": "alpaca_w_system.load_open_orca"}]}, "datasets"),
        ({"base_model": "m", "rl": "dpo", "datasets": [{"path": "x.json", "type": "chatml.intel"}]}, "rl: dpo"),
        ({"datasets": [{"path": "x.json", "type": "alpaca"}]}, "base_model"),
        ({"base_model": "m", "adapter": "lokr-ish", "datasets": [{"path": "x.json", "type": "alpaca"}]}, "adapter"),
    ],
    ids=["nothing-left-to-train-on", "rl", "no-model", "unknown-adapter"],
)
def test_axolotl_configs_peftcli_cannot_train_exit_2(config, named, tmp_path, cli):
    path = _write_yaml(tmp_path / "bad.yml", config)
    result = cli("convert", "axolotl", path, "--out", tmp_path / "r.yaml")
    assert result.code == 2
    assert len(result.error_lines) == 1 and named in result.error_lines[0]
    assert "hint:" in result.err
    assert not (tmp_path / "r.yaml").exists()


# --- LLaMA-Factory -----------------------------------------------------------------------------


def _info(tmp_path: Path, extra: dict | None = None) -> Path:
    """A dataset_info.json (with its data files) in tmp_path/lf/data."""
    data = tmp_path / "lf" / "data"
    _write_json(
        data / "alpaca_custom.json", [{"q": r["instruction"], "a": r["output"], "s": r["sys"]} for r in ALPACA_ROWS]
    )
    _write_json(data / "tools.json", SHAREGPT_ROWS)
    _write_json(
        data / "chat.json", [{"msgs": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}]
    )
    (data / "wiki.txt").write_text("first document\nsecond document\n", encoding="utf-8")
    info = {
        "my_alpaca": {
            "file_name": "alpaca_custom.json",
            "columns": {"prompt": "q", "response": "a", "system": "s", "tools": "t", "chosen": "c"},
        },
        "my_tools": {
            "file_name": "tools.json",
            "formatting": "sharegpt",
            "columns": {"messages": "conversations", "tools": "tools"},
            "num_samples": 10,
        },
        "my_chat": {
            "file_name": "chat.json",
            "formatting": "sharegpt",
            "columns": {"messages": "msgs"},
            "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"},
        },
        "wiki": {"file_name": "wiki.txt", "columns": {"prompt": "text"}},
        "hub_data": {"hf_hub_url": "org/data", "ms_hub_url": "org/data-ms", "split": "validation", "subset": "en"},
        "prefs": {"file_name": "tools.json", "ranking": True, "formatting": "sharegpt"},
        "kto": {"file_name": "chat.json", "columns": {"messages": "msgs", "kto_tag": "label"}},
        "pictures": {
            "file_name": "chat.json",
            "formatting": "sharegpt",
            "columns": {"messages": "msgs", "images": "images"},
        },
        "modelscope": {"ms_hub_url": "AI-ModelScope/data"},
        **(extra or {}),
    }
    return _write_json(data / "dataset_info.json", info)


def _lf_config(tmp_path: Path, tiny_model: Path, **extra) -> Path:
    _info(tmp_path)
    config = {
        "model_name_or_path": str(tiny_model),
        "trust_remote_code": True,
        "stage": "sft",
        "do_train": True,
        "finetuning_type": "lora",
        "lora_rank": 16,
        "lora_target": "q_proj,v_proj",
        "use_dora": True,
        "dataset": "my_alpaca,my_tools,my_chat",
        "template": "chatml",
        "cutoff_len": 256,
        "max_samples": 1000,
        "overwrite_cache": True,
        "output_dir": "saves/tiny/lora/sft",
        "logging_steps": 10,
        "save_steps": 50,
        "plot_loss": True,
        "report_to": "none",
        "per_device_train_batch_size": 2,
        "gradient_accumulation_steps": 4,
        "learning_rate": 1.0e-4,
        "num_train_epochs": 2.0,
        "lr_scheduler_type": "cosine",
        "warmup_ratio": 0.1,
        "bf16": True,
        "ddp_timeout": 180000000,
        "val_size": 0.1,
        "eval_strategy": "steps",
        "eval_steps": 20,
        "hf_hub_token": "hf_" + "x" * 30,
        **extra,
    }
    return _write_yaml(tmp_path / "lf" / "sft.yaml", config)


def test_llamafactory_config_becomes_a_recipe_that_validates(tmp_path, tiny_model, cli):
    config = _lf_config(tmp_path, tiny_model)
    out = tmp_path / "lf" / "recipe.yaml"
    result = cli("convert", "llamafactory", config, "--out", out)
    assert result.code == 0, result.err
    assert cli("validate", out).code == 0

    recipe = load_recipe(out)
    assert recipe.model.name == str(tiny_model) and recipe.model.trust_remote_code is True
    assert recipe.model.dtype == "bfloat16"
    peft = recipe.peft.model_dump()
    assert (peft["method"], peft["r"], peft["use_dora"], peft["target_modules"]) == (
        "lora",
        16,
        True,
        ["q_proj", "v_proj"],
    )
    assert (peft["alpha"], peft["dropout"]) == (32, 0.0)  # LLaMA-Factory's defaults: 2 x rank, no dropout
    data = tmp_path / "lf" / "data"
    alpaca, tools, chat = recipe.data.train
    assert (alpaca.path, alpaca.format) == (str(data / "alpaca_custom.json"), "alpaca")
    assert alpaca.columns == {"instruction": "q", "output": "a", "system": "s", "tools": "t"}
    assert (tools.format, tools.columns) == ("sharegpt", None)
    assert tools.roles == {"human": "user", "gpt": "assistant", "observation": "tool", "function_call": "tool_call"}
    assert (chat.format, chat.columns) == ("messages", {"messages": "msgs"})
    assert chat.roles == {"observation": "tool", "function_call": "tool_call"}
    assert recipe.data.max_length == 256 and recipe.data.eval_split == 0.1 and recipe.data.chat_template == "chatml"
    t = recipe.training
    assert (t.batch_size, t.gradient_accumulation, t.learning_rate, t.epochs) == (2, 4, 1e-4, 2.0)
    assert (t.lr_scheduler, t.warmup_ratio, t.eval_steps, t.save_steps, t.logging_steps) == ("cosine", 0.1, 20, 50, 10)
    assert t.report_to == []
    assert recipe.output.dir == str(tmp_path / "lf" / "saves" / "tiny" / "lora" / "sft")
    assert yaml.safe_load(out.read_text())["data"]["train"][0]["path"] == "data/alpaca_custom.json"

    text, header = out.read_text(), _header(out)
    for key in ("max_samples", "ddp_timeout", "hf_hub_token", "my_alpaca.columns.chosen", "my_tools.num_samples"):
        assert key in header and key in result.err, key
    assert "hf_" + "x" * 30 not in text + result.err + result.out  # a token is named, never shown
    assert "lora_alpha: 32 -> peft.alpha" in header  # filled with LLaMA-Factory's default, and said so


def test_llamafactory_dataset_info_flag_pretraining_text_and_hub_entries(tmp_path, tiny_model, cli):
    info = _info(tmp_path)
    moved = tmp_path / "elsewhere" / "dataset_info.json"
    moved.parent.mkdir()
    moved.write_text(info.read_text())
    for name in ("wiki.txt", "alpaca_custom.json"):
        (moved.parent / name).write_text((info.parent / name).read_text())
    config = _write_yaml(
        tmp_path / "pt.yaml",
        {"model_name_or_path": str(tiny_model), "stage": "pt", "dataset": "wiki,hub_data", "finetuning_type": "full"},
    )
    out = tmp_path / "pt-recipe.yaml"
    result = cli("convert", "llamafactory", config, "--dataset-info", moved, "--out", out)
    assert result.code == 0, result.err
    assert cli("validate", out).code == 0
    recipe = load_recipe(out)
    wiki, hub = recipe.data.train
    assert (wiki.path, wiki.format, recipe.data.text_split) == (str(moved.parent / "wiki.txt"), "text", "line")
    assert (hub.path, hub.split, hub.subset) == ("org/data", "validation", "en")
    assert recipe.peft.method == "full" and recipe.data.max_length == 512  # cutoff_len 2048 > the context
    # LLaMA-Factory cuts the documents into cutoff_len-token blocks, every token trained: so does split.
    assert recipe.data.overlong == "split" and "note: changed: stage: pt -> data.overlong: split" in result.err
    assert not any(line.startswith("warning: not carried: stage") for line in _not_carried(result.err))
    assert recipe.training.epochs == 3.0 and recipe.training.learning_rate == 5e-5  # the Trainer's defaults


def test_llamafactory_data_only_prints_the_data_section(tmp_path, cli):
    info = _info(tmp_path)
    result = cli("convert", "llamafactory", "--data-only", "--dataset-info", info, "--dataset", "my_tools,my_chat")
    assert result.code == 0, result.err
    data = yaml.safe_load(result.out)
    assert list(data) == ["data"]
    tools, chat = data["data"]["train"]
    assert tools["path"] == str(info.parent / "tools.json") and tools["format"] == "sharegpt"
    assert chat["columns"] == {"messages": "msgs"}
    assert "my_tools.num_samples" in result.err and "my_tools.num_samples" in result.out  # named in both

    out = tmp_path / "snippets" / "data.yaml"
    out.parent.mkdir()
    written = cli(
        "convert", "llamafactory", "--data-only", "--dataset-info", info, "--dataset", "my_alpaca", "--out", out
    )
    assert written.code == 0 and written.out == ""
    assert yaml.safe_load(out.read_text())["data"]["train"][0]["path"] == "../lf/data/alpaca_custom.json"


@pytest.mark.parametrize(
    ("dataset", "named"),
    [
        ("prefs", "'prefs' has ranking: true"),
        ("kto", "'kto' has a kto_tag column"),
        ("pictures", "'pictures' has images columns"),
        ("my_alpaca,nope", "'nope' is not declared in"),
        ("modelscope", "ms_hub_url"),
    ],
)
def test_llamafactory_datasets_peftcli_cannot_train_exit_2(dataset, named, tmp_path, tiny_model, cli):
    config = _lf_config(tmp_path, tiny_model, dataset=dataset)
    result = cli("convert", "llamafactory", config, "--out", tmp_path / "r.yaml")
    assert result.code == 2
    assert len(result.error_lines) == 1 and named in result.error_lines[0], result.err
    assert "hint:" in result.err and not (tmp_path / "r.yaml").exists()
    data_only = cli(
        "convert",
        "llamafactory",
        "--data-only",
        "--dataset-info",
        tmp_path / "lf" / "data" / "dataset_info.json",
        "--dataset",
        dataset,
    )
    assert data_only.code == 2 and named in data_only.error_lines[0]


def test_llamafactory_bad_configs_exit_2(tmp_path, tiny_model, cli):
    missing = cli("convert", "llamafactory", tmp_path / "nope.yaml", "--out", tmp_path / "r.yaml")
    assert missing.code == 2 and "nope.yaml" in missing.error_lines[0]
    dpo = cli("convert", "llamafactory", _lf_config(tmp_path, tiny_model, stage="dpo"), "--out", tmp_path / "r.yaml")
    assert dpo.code == 2 and "stage: dpo" in dpo.error_lines[0]
    config = _lf_config(tmp_path, tiny_model, dataset_dir="nowhere")
    no_info = cli("convert", "llamafactory", config, "--out", tmp_path / "r.yaml")
    assert no_info.code == 2 and "nowhere" in no_info.error_lines[0] and "--dataset-info" in no_info.err
    (tmp_path / "broken.yaml").write_text("model_name_or_path: [unclosed\n")
    broken = cli("convert", "llamafactory", tmp_path / "broken.yaml", "--out", tmp_path / "r.yaml")
    assert broken.code == 2 and "broken.yaml" in broken.error_lines[0]


def test_an_existing_out_file_is_kept_unless_force(tmp_path, tiny_model, cli):
    config = _lf_config(tmp_path, tiny_model)
    out = tmp_path / "recipe.yaml"
    out.write_text("mine\n")
    refused = cli("convert", "llamafactory", config, "--out", out)
    assert refused.code == 2 and "already exists" in refused.error_lines[0] and "--force" in refused.err
    assert out.read_text() == "mine\n"
    assert cli("convert", "llamafactory", config, "--out", out, "--force").code == 0
    assert load_recipe(out).model.name == str(tiny_model)


def test_convert_imports_no_torch(tmp_path, tiny_model):
    config = _lf_config(tmp_path, tiny_model)
    code = (
        "import sys; from peftcli.cli import main\n"
        f"try:\n    main(['convert', 'llamafactory', {str(config)!r}, '--out', {str(tmp_path / 'r.yaml')!r}])\n"
        "except SystemExit as e:\n    assert not e.code, e.code\n"
        "sys.exit(3 if 'torch' in sys.modules else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, (result.returncode, result.stderr[-500:])


def test_llamafactory_without_finetuning_type_trains_lora(tmp_path, tiny_model, cli):
    """LLaMA-Factory's default method is LoRA; the converter counts on peftcli's default being LoRA too."""
    config = _lf_config(tmp_path, tiny_model, finetuning_type=None, lora_rank=4, use_dora=None)
    out = tmp_path / "r.yaml"
    assert cli("convert", "llamafactory", config, "--out", out).code == 0
    peft = load_recipe(out).peft.model_dump()
    assert (peft["method"], peft["r"], peft["alpha"], peft["use_dora"]) == ("lora", 4, 8, False)


def test_llamafactory_eval_dataset_wins_over_val_size_and_out_dash_prints(tmp_path, tiny_model, cli):
    config = _lf_config(tmp_path, tiny_model, eval_dataset="my_chat", val_size=0.2)
    result = cli("convert", "llamafactory", config, "--out", "-")
    assert result.code == 0, result.err
    printed = yaml.safe_load(result.out)
    assert printed["data"]["eval"] == [
        {
            "path": str(tmp_path / "lf" / "data" / "chat.json"),
            "format": "messages",
            "columns": {"messages": "msgs"},
            "roles": {"observation": "tool", "function_call": "tool_call"},
        }
    ]
    assert "eval_split" not in printed["data"]
    assert "not carried: val_size: 0.2 -- eval_dataset is the eval data" in result.err
    assert "#   val_size: 0.2" in result.out


def test_odd_keys_and_values_stay_inside_the_comment_block(tmp_path, tiny_model, cli):
    config = _axolotl_config(tmp_path, tiny_model, **{"odd\nkey: 1": "value\u2028model: {name: x}", "note": "a\rb"})
    out = tmp_path / "odd.yaml"
    result = cli("convert", "axolotl", config, "--out", out)
    assert result.code == 0, result.err
    assert load_recipe(out).model.name == str(tiny_model)  # the comment block parsed as comments only
    assert "odd key: 1" in _header(out)
