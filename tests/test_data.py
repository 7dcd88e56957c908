"""Data stage: sources, format detection, loss masks decoded back to text, bad rows, lengths."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from peftcli.data import IGNORE, prepare_data
from peftcli.errors import UserError
from peftcli.recipe import DataSection

CONVERSATION = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What comes after Monday?"},
        {"role": "assistant", "content": "Tuesday"},
        {"role": "user", "content": "And after Tuesday?"},
        {"role": "assistant", "content": "Wednesday"},
    ]
}
ALPACA = {"instruction": "Add two and three.", "input": "", "output": "five"}
PROMPT_COMPLETION = {"prompt": "Monday is followed by", "completion": " Tuesday"}
TEXT = {"text": "January comes before February."}


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def prepare(tokenizer, train, **data):
    section = DataSection(train=str(train), max_length=data.pop("max_length", 128), **data)
    return prepare_data(section, tokenizer, seed=0)


def trained_text(tokenizer, item) -> str:
    return tokenizer.decode([t for t, label in zip(item.input_ids, item.labels) if label != IGNORE])


def trained_pieces(tokenizer, item) -> list[str]:
    """Decoded runs of consecutive trained tokens (one per trained span)."""
    pieces, current = [], []
    for token, label in zip(item.input_ids, item.labels):
        if label != IGNORE:
            current.append(token)
        elif current:
            pieces.append(tokenizer.decode(current))
            current = []
    if current:
        pieces.append(tokenizer.decode(current))
    return pieces


@pytest.mark.parametrize(
    "row, expected",
    [
        (CONVERSATION, "messages"),
        (ALPACA, "alpaca"),
        (PROMPT_COMPLETION, "prompt_completion"),
        (TEXT, "text"),
    ],
)
def test_format_is_detected_from_columns(tmp_path, tokenizer, row, expected):
    prepared = prepare(tokenizer, write_jsonl(tmp_path / "d.jsonl", [row] * 3))
    assert prepared.train_stats.formats == {expected: 3}


def test_undetectable_format_lists_the_columns(tmp_path, tokenizer):
    with pytest.raises(UserError) as info:
        prepare(tokenizer, write_jsonl(tmp_path / "d.jsonl", [{"question": "q", "answer": "a"}]))
    assert "['answer', 'question']" in info.value.message
    assert "data.columns" in info.value.hint


def test_columns_map_onto_a_format(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "Add one and one.", "answer": "two"}])
    prepared = prepare(tokenizer, path, columns={"instruction": "question", "output": "answer"})
    assert trained_text(tokenizer, prepared.train[0]) == "two<|im_end|>"


@pytest.mark.parametrize(
    "template, end", [("chatml", "<|im_end|>"), ("llama3", "<|eot_id|>"), ("mistral", "<|im_end|>")]
)
def test_multi_turn_mask_is_exactly_the_assistant_replies(tmp_path, tokenizer, template, end):
    prepared = prepare(tokenizer, write_jsonl(tmp_path / "d.jsonl", [CONVERSATION]), chat_template=template)
    item = prepared.train[0]
    assert [p.strip() for p in trained_pieces(tokenizer, item)] == [f"Tuesday{end}", f"Wednesday{end}"]
    # The prompt side (system, user turns, role headers) carries no loss.
    assert item.labels[0] == IGNORE


def test_last_turn_and_all(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [CONVERSATION])
    last = prepare(tokenizer, path, train_on="last_turn").train[0]
    assert trained_pieces(tokenizer, last) == ["Wednesday<|im_end|>"]
    everything = prepare(tokenizer, path, train_on="all").train[0]
    assert all(label != IGNORE for label in everything.labels)


def test_prompt_completion_masks_the_prompt_and_appends_eos(tmp_path, tokenizer):
    item = prepare(tokenizer, write_jsonl(tmp_path / "d.jsonl", [PROMPT_COMPLETION])).train[0]
    assert trained_text(tokenizer, item).strip() == "Tuesday<|im_end|>"
    assert tokenizer.decode(item.input_ids).startswith("Monday is followed by")


def test_text_trains_on_everything(tmp_path, tokenizer):
    item = prepare(tokenizer, write_jsonl(tmp_path / "d.jsonl", [TEXT])).train[0]
    assert trained_text(tokenizer, item) == "January comes before February.<|im_end|>"


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
def test_every_local_file_type_loads(tmp_path, tokenizer, suffix):
    rows = [{"instruction": f"Add {i} and one.", "input": "", "output": str(i + 1)} for i in range(4)]
    path = tmp_path / f"d{suffix}"
    if suffix == ".jsonl":
        write_jsonl(path, rows)
    elif suffix == ".json":
        path.write_text(json.dumps(rows), encoding="utf-8")
    elif suffix == ".csv":
        import csv

        with path.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    prepared = prepare(tokenizer, path)
    assert prepared.train_stats.rows == 4
    assert trained_text(tokenizer, prepared.train[2]) == "3<|im_end|>"


@pytest.mark.parametrize(
    "row, reason",
    [
        ({"instruction": "x"}, "missing field 'output'"),
        ({"instruction": "x", "output": 5}, "should be text"),
        ({"instruction": "x", "output": "  "}, "field 'output' is empty"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "unknown role 'robot'"),
    ],
)
def test_bad_row_is_an_error_with_file_and_line(tmp_path, tokenizer, row, reason):
    good = ALPACA if "instruction" in row else CONVERSATION
    path = write_jsonl(tmp_path / "d.jsonl", [good, good, row])
    with pytest.raises(UserError) as info:
        prepare(tokenizer, path)
    assert "d.jsonl line 3" in info.value.message and reason in info.value.message


def test_bad_rows_skip_counts_them(tmp_path, tokenizer):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(ALPACA) + "\n{broken json\n" + json.dumps({"instruction": "x"}) + "\n", encoding="utf-8")
    prepared = prepare(tokenizer, path, bad_rows="skip")
    stats = prepared.train_stats
    assert stats.rows == 1 and stats.skipped == 2
    assert any("invalid JSON" in reason for reason in stats.skipped_reasons)
    assert ["d.jsonl line 3"] in stats.skipped_reasons.values()


def test_overlong_examples(tmp_path, tokenizer):
    long_row = {"instruction": "Add " + "one and " * 40 + "one.", "output": "many"}
    path = write_jsonl(tmp_path / "d.jsonl", [ALPACA, long_row])
    with pytest.raises(UserError) as info:
        prepare(tokenizer, path, max_length=32, overlong="error")
    assert "d.jsonl line 2" in info.value.message and "max_length 32" in info.value.message
    dropped = prepare(tokenizer, path, max_length=32, overlong="drop").train_stats
    assert (dropped.rows, dropped.dropped) == (1, 1)
    # Truncating keeps the prompt's start, so the answer falls off and nothing is left to learn.
    truncated = prepare(tokenizer, path, max_length=32, overlong="truncate").train_stats
    assert (truncated.rows, truncated.dropped) == (1, 1)


def test_eval_split_is_seeded_and_disjoint(tmp_path, tokenizer):
    rows = [{"instruction": f"Add {i} and one.", "output": str(i + 1)} for i in range(40)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    first = prepare(tokenizer, path, eval_split=0.25)
    second = prepare(tokenizer, path, eval_split=0.25)
    assert len(first.eval) == 10 and len(first.train) == 30
    assert [e.origin for e in first.eval] == [e.origin for e in second.eval]
    assert not {e.origin for e in first.eval} & {e.origin for e in first.train}


def test_missing_and_empty_files(tmp_path, tokenizer):
    with pytest.raises(UserError, match="not found"):
        prepare(tokenizer, tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("", encoding="utf-8")
    with pytest.raises(UserError, match="is empty"):
        prepare(tokenizer, tmp_path / "empty.jsonl")
