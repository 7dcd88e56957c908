"""Every format from every kind of source, column mapping, and source mixing."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import pytest

from peftcli.data import IGNORE, prepare_data
from peftcli.recipe import DataSection

FORMAT_ROWS = {
    "messages": [
        {"messages": [{"role": "user", "content": f"After {d}?"}, {"role": "assistant", "content": n}]}
        for d, n in (("Monday", "Tuesday"), ("Tuesday", "Wednesday"), ("Friday", "Saturday"))
    ],
    "sharegpt": [
        {"conversations": [{"from": "human", "value": f"After {d}?"}, {"from": "gpt", "value": n}]}
        for d, n in (("Monday", "Tuesday"), ("Tuesday", "Wednesday"), ("Friday", "Saturday"))
    ],
    "alpaca": [
        {"instruction": f"After {d}?", "input": "", "output": n}
        for d, n in (("Monday", "Tuesday"), ("Tuesday", "Wednesday"), ("Friday", "Saturday"))
    ],
    "prompt_completion": [
        {"prompt": f"After {d} comes", "completion": f" {n}"}
        for d, n in (("Monday", "Tuesday"), ("Tuesday", "Wednesday"), ("Friday", "Saturday"))
    ],
    "text": [
        {"text": f"After {d} comes {n}."}
        for d, n in (("Monday", "Tuesday"), ("Tuesday", "Wednesday"), ("Friday", "Saturday"))
    ],
}
FIRST_TRAINED = {
    "messages": "Tuesday<|im_end|>",
    "sharegpt": "Tuesday<|im_end|>",
    "alpaca": "Tuesday<|im_end|>",
    "prompt_completion": "Tuesday<|im_end|>",
    "text": "After Monday comes Tuesday.<|im_end|>",
}


def _write(kind: str, rows: list[dict], folder: Path) -> str:
    """Write rows as one source of `kind`; returns the value for data.train."""
    folder.mkdir(parents=True, exist_ok=True)
    if kind == "jsonl":
        path = folder / "d.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    elif kind == "json":
        path = folder / "d.json"
        path.write_text(json.dumps(rows), encoding="utf-8")
    elif kind == "csv":
        path = folder / "d.csv"
        with path.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            # Nested fields (turn lists) are stored as JSON text, as CSV exports do.
            writer.writerows({k: json.dumps(v) if isinstance(v, list) else v for k, v in r.items()} for r in rows)
    elif kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = folder / "d.parquet"
        pq.write_table(pa.Table.from_pylist(rows), path)
    elif kind in ("dir", "glob"):
        (folder / "parts").mkdir()
        for i, chunk in enumerate((rows[:2], rows[2:])):
            (folder / "parts" / f"part{i}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chunk))
        return str(folder / "parts") if kind == "dir" else str(folder / "parts" / "part*.jsonl")
    elif kind == "saved":
        import datasets

        path = folder / "saved"
        datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(path))
    return str(path)


def _trained(tokenizer, item) -> str:
    return tokenizer.decode([t for t, label in zip(item.input_ids, item.labels) if label != IGNORE]).strip()


@pytest.mark.parametrize("kind", ["jsonl", "json", "csv", "parquet", "dir", "glob", "saved"])
@pytest.mark.parametrize("fmt", list(FORMAT_ROWS))
def test_format_from_source_kind(tmp_path, tokenizer, fmt, kind):
    train = _write(kind, FORMAT_ROWS[fmt], tmp_path)
    prepared = prepare_data(DataSection(train=train), tokenizer, seed=0)
    assert prepared.train_stats.formats == {fmt: 3}
    assert prepared.train_stats.rows == 3
    assert _trained(tokenizer, prepared.train[0]) == FIRST_TRAINED[fmt]


def test_hub_style_source_keys_with_a_saved_dataset(tmp_path, tokenizer):
    """A dataset saved with `save_to_disk` stands in for a hub id: split picks the split."""
    import datasets

    path = tmp_path / "hub"
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list(FORMAT_ROWS["alpaca"]),
            "test": datasets.Dataset.from_list(FORMAT_ROWS["alpaca"][:1]),
        }
    ).save_to_disk(str(path))
    prepared = prepare_data(DataSection(train={"path": str(path), "split": "test"}), tokenizer, seed=0)
    assert prepared.train_stats.rows == 1
    from peftcli.errors import UserError

    with pytest.raises(UserError, match="no split 'validation'"):
        prepare_data(DataSection(train={"path": str(path), "split": "validation"}), tokenizer, seed=0)


def test_unreachable_hub_id_is_a_clear_error(tokenizer):
    from peftcli.errors import UserError

    with pytest.raises(UserError) as info:
        prepare_data(DataSection(train="some-org/some-dataset"), tokenizer, seed=0)
    assert "some-org/some-dataset" in info.value.message and "not a local file" in info.value.message


def test_sources_may_mix_formats_and_map_columns(tmp_path, tokenizer):
    (tmp_path / "qa.jsonl").write_text(json.dumps({"question": "After Monday?", "answer": "Tuesday"}) + "\n")
    (tmp_path / "chat.jsonl").write_text(json.dumps(FORMAT_ROWS["sharegpt"][1]) + "\n")
    section = DataSection(
        train=[
            {"path": str(tmp_path / "qa.jsonl"), "columns": {"instruction": "question", "output": "answer"}},
            {"path": str(tmp_path / "chat.jsonl"), "format": "sharegpt"},
        ]
    )
    prepared = prepare_data(section, tokenizer, seed=0)
    assert prepared.train_stats.formats == {"alpaca": 1, "sharegpt": 1}
    assert sorted(_trained(tokenizer, i) for i in prepared.train) == ["Tuesday<|im_end|>", "Wednesday<|im_end|>"]


def test_mixing_weights_are_honoured(tmp_path, tokenizer):
    for name, count in (("a", 100), ("b", 100)):
        rows = [{"prompt": f"{name} {i}", "completion": " x"} for i in range(count)]
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    section = DataSection(
        train=[{"path": str(tmp_path / "a.jsonl"), "weight": 3}, {"path": str(tmp_path / "b.jsonl"), "weight": 1}]
    )
    prepared = prepare_data(section, tokenizer, seed=0)
    counts = Counter(item.origin.split(" ")[0] for item in prepared.train)
    assert abs(counts["a.jsonl"] - 150) <= 2 and abs(counts["b.jsonl"] - 50) <= 2
    # source a had to repeat rows to reach its share; source b was sampled without repetition
    assert len({i.origin for i in prepared.train if i.origin.startswith("b.jsonl")}) == counts["b.jsonl"]


def test_eval_split_never_sees_a_repeated_training_row(tmp_path, tokenizer):
    """Weighted mixing repeats rows of a small source; the eval split is taken before that."""
    small = [{"prompt": f"small {i}", "completion": " x"} for i in range(3)]
    big = [{"prompt": f"big {i}", "completion": " y"} for i in range(37)]
    (tmp_path / "small.jsonl").write_text("".join(json.dumps(r) + "\n" for r in small))
    (tmp_path / "big.jsonl").write_text("".join(json.dumps(r) + "\n" for r in big))
    section = DataSection(
        train=[
            {"path": str(tmp_path / "small.jsonl"), "weight": 1},
            {"path": str(tmp_path / "big.jsonl"), "weight": 1},
        ],
        eval_split=0.3,
    )
    prepared = prepare_data(section, tokenizer, seed=0)
    trained = {item.origin for item in prepared.train}
    evaluated = {item.origin for item in prepared.eval}
    assert evaluated and not trained & evaluated
    assert len(prepared.train) > len(trained)  # the small source was repeated in the mix


def test_a_source_whose_rows_are_all_bad_is_a_user_error(tmp_path, tokenizer):
    from peftcli.errors import UserError

    (tmp_path / "good.jsonl").write_text(json.dumps({"prompt": "a", "completion": " b"}) + "\n")
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a", "completion": 5}\n{"prompt": "b", "completion": ""}\n')
    section = DataSection(
        train=[{"path": str(tmp_path / "good.jsonl"), "weight": 1}, {"path": str(tmp_path / "bad.jsonl"), "weight": 3}],
        bad_rows="skip",
    )
    with pytest.raises(UserError, match=r"data.train\[1\]: every row of .*bad.jsonl was skipped"):
        prepare_data(section, tokenizer, seed=0)
