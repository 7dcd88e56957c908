"""`data.overlong: split`, pre-training as LLaMA-Factory (`stage: pt`) and Axolotl (`type: completion`)
do it: a plain text longer than data.max_length is cut into consecutive max_length blocks, each an
example, so no token is dropped; a conversation is refused (a reply cut in two is not a reply); the
converters map those pre-training configs to it. And `validate` says what training says of rows of
which only some carry reasoning."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml
from helpers import base_recipe, write_recipe

from peftcli.data import prepare_data
from peftcli.data.encode import IGNORE, encode, fit_blocks, refuse_split
from peftcli.data.formats import Example, Turn
from peftcli.errors import UserError
from peftcli.recipe import DataSection, load_recipe

# A text far longer than the blocks, with words the tiny tokenizer splits into many tokens.
LONG_TEXT = " ".join(f"Monday{n} comes before Tuesday{n}, and then the week goes on." for n in range(60))
CHAT = [{"role": "user", "content": "What comes after Monday?"}, {"role": "assistant", "content": "Tuesday"}]


def _write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def _write_yaml(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


# --- split: every token of a long text, in max_length blocks ---------------------------------------


@pytest.mark.parametrize("max_length", [16, 64])
def test_a_long_text_becomes_blocks_that_concatenate_to_every_token(tokenizer, max_length):
    whole = encode(tokenizer, Example("t.jsonl line 1", completion=LONG_TEXT), "completions", None)
    n = len(whole.input_ids)
    assert n > 4 * max_length

    blocks = fit_blocks(whole, max_length, "split")

    assert len(blocks) == math.ceil(n / max_length)
    assert [len(b.input_ids) for b in blocks[:-1]] == [max_length] * (len(blocks) - 1)
    assert sum((b.input_ids for b in blocks), []) == whole.input_ids  # no token dropped, none added
    assert sum((b.labels for b in blocks), []) == whole.labels
    # A text trains every token (BOS, where the tokenizer adds one, is context only, as before).
    assert all(label != IGNORE for b in blocks for label in b.labels if label != tokenizer.bos_token_id)
    assert blocks[-1].input_ids[-1] == tokenizer.eos_token_id  # the document still ends with EOS
    assert [(b.block, b.blocks, b.origin, b.truncated) for b in blocks[:2]] == [
        (1, len(blocks), "t.jsonl line 1", False),
        (2, len(blocks), "t.jsonl line 1", False),
    ]
    # truncate, the default, keeps only the first block
    assert fit_blocks(whole, max_length, "truncate")[0].input_ids == blocks[0].input_ids


def test_a_text_that_fits_stays_one_example(tokenizer):
    short = encode(tokenizer, Example("t.jsonl line 2", completion="Tuesday"), "completions", None)
    assert fit_blocks(short, 64, "split") == [short]


@pytest.mark.parametrize(
    "example",
    [
        Example("c.jsonl line 3", turns=(Turn("user", "Hi"), Turn("assistant", "Hello"))),
        Example("c.jsonl line 3", prompt="Hi", completion="Hello"),
    ],
    ids=["conversation", "prompt-completion"],
)
def test_split_refuses_rows_with_a_reply(example):
    with pytest.raises(UserError) as caught:
        refuse_split(example, "data.train")
    assert caught.value.message.startswith("data.overlong: split: data.train: c.jsonl line 3 is a")
    assert "a reply cut in two is not a reply" in caught.value.message


def test_a_conversation_recipe_with_split_exits_2_naming_the_key(cli, tmp_path, tiny_model):
    data = _write_jsonl(tmp_path / "chat.jsonl", [{"messages": CHAT}])
    recipe = base_recipe(
        tiny_model, tmp_path / "run", data={"train": {"path": str(data), "format": "messages"}, "overlong": "split"}
    )
    result = cli("validate", write_recipe(tmp_path / "r.yaml", recipe))
    assert result.code == 2 and len(result.error_lines) == 1, result.err
    assert "data.overlong: split" in result.error_lines[0] and "a source is format messages" in result.err
    assert "a reply cut in two is not a reply" in result.err


def test_a_text_recipe_with_split_is_valid(cli, tmp_path, tiny_model):
    data = _write_jsonl(tmp_path / "text.jsonl", [{"text": LONG_TEXT}])
    recipe = base_recipe(tiny_model, tmp_path / "run", data={"train": str(data), "eval": None, "overlong": "split"})
    result = cli("validate", write_recipe(tmp_path / "r.yaml", recipe))
    assert result.code == 0, result.err


# --- the converters map pre-training to split ---------------------------------------------------


def _llamafactory(tmp_path: Path, tiny_model: Path, **extra) -> Path:
    data = tmp_path / "lf" / "data"
    data.mkdir(parents=True)
    (data / "corpus.txt").write_text(f"{LONG_TEXT}\nanother document\n", encoding="utf-8")
    (data / "dataset_info.json").write_text(json.dumps({"corpus": {"file_name": "corpus.txt"}}), encoding="utf-8")
    config = {"model_name_or_path": str(tiny_model), "stage": "pt", "dataset": "corpus", "cutoff_len": 64, **extra}
    return _write_yaml(tmp_path / "lf" / "pt.yaml", config)


def test_llamafactory_pt_becomes_split_as_a_carried_change(cli, tmp_path, tiny_model):
    out = tmp_path / "pt-recipe.yaml"
    result = cli("convert", "llamafactory", _llamafactory(tmp_path, tiny_model), "--out", out)
    assert result.code == 0, result.err
    recipe = load_recipe(out)
    assert (recipe.data.overlong, recipe.data.max_length, recipe.data.train[0].format) == ("split", 64, "text")
    assert "note: changed: stage: pt -> data.overlong: split" in result.err
    assert "stage: pt -> data.overlong: split" in out.read_text(encoding="utf-8")  # in the header too
    assert "not carried: stage" not in result.err
    assert cli("validate", out).code == 0


def test_llamafactory_pt_without_packing_truncates_as_llamafactory_does(cli, tmp_path, tiny_model):
    out = tmp_path / "pt-recipe.yaml"
    result = cli("convert", "llamafactory", _llamafactory(tmp_path, tiny_model, packing=False), "--out", out)
    assert result.code == 0, result.err
    assert load_recipe(out).data.overlong == "truncate"
    assert "stage: pt with packing: false -> data.overlong: truncate" in result.err


def _axolotl(tmp_path: Path, tiny_model: Path, datasets: list[dict]) -> Path:
    _write_jsonl(tmp_path / "corpus.jsonl", [{"body": LONG_TEXT}])
    _write_jsonl(tmp_path / "chat.jsonl", [{"messages": CHAT}])
    config = {"base_model": str(tiny_model), "adapter": "lora", "datasets": datasets, "sequence_len": 64}
    return _write_yaml(tmp_path / "ax.yml", config)


def test_axolotl_completion_becomes_split(cli, tmp_path, tiny_model):
    config = _axolotl(tmp_path, tiny_model, [{"path": "corpus.jsonl", "type": "completion", "field": "body"}])
    out = tmp_path / "ax-recipe.yaml"
    result = cli("convert", "axolotl", config, "--out", out)
    assert result.code == 0, result.err
    recipe = load_recipe(out)
    assert (recipe.data.overlong, recipe.data.max_length, recipe.data.train[0].format) == ("split", 64, "text")
    assert "note: changed: type: completion -> data.overlong: split" in result.err
    assert cli("validate", out).code == 0


def test_axolotl_completion_beside_conversations_is_listed_not_split(cli, tmp_path, tiny_model):
    datasets = [
        {"path": "corpus.jsonl", "type": "completion", "field": "body"},
        {"path": "chat.jsonl", "type": "chat_template"},
    ]
    out = tmp_path / "ax-recipe.yaml"
    result = cli("convert", "axolotl", _axolotl(tmp_path, tiny_model, datasets), "--out", out)
    assert result.code == 0, result.err
    assert load_recipe(out).data.overlong == "truncate"
    assert "warning: not carried: datasets[0].type: completion -- Axolotl cuts completion text" in result.err
    assert cli("validate", out).code == 0


# --- validate: the thinking-mode warning training gives -----------------------------------------

# Qwen3's behaviour, as in test_thinking_and_tools.py: a template that takes enable_thinking.
QWEN3_LIKE = r"""{%- for message in messages %}
{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' }}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}
{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\n\n</think>\n\n' }}{%- endif %}
{%- endif %}"""
REASONED = "<think>\nMonday comes first.\n</think>\n\nTuesday"


def test_validate_warns_of_rows_only_some_of_which_carry_reasoning(cli, tmp_path, tiny_model):
    rows = [{"messages": [CHAT[0], {"role": "assistant", "content": reply}]} for reply in (REASONED, "Tuesday")]
    data = _write_jsonl(tmp_path / "d.jsonl", [*rows, rows[1]])
    template = tmp_path / "qwen3.jinja"
    template.write_text(QWEN3_LIKE, encoding="utf-8")
    recipe = base_recipe(
        tiny_model, tmp_path / "run", data={"train": str(data), "eval": None, "chat_template": str(template)}
    )
    path = write_recipe(tmp_path / "r.yaml", recipe)

    result = cli("validate", path)
    assert result.code == 0, result.err
    err = " ".join(result.err.split())
    assert err.count("data.train: 1 of 3 conversations carry reasoning") == 1  # as training says it

    as_json = cli("validate", path, "--json")
    warnings = json.loads(as_json.out)["chat_template"]["warnings"]
    assert any("1 of 3 conversations carry reasoning" in " ".join(w.split()) for w in warnings)


# --- the data stage: what preview shows is what training gets ---------------------------------------


def test_training_data_holds_every_token_of_a_long_text_in_blocks(tmp_path, tokenizer):
    data = _write_jsonl(tmp_path / "t.jsonl", [{"text": LONG_TEXT}, {"text": "Tuesday"}])
    whole = encode(tokenizer, Example("t.jsonl line 1", completion=LONG_TEXT), "completions", None)
    count = math.ceil(len(whole.input_ids) / 16)

    prepared = prepare_data(DataSection(train=str(data), max_length=16, overlong="split"), tokenizer, seed=0)

    blocks = sorted((item for item in prepared.train if item.origin == "t.jsonl line 1"), key=lambda b: b.block)
    assert len(blocks) == count and sum((b.input_ids for b in blocks), []) == whole.input_ids
    stats = prepared.train_stats
    assert (stats.rows, stats.split, stats.truncated, stats.dropped) == (count + 1, 1, 0, 0)
    assert stats.tokens == sum(len(item.input_ids) for item in prepared.train)


def test_preview_shows_the_blocks_and_counts_them(cli, tmp_path, tiny_model):
    data = _write_jsonl(tmp_path / "t.jsonl", [{"text": LONG_TEXT}])
    recipe = base_recipe(
        tiny_model, tmp_path / "run", data={"train": str(data), "eval": None, "max_length": 16, "overlong": "split"}
    )
    result = cli("data", "preview", write_recipe(tmp_path / "r.yaml", recipe), "-n", "2")
    assert result.code == 0, result.err
    assert "t.jsonl line 1: 16 tokens, 16 trained (block 2 of " in result.out
    table = {line.split("│")[1].strip(): line.split("│")[2].strip() for line in result.out.splitlines() if "│" in line}
    assert (table["truncated"], table["split"]) == ("0", "1")


def test_split_refuses_a_conversation_detected_from_its_columns(cli, tmp_path, tiny_model):
    data = _write_jsonl(tmp_path / "chat.jsonl", [{"messages": CHAT}])
    recipe = base_recipe(tiny_model, tmp_path / "run", data={"train": str(data), "eval": None, "overlong": "split"})
    result = cli("data", "preview", write_recipe(tmp_path / "r.yaml", recipe))
    assert result.code == 2 and len(result.error_lines) == 1, result.err
    said = "error: data.overlong: split: data.train: chat.jsonl line 1 is a conversation"
    assert result.error_lines[0].startswith(said)
