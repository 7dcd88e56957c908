"""Data fidelity: every column of a source is read, mapped, or named in a warning; columns whose
meaning would change what is trained are refused; per-message weights, alpaca history, system
columns and tool calls are honoured; byte-order marks and one-document-per-line text files are
read as meant; and `validate` reads the data (without torch)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import base_recipe, trained_pieces, write_recipe

from peftcli.data import prepare_data
from peftcli.data.formats import to_example, turn_keys
from peftcli.data.pipeline import read_examples
from peftcli.errors import UserError
from peftcli.recipe import DataSection

CHAT = [{"role": "user", "content": "What comes after Monday?"}, {"role": "assistant", "content": "Tuesday"}]


def write_jsonl(path: Path, rows: list, bom: bool = False) -> Path:
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    path.write_text(("\ufeff" if bom else "") + text, encoding="utf-8")
    return path


def examples(path: Path, **data):
    section = DataSection(train=str(path), **data)
    return [e for part in read_examples(section.train, section, "data.train").per_source for e in part]


def validate(cli, tmp_path, tiny_model, train, **data):
    recipe = base_recipe(tiny_model, tmp_path / "run", data={"train": str(train), "eval": None, **data})
    return cli("validate", write_recipe(tmp_path / "r.yaml", recipe))


# --- nothing silent: read, mapped, warned or refused ----------------------------------------------


def test_columns_the_format_does_not_read_are_named_once(tmp_path, capsys):
    rows = [{"messages": CHAT, "id": i, "source": "web"} for i in range(3)]
    assert len(examples(write_jsonl(tmp_path / "d.jsonl", rows))) == 3
    err = capsys.readouterr().err
    assert err.count("ignored columns: id, source") == 1


def test_a_mapped_column_is_not_reported_as_ignored(tmp_path, capsys):
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "Add one and one.", "answer": "two"}])
    assert examples(path, columns={"instruction": "question", "output": "answer"})
    assert "ignored" not in capsys.readouterr().err


@pytest.mark.parametrize(
    ("column", "value", "says"),
    [
        ("chosen", "Tuesday", "preference (DPO/ORPO) file"),
        ("rejected", "Friday", "preference (DPO/ORPO) file"),
        ("label", False, "KTO file"),
        ("kto_tag", True, "KTO file"),
        ("images", ["photo.jpg"], "multimodal file"),
        ("audios", ["a.wav"], "multimodal file"),
        ("weight", 0.5, "weight per row"),
    ],
)
def test_columns_that_change_what_is_trained_are_refused(tmp_path, tiny_model, cli, column, value, says):
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": CHAT, column: value}])
    result = validate(cli, tmp_path, tiny_model, path)
    assert result.code == 2 and len(result.error_lines) == 1, result.err
    assert f"'{column}' column" in result.err and says in result.err and str(path) in result.err


def test_a_label_that_is_not_a_kto_flag_is_only_ignored(tmp_path, capsys):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "Monday, Tuesday.", "label": "calendar"}])
    assert examples(path)
    assert "ignored columns: label" in capsys.readouterr().err


# --- honoured: weights, history, system, tools ------------------------------------------------------


def test_a_reply_with_weight_zero_is_context_not_target(tmp_path, tokenizer):
    messages = [
        {"role": "system", "content": "Be sarcastic."},
        {"role": "user", "content": "Biggest city in France?"},
        {"role": "assistant", "content": "Paris", "weight": 0},
        {"role": "user", "content": "More sarcastic?"},
        {"role": "assistant", "content": "Paris, obviously.", "weight": 1},
    ]
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": messages}])
    turns = examples(path)[0].turns
    assert [(t.content, t.trained) for t in turns if t.role == "assistant"] == [
        ("Paris", False),
        ("Paris, obviously.", True),
    ]
    prepared = prepare_data(DataSection(train=str(path)), tokenizer, seed=0)
    assert trained_pieces(tokenizer, prepared.train[0]) == ["Paris, obviously.<|im_end|>"]


@pytest.mark.parametrize("weight", [0.5, "0", True, 2])
def test_a_weight_other_than_0_or_1_is_a_bad_row(tmp_path, weight):
    row = {"messages": [CHAT[0], {**CHAT[1], "weight": weight}]}
    with pytest.raises(UserError, match="'weight' must be 0 or 1") as info:
        examples(write_jsonl(tmp_path / "d.jsonl", [row]))
    assert "d.jsonl line 1" in info.value.message


def test_alpaca_history_becomes_earlier_rounds(tmp_path):
    row = {
        "query": "And after that?",
        "response": "Thursday",
        "history": [["After Monday?", "Tuesday"], ["Then?", "Wednesday"]],
    }
    path = write_jsonl(tmp_path / "d.jsonl", [row])
    turns = examples(path, columns={"instruction": "query", "output": "response"})[0].turns
    assert [(t.role, t.content) for t in turns] == [
        ("user", "After Monday?"),
        ("assistant", "Tuesday"),
        ("user", "Then?"),
        ("assistant", "Wednesday"),
        ("user", "And after that?"),
        ("assistant", "Thursday"),
    ]


def test_a_system_column_opens_a_messages_conversation(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": CHAT, "system": "Be brief."}])
    turns = examples(path)[0].turns
    assert (turns[0].role, turns[0].content) == ("system", "Be brief.")


def test_openai_tool_calling_is_read(tmp_path):
    tools = [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Paris"}'}}
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": '{"sky": "clear"}'},
        {"role": "assistant", "content": "Clear skies."},
    ]
    example = examples(write_jsonl(tmp_path / "d.jsonl", [{"messages": messages, "tools": tools}]))[0]
    assert example.tools == tuple(tools)
    call = example.turns[1]
    assert (
        call.role == "assistant"
        and call.content == ""
        and call.tool_calls[0]["function"]
        == {
            "name": "weather",
            "arguments": {"city": "Paris"},
        }
    )
    assert (example.turns[2].role, example.turns[2].tool_call_id) == ("tool", "c1")


def test_sharegpt_function_call_and_observation_turns_are_read(tmp_path):
    conversations = [
        {"from": "human", "value": "Find a recipe with rice."},
        {"from": "function_call", "value": '{"name": "search", "arguments": {"q": "rice"}}'},
        {"from": "observation", "value": '{"found": ["risotto"]}'},
        {"from": "gpt", "value": "Try a risotto."},
    ]
    tools = json.dumps([{"name": "search", "description": "Search recipes", "parameters": {}}])
    example = examples(write_jsonl(tmp_path / "d.jsonl", [{"conversations": conversations, "tools": tools}]))[0]
    assert [t.role for t in example.turns] == ["user", "assistant", "tool", "assistant"]
    assert example.turns[1].tool_calls[0]["function"] == {"name": "search", "arguments": {"q": "rice"}}
    assert example.tools == ({"type": "function", "function": json.loads(tools)[0]},)


def test_a_tool_output_without_a_call_is_a_bad_row_saying_so(tmp_path):
    row = {"messages": [CHAT[0], {"role": "tool", "content": "42"}, CHAT[1]]}
    with pytest.raises(UserError, match="a tool's output with no function call before it"):
        examples(write_jsonl(tmp_path / "d.jsonl", [row]))


def test_turn_keys_and_role_names_are_mapped(tmp_path):
    row = {"messages": [{"role": "human", "text": "Hi"}, {"role": "bot", "text": "Hello"}]}
    path = write_jsonl(tmp_path / "d.jsonl", [row])
    turns = examples(
        path,
        format="sharegpt",
        columns={"conversations": "messages", "from": "role", "value": "text"},
        roles={"bot": "assistant"},
    )[0].turns
    assert [(t.role, t.content) for t in turns] == [("user", "Hi"), ("assistant", "Hello")]
    keys = turn_keys("messages", {}, {})
    assert to_example("messages", {"messages": CHAT}, "x", keys).turns[1].content == "Tuesday"


# --- files as users have them -----------------------------------------------------------------------


def test_a_byte_order_mark_breaks_nothing(tmp_path):
    jsonl = write_jsonl(tmp_path / "d.jsonl", [{"messages": CHAT}], bom=True)
    assert len(examples(jsonl)) == 1
    csv = tmp_path / "d.csv"
    csv.write_text("\ufeffinstruction,output,system\nAdd one and one.,two,Be brief.\n", encoding="utf-8")
    turns = examples(csv)[0].turns
    assert [t.role for t in turns] == ["system", "user", "assistant"]
    json_file = tmp_path / "d.json"
    json_file.write_text("\ufeff" + json.dumps([{"text": "Monday."}]), encoding="utf-8")
    assert examples(json_file)[0].completion == "Monday."


def test_a_text_file_of_one_document_per_line_is_one_example_per_line(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("".join(f"Document number {i} is here.\n" for i in range(50)), encoding="utf-8")
    found = examples(path)
    assert len(found) == 50 and found[7].completion == "Document number 7 is here."
    paragraphs = tmp_path / "book.txt"
    paragraphs.write_text("One line.\nSame paragraph.\n\nSecond paragraph.\n", encoding="utf-8")
    assert [e.completion for e in examples(paragraphs)] == ["One line.\nSame paragraph.", "Second paragraph."]
    assert len(examples(paragraphs, text_split="line")) == 3
    assert len(examples(path, text_split="paragraph")) == 1


# --- validate reads the data ------------------------------------------------------------------------


def test_validate_reports_a_missing_data_file(tmp_path, tiny_model, cli):
    result = validate(cli, tmp_path, tiny_model, tmp_path / "nowhere.jsonl")
    assert result.code == 2 and "data file not found" in result.err and "nowhere.jsonl" in result.err


def test_validate_reports_an_undetectable_format_and_the_first_bad_row(tmp_path, tiny_model, cli):
    odd = write_jsonl(tmp_path / "odd.jsonl", [{"question": "q", "answer": "a"}])
    result = validate(cli, tmp_path, tiny_model, odd)
    assert result.code == 2 and "cannot detect the data format" in result.err
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"messages": CHAT}, {"messages": [CHAT[0]]}])
    result = validate(cli, tmp_path, tiny_model, bad)
    assert result.code == 2 and "bad.jsonl line 2" in result.err and "no assistant turn" in result.err


def test_validate_counts_rows_and_shows_ignored_columns(tmp_path, tiny_model, cli):
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": CHAT, "id": i} for i in range(5)])
    result = validate(cli, tmp_path, tiny_model, path)
    assert result.code == 0, result.err
    assert "data.train: 5 rows, format messages" in result.err
    assert "ignored columns: id" in result.err


def test_typed_content_parts_and_loss_weight_are_read(tmp_path):
    """LLaMA-Factory's v1 format: content as typed parts (text, reasoning, tool_call), loss_weight."""
    messages = [
        {"role": "user", "content": [{"type": "text", "value": "Weather in Paris?"}], "loss_weight": 0.0},
        {
            "role": "assistant",
            "content": [
                {"type": "reasoning", "value": "I should call the tool."},
                {"type": "tool_call", "value": '{"name": "weather", "arguments": {"city": "Paris"}}'},
            ],
            "loss_weight": 1.0,
        },
        {"role": "tool", "content": [{"type": "text", "text": "clear"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Clear skies."}], "loss_weight": 0.0},
    ]
    turns = examples(write_jsonl(tmp_path / "d.jsonl", [{"messages": messages}]))[0].turns
    assert turns[0].content == "Weather in Paris?"
    assert turns[1].content == "<think>\nI should call the tool.\n</think>\n\n"
    assert turns[1].tool_calls[0]["function"]["name"] == "weather" and turns[1].trained
    assert (turns[3].content, turns[3].trained) == ("Clear skies.", False)


def test_an_image_part_is_refused_naming_the_turn(tmp_path):
    row = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x.png"}}]}, CHAT[1]]}
    with pytest.raises(UserError, match="turn 1: a 'image_url' part: peftcli trains text-only models"):
        examples(write_jsonl(tmp_path / "d.jsonl", [row]))


def test_query_response_and_dolly_columns_read_as_alpaca(tmp_path, capsys):
    swift = write_jsonl(tmp_path / "s.jsonl", [{"query": "After Monday?", "response": "Tuesday", "system": "Brief."}])
    turns = examples(swift)[0].turns
    assert [(t.role, t.content) for t in turns] == [
        ("system", "Brief."),
        ("user", "After Monday?"),
        ("assistant", "Tuesday"),
    ]
    dolly = write_jsonl(
        tmp_path / "d.jsonl", [{"instruction": "Sum?", "context": "2 and 3", "response": "5", "category": "qa"}]
    )
    turns = examples(dolly)[0].turns
    assert turns[0].content == "Sum?\n\n2 and 3" and turns[1].content == "5"
    err = capsys.readouterr().err
    assert "read as alpaca: query -> instruction, response -> output" in err
    assert "ignored columns: category" in err
