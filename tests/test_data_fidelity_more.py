"""Data fidelity, continued: `validate` renders and masks every conversation through the chat template
as training will (without torch), and says what training would skip or stop at; a `.txt` file says
how it was split; KTO labels, row weights, media and preference columns are refused whatever their
spelling; a `system` column is honoured, or refused where it cannot be."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from helpers import base_recipe, write_recipe

from peftcli.data import prepare_data
from peftcli.data.pipeline import read_examples
from peftcli.errors import UserError
from peftcli.recipe import DataSection

CHAT = [{"role": "user", "content": "What comes after Monday?"}, {"role": "assistant", "content": "Tuesday"}]
SYSTEM = {"role": "system", "content": "Be brief."}
# Gemma's way of refusing a system turn, and its end-of-turn marker, which the tiny tokenizer does
# not hold as a special token.
NO_SYSTEM_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for m in messages %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>assistant\n{% endif %}"
)
TOOL_CALL_ROW = {
    "messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "weather", "arguments": {}}}]},
        {"role": "tool", "content": "clear"},
        {"role": "assistant", "content": "Clear skies."},
    ]
}


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def examples(path: Path, **data):
    section = DataSection(train=str(path), **data)
    return [e for part in read_examples(section.train, section, "data.train").per_source for e in part]


def validate(cli, tmp_path, model, train, *flags, **data):
    recipe = base_recipe(model, tmp_path / "run", data={"train": str(train), "eval": None, **data})
    return cli("validate", write_recipe(tmp_path / "r.yaml", recipe), *flags)


def no_system_template(tmp_path: Path) -> str:
    path = tmp_path / "gemma_like.jinja"
    path.write_text(NO_SYSTEM_TEMPLATE, encoding="utf-8")
    return str(path)


# --- validate checks every conversation in the chat template ------------------------------------------


def test_validate_stops_at_a_row_the_template_refuses_as_training_would(tmp_path, tiny_model, cli):
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": CHAT}, {"messages": [SYSTEM, *CHAT]}])
    result = validate(cli, tmp_path, tiny_model, path, chat_template=no_system_template(tmp_path))
    assert result.code == 2 and len(result.error_lines) == 1, result.err
    assert "data.train: d.jsonl line 2: the chat template refused this conversation: System role not supported" in (
        result.err
    )
    assert "hint: 1 of the 2 conversations" in result.err and "data.bad_rows: skip" in result.err
    assert "recipe is valid" not in result.err


def test_validate_counts_the_rows_training_would_skip_and_says_the_first(tmp_path, tiny_model, cli, tokenizer):
    rows = [{"messages": CHAT}, {"messages": [SYSTEM, *CHAT]}, {"messages": CHAT}, {"messages": [SYSTEM, *CHAT]}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    template = no_system_template(tmp_path)
    result = validate(cli, tmp_path, tiny_model, path, bad_rows="skip", chat_template=template)
    assert result.code == 0, result.err
    assert (
        "data.train: 2 rows, format messages; 2 bad rows skipped (data.bad_rows: skip), the first: d.jsonl line 2"
        in (result.err)
    )
    assert "System role not supported" in result.err and "4 conversations rendered and masked" in result.err
    # The same count as training, which loads the tokenizer with torch.
    prepared = prepare_data(DataSection(train=str(path), bad_rows="skip", chat_template=template), tokenizer, 0)
    assert prepared.train_stats.skipped == 2 and len(prepared.train) == 2


def test_validate_refuses_a_row_with_nothing_to_learn(tmp_path, tiny_model, cli):
    silent = {"messages": [CHAT[0], {**CHAT[1], "weight": 0}]}
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": CHAT}, silent])
    result = validate(cli, tmp_path, tiny_model, path)
    assert result.code == 2 and "d.jsonl line 2: nothing to learn" in result.err, result.err


def test_validate_counts_tool_calls_the_template_cannot_render(tmp_path, tiny_model, cli):
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": CHAT}, TOOL_CALL_ROW, TOOL_CALL_ROW])
    result = validate(cli, tmp_path, tiny_model, path, bad_rows="skip")
    assert result.code == 0, result.err
    assert "1 rows, format messages; 2 bad rows skipped" in result.err
    assert "the first: d.jsonl line 2: the chat template cannot render tool calls" in result.err


def test_validate_refuses_when_every_row_would_be_skipped(tmp_path, tiny_model, cli):
    path = write_jsonl(tmp_path / "d.jsonl", [TOOL_CALL_ROW])
    result = validate(cli, tmp_path, tiny_model, path, bad_rows="skip")
    assert result.code == 2 and "data.train: every row would be skipped as bad" in result.err, result.err


def test_validate_says_the_template_warnings(tmp_path, tiny_model, cli):
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": CHAT}])
    marker = validate(cli, tmp_path, tiny_model, path, chat_template=no_system_template(tmp_path))
    assert marker.code == 0, marker.err
    assert "the end-of-turn marker <end_of_turn> is not a special token of this tokenizer" in marker.err
    bare = tmp_path / "no-template-model"
    shutil.copytree(tiny_model, bare)
    (bare / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((bare / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (bare / "tokenizer_config.json").write_text(json.dumps(config))
    fallback = validate(cli, tmp_path, bare, path)
    assert fallback.code == 0 and "the tokenizer has no chat template; using chatml" in fallback.err, fallback.err


def test_validate_says_it_cannot_check_the_template_of_a_hub_model_not_cached(tmp_path, tiny_model, cli, monkeypatch):
    import huggingface_hub.constants

    (tmp_path / "hub-cache").mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": CHAT}])
    recipe = base_recipe(tiny_model, tmp_path / "run", data={"train": str(path), "eval": None})
    recipe["model"] = {"name": "someorg/not-downloaded"}
    result = cli("validate", write_recipe(tmp_path / "r.yaml", recipe))
    assert result.code == 0, result.err
    assert (
        "chat template: not checked here: someorg/not-downloaded's tokenizer is not in the local Hugging Face cache"
        in result.err
    )


def test_validate_json_holds_the_warnings_and_the_first_skipped_row(tmp_path, tiny_model, cli):
    rows = [{"messages": CHAT, "id": 1}, {"messages": [CHAT[0], {**CHAT[1], "weight": 0}], "id": 2}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    result = validate(cli, tmp_path, tiny_model, path, "--json", bad_rows="skip")
    assert result.code == 0, result.err
    source = json.loads(result.out)["data"][0]
    assert any("ignored columns: id" in warning for warning in source["warnings"])
    assert source["rows"] == 1 and source["skipped"] == 1
    assert source["first_skipped"] == {
        "row": "d.jsonl line 2",
        "reason": "nothing to learn: every assistant reply is marked not to train (weight 0)",
    }


# --- a .txt file says how it is split ----------------------------------------------------------------


def test_a_stray_blank_line_does_not_turn_documents_into_paragraphs(tmp_path, capsys):
    path = tmp_path / "corpus.txt"
    documents = [f"Document {i} " + "word " * 400 for i in range(30)]
    path.write_text("\n".join(documents[:15]) + "\n\n" + "\n".join(documents[15:]) + "\n", encoding="utf-8")
    assert len(examples(path)) == 30
    said = capsys.readouterr().err
    assert "corpus.txt: read as 30 lines (one example per line; 1 blank-line gap but no paragraphs)" in said
    assert "data.text_split: paragraph" in said


def test_a_text_file_says_it_was_read_as_paragraphs(tmp_path, capsys):
    path = tmp_path / "book.txt"
    path.write_text("First line.\nSame paragraph.\n\nSecond paragraph,\nstill.\n\nThird.\n", encoding="utf-8")
    assert len(examples(path)) == 3
    said = capsys.readouterr().err
    assert "book.txt: read as 3 paragraphs (blank-line separated); data.text_split: line" in said


def test_a_folder_of_text_files_says_how_they_were_split_in_one_line(tmp_path, capsys):
    folder = tmp_path / "docs"
    folder.mkdir()
    for i in range(5):
        (folder / f"doc{i}.txt").write_text(f"Title {i}\nBody {i}.\n\nMore {i},\nand more.\n", encoding="utf-8")
    assert len(examples(folder)) == 10
    said = capsys.readouterr().err
    assert "5 .txt files, 0 read as lines (one example per line), 5 as paragraphs (blank-line separated)" in said
    assert "doc0.txt: read as" not in said


def test_validate_says_how_a_text_file_was_split(tmp_path, tiny_model, cli):
    path = tmp_path / "corpus.txt"
    path.write_text("One document.\nAnother document.\n", encoding="utf-8")
    result = validate(cli, tmp_path, tiny_model, path)
    assert result.code == 0 and "corpus.txt: read as 2 lines (one example per line)" in result.err, result.err


# --- labels, weights, media and preference columns, however they are spelt ---------------------------


@pytest.mark.parametrize(
    ("suffix", "content", "column"),
    [
        (".csv", "instruction,output,label\nhi,hello,true\nbye,rude answer,false\n", "label"),
        (".csv", "instruction,output,label\nhi,hello,1\nbye,rude answer,0\n", "label"),
        (".jsonl", json.dumps({"messages": CHAT, "label": 0}) + "\n", "label"),
        (".jsonl", json.dumps({"prompt": "hi", "completion": "bad", "label": "FALSE"}) + "\n", "label"),
        (
            ".jsonl",
            json.dumps({"conversations": [{"from": "human", "value": "a"}], "kto_tag": "true"}) + "\n",
            "kto_tag",
        ),
    ],
)
def test_a_kto_label_is_refused_whatever_its_spelling(tmp_path, suffix, content, column):
    path = tmp_path / f"d{suffix}"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(UserError, match=f"the '{column}' column makes this a KTO file"):
        examples(path)


def test_a_numeric_label_is_a_kto_flag_in_a_conversation_not_in_a_text_corpus(tmp_path, capsys):
    with pytest.raises(UserError, match="the 'label' column makes this a KTO file"):
        examples(write_jsonl(tmp_path / "chat.jsonl", [{"messages": CHAT, "label": 1}]))
    corpus = write_jsonl(tmp_path / "d.jsonl", [{"text": "Monday, Tuesday.", "label": 0}])
    assert examples(corpus)
    assert "ignored columns: label" in capsys.readouterr().err


def test_a_row_weight_written_as_text_is_refused_like_a_number(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("instruction,output,weight\nhi,hello,0.5\n", encoding="utf-8")
    with pytest.raises(UserError, match="the 'weight' column makes this a file with a weight per row"):
        examples(path)


@pytest.mark.parametrize(
    ("row", "says"),
    [
        ({"image": "coco/1.jpg", "conversations": [{"from": "human", "value": "<image>\nWhat?"}]}, "'image' column"),
        ({"messages": CHAT, "rejected_response": "Friday"}, "'rejected_response' column makes this a preference"),
    ],
)
def test_llava_images_and_swift_rejected_responses_are_refused(tmp_path, row, says):
    with pytest.raises(UserError, match=says):
        examples(write_jsonl(tmp_path / "d.jsonl", [row]))


def test_an_image_placeholder_is_a_bad_row(tmp_path):
    row = {"messages": [{"role": "user", "content": "<image>What is this?"}, CHAT[1]]}
    with pytest.raises(UserError, match="d.jsonl line 1: turn 1: an <image> placeholder"):
        examples(write_jsonl(tmp_path / "d.jsonl", [row]))


def test_an_empty_images_cell_of_a_csv_is_no_multimodal_file(tmp_path, capsys):
    path = tmp_path / "d.csv"
    path.write_text("instruction,output,images\nhi,hello,[]\n", encoding="utf-8")
    assert len(examples(path)) == 1
    assert "ignored columns: images" in capsys.readouterr().err


# --- the system column ---------------------------------------------------------------------------------


def test_a_system_column_that_contradicts_the_system_turn_is_a_bad_row_naming_both(tmp_path):
    row = {"messages": [{"role": "system", "content": "IN TURN"}, *CHAT], "system": "IN COLUMN"}
    with pytest.raises(UserError, match=r"'system' column \('IN COLUMN'\) differs from .* system turn \('IN TURN'\)"):
        examples(write_jsonl(tmp_path / "d.jsonl", [row]))
    same = {"messages": [SYSTEM, *CHAT], "system": "Be brief."}
    assert [t.role for t in examples(write_jsonl(tmp_path / "s.jsonl", [same]))[0].turns] == [
        "system",
        "user",
        "assistant",
    ]


def test_a_system_column_with_prompt_completion_is_honoured_or_refused(tmp_path, capsys):
    turns = {"prompt": [CHAT[0]], "completion": [CHAT[1]], "system": "Be brief."}
    example = examples(write_jsonl(tmp_path / "c.jsonl", [turns]))[0]
    assert [(t.role, t.content) for t in example.turns][0] == ("system", "Be brief.")
    assert "ignored columns" not in capsys.readouterr().err
    plain = {"prompt": "Q: hi", "completion": " A: hello", "system": "You are terse."}
    with pytest.raises(UserError, match="p.jsonl line 1: field 'system': a plain-text prompt/completion row"):
        examples(write_jsonl(tmp_path / "p.jsonl", [plain]))
