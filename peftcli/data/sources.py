"""Reading raw rows from a data source: local files (jsonl, json, csv, parquet, txt), a directory or glob
of them, a dataset saved with `datasets.save_to_disk`, or a hub dataset id.

Local files are parsed here rather than through `datasets` so that every bad row can be reported
with its file and line, instead of an Arrow traceback. A row is returned with its origin; rows that
cannot even be parsed (a broken JSON line) come back as `BadRow`s and the caller decides whether
that stops the run (`data.bad_rows: error`) or is counted and skipped.
"""

from __future__ import annotations

import csv
import glob
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peftcli.errors import PATH_RULE, UserError
from peftcli.recipe import DataSource

SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".txt")


@dataclass(frozen=True)
class Row:
    values: dict[str, Any]
    origin: str  # "train.jsonl line 12": where a user finds this row


@dataclass(frozen=True)
class BadRow:
    origin: str
    reason: str


def read_source(source: DataSource, key: str) -> list[Row | BadRow]:
    """All rows of one source. `key` (e.g. "data.train") names the recipe key in errors."""
    path = source.path
    if any(ch in path for ch in "*?["):
        files = sorted(p for p in glob.glob(path, recursive=True) if p.endswith(SUFFIXES))
        if not files:
            raise UserError(f"{key}: the pattern {path} matches no {'/'.join(SUFFIXES)} file")
        return [row for file in files for row in _read_file(Path(file), key)]
    local = Path(path)
    if not local.is_absolute():  # recipes make local paths absolute: a relative one is a hub id
        return _read_hub(source, key)
    if local.is_dir():
        if (local / "dataset_dict.json").exists() or (local / "state.json").exists():
            return _read_saved_dataset(local, source, key)
        files = sorted(p for p in local.rglob("*") if p.is_file() and p.suffix in SUFFIXES)
        if not files:
            raise UserError(
                f"{key}: {local} is a directory with no .jsonl/.json/.csv/.parquet file",
                hint="point data.train at a file, a glob, or a folder of data files",
            )
        return [row for file in files for row in _read_file(file, key)]
    if local.is_file():
        return _read_file(local, key)
    raise UserError(f"{key}: data file not found: {path}", hint=PATH_RULE)


def _read_file(path: Path, key: str) -> list[Row | BadRow]:
    if path.suffix not in SUFFIXES:
        raise UserError(f"{key}: {path.name}: unsupported file type '{path.suffix}'", hint=f"use one of {SUFFIXES}")
    if path.stat().st_size == 0:
        raise UserError(f"{key}: {path} is empty")
    readers = {
        ".jsonl": _read_jsonl,
        ".json": _read_json,
        ".csv": _read_csv,
        ".parquet": _read_parquet,
        ".txt": _read_text,
    }
    reader = readers[path.suffix]
    try:
        return reader(path)
    except UnicodeDecodeError as exc:
        raise UserError(f"{key}: {path}: not UTF-8 text (byte {exc.start})") from None
    except PermissionError:
        raise UserError(f"{key}: {path}: permission denied") from None


def _read_jsonl(path: Path) -> list[Row | BadRow]:
    rows: list[Row | BadRow] = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            origin = f"{path.name} line {number}"
            try:
                value = json.loads(line)
            except json.JSONDecodeError as exc:
                rows.append(BadRow(origin, f"invalid JSON ({exc.msg} at column {exc.colno})"))
                continue
            if not isinstance(value, dict):
                rows.append(BadRow(origin, f"expected a JSON object, got {type(value).__name__}"))
                continue
            rows.append(Row(value, origin))
    return rows


def _read_json(path: Path) -> list[Row | BadRow]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise UserError(
            f"{path}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}",
            hint="a .json file holds one list of records; use .jsonl for one record per line",
        ) from None
    if isinstance(value, dict) and value and all(isinstance(v, list) for v in value.values()):
        # Columnar {"col": [...], ...}, as pandas' to_json(orient="list") writes it.
        lengths = {len(v) for v in value.values()}
        if len(lengths) != 1:
            raise UserError(f"{path}: columns have different lengths {sorted(lengths)}")
        keys = list(value)
        value = [dict(zip(keys, items)) for items in zip(*value.values())]
    if not isinstance(value, list):
        raise UserError(f"{path}: expected a list of records, got a JSON {type(value).__name__}")
    rows: list[Row | BadRow] = []
    for number, item in enumerate(value, start=1):
        origin = f"{path.name} record {number}"
        if isinstance(item, dict):
            rows.append(Row(item, origin))
        else:
            rows.append(BadRow(origin, f"expected a JSON object, got {type(item).__name__}"))
    return rows


def _read_csv(path: Path) -> list[Row | BadRow]:
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        if not reader.fieldnames:
            raise UserError(f"{path}: no header row", hint="the first line of a CSV must name its columns")
        rows: list[Row | BadRow] = []
        for record in reader:
            origin = f"{path.name} line {reader.line_num}"
            if None in record:  # more cells than header columns
                rows.append(
                    BadRow(
                        origin,
                        f"{len(reader.fieldnames) + len(record[None])} cells for "
                        f"{len(reader.fieldnames)} header columns",
                    )
                )
                continue
            rows.append(Row(dict(record), origin))
    return rows


def _read_text(path: Path) -> list[Row | BadRow]:
    """Plain text: one `text` row per paragraph (paragraphs are separated by blank lines)."""
    rows: list[Row | BadRow] = []
    paragraph: list[str] = []
    start = 0
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines() + [""], start=1):
        if line.strip():
            if not paragraph:
                start = number
            paragraph.append(line)
        elif paragraph:
            rows.append(Row({"text": "\n".join(paragraph)}, f"{path.name} line {start}"))
            paragraph = []
    return rows


def _read_parquet(path: Path) -> list[Row | BadRow]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for a damaged file
        raise UserError(f"{path}: cannot read as parquet ({exc.__class__.__name__}: {exc})") from None
    return [Row(record, f"{path.name} row {i}") for i, record in enumerate(table.to_pylist(), start=1)]


def _read_saved_dataset(path: Path, source: DataSource, key: str) -> list[Row | BadRow]:
    import datasets

    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        if source.split not in loaded:
            raise UserError(f"{key}: {path} has no split '{source.split}'", hint=f"splits: {', '.join(loaded)}")
        loaded = loaded[source.split]
    return [Row(record, f"{path.name}[{source.split}] row {i}") for i, record in enumerate(loaded, start=1)]


def _read_hub(source: DataSource, key: str) -> list[Row | BadRow]:
    import datasets

    try:
        loaded = datasets.load_dataset(source.path, name=source.subset, split=source.split, revision=source.revision)
    except Exception as exc:  # offline, unknown id, missing split: all surface here
        raise UserError(
            f"{key}: cannot load '{source.path}': not a local file or folder, and the hub said: "
            f"{str(exc).splitlines()[0][:200]}",
            hint=f"check the path ({PATH_RULE}) or your network/HF_TOKEN",
        ) from None
    name = source.path.rsplit("/", 1)[-1]
    return [Row(record, f"{name}[{source.split}] row {i}") for i, record in enumerate(loaded, start=1)]
