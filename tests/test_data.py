"""Data stage basics: undetectable formats, column mapping, train_on, lengths, eval split, files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import trained_pieces

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


def test_undetectable_format_lists_the_columns(tmp_path, tokenizer):
    with pytest.raises(UserError) as info:
        prepare(tokenizer, write_jsonl(tmp_path / "d.jsonl", [{"question": "q", "answer": "a"}]))
    assert "['answer', 'question']" in info.value.message
    assert "data.columns" in info.value.hint


def test_columns_map_onto_a_format(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "Add one and one.", "answer": "two"}])
    prepared = prepare(tokenizer, path, columns={"instruction": "question", "output": "answer"})
    assert trained_text(tokenizer, prepared.train[0]) == "two<|im_end|>"


def test_last_turn_and_all(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [CONVERSATION])
    last = prepare(tokenizer, path, train_on="last_turn").train[0]
    assert trained_pieces(tokenizer, last) == ["Wednesday<|im_end|>"]
    everything = prepare(tokenizer, path, train_on="all").train[0]
    assert all(label != IGNORE for label in everything.labels)


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
    # A long answer after a short prompt is cut at max_length and still trains on what is left.
    long_answer = {"instruction": "Count.", "output": "one and " * 40 + "one"}
    path = write_jsonl(tmp_path / "e.jsonl", [ALPACA, long_answer])
    prepared = prepare(tokenizer, path, max_length=32, overlong="truncate")
    assert (prepared.train_stats.rows, prepared.train_stats.truncated, prepared.train_stats.dropped) == (2, 1, 0)
    cut = max(prepared.train, key=lambda item: len(item.input_ids))
    assert len(cut.input_ids) == 32 and trained_text(tokenizer, cut).startswith("one and one")


def test_eval_split_is_seeded_and_disjoint(tmp_path, tokenizer):
    rows = [{"instruction": f"Add {i} and one.", "output": str(i + 1)} for i in range(40)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    first = prepare(tokenizer, path, eval_split=0.25)
    second = prepare(tokenizer, path, eval_split=0.25)
    assert len(first.eval) == 10 and len(first.train) == 30
    assert [e.origin for e in first.eval] == [e.origin for e in second.eval]
    assert not {e.origin for e in first.eval} & {e.origin for e in first.train}
    other_seed = prepare_data(DataSection(train=str(path), max_length=128, eval_split=0.25), tokenizer, seed=1)
    assert {e.origin for e in other_seed.eval} != {e.origin for e in first.eval}


def test_missing_and_empty_files(tmp_path, tokenizer):
    with pytest.raises(UserError, match="not found"):
        prepare(tokenizer, tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("", encoding="utf-8")
    with pytest.raises(UserError, match="is empty"):
        prepare(tokenizer, tmp_path / "empty.jsonl")
