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
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peftcli import console
from peftcli.data.jsonrows import loads_row, read_json_records
from peftcli.data.paths import not_a_file
from peftcli.errors import PATH_RULE, UserError
from peftcli.recipe import DataSource
from peftcli.recipe.files import special_kind

SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".txt")


@dataclass(frozen=True)
class Row:
    values: dict[str, Any]
    origin: str  # "train.jsonl line 12": where a user finds this row


@dataclass(frozen=True)
class BadRow:
    origin: str
    reason: str


def read_source(source: DataSource, key: str, text_split: str = "auto") -> list[Row | BadRow]:
    """All rows of one source. `key` (e.g. "data.train") names the recipe key in errors;
    `text_split` says how a .txt file is cut into examples (data.text_split)."""
    path = source.path
    # A file named `train[v2].jsonl` is that file: only a path that does not exist is a pattern.
    if any(ch in path for ch in "*?[") and not os.path.lexists(path):
        matched = sorted(Path(p) for p in glob.glob(path, recursive=True) if p.endswith(SUFFIXES))
        files, skipped = _outside_marked(matched, _fixed_folder(path))
        if not files:
            raise UserError(
                f"{key}: the pattern {path} matches no {'/'.join(SUFFIXES)} file{_skipped_clause(skipped)}",
                hint=_SKIPPED_HINT if skipped else None,
            )
        _note_skipped(key, skipped)
        return _read_files(files, key, text_split)
    local = Path(path)
    if not local.is_absolute():  # recipes make local paths absolute: a relative one is a hub id
        return _read_hub(source, key)
    if local.is_dir():
        if (local / "dataset_dict.json").exists() or (local / "state.json").exists():
            return _read_saved_dataset(local, source, key)
        if (local / PEFTCLI_MARKER).exists():
            raise UserError(
                f"{key}: {local} is a folder peftcli wrote (it holds {PEFTCLI_MARKER}), not a folder of data",
                hint="name the data file itself (a run's predictions.jsonl, say), or copy it out first",
            )
        found, skipped = _folder_files(local, key)
        if not found:
            raise UserError(
                f"{key}: {local} is a directory with no .jsonl/.json/.csv/.parquet file{_skipped_clause(skipped)}",
                hint=_SKIPPED_HINT if skipped else "point data.train at a file, a glob, or a folder of data files",
            )
        _note_skipped(key, skipped)
        return _read_files(found, key, text_split)
    if local.is_file() or special_kind(local):
        return _read_files([local], key, text_split)
    problem = not_a_file(local)  # a symlink loop or a broken link is not simply "not found"
    if problem is not None:
        raise UserError(f"{key}: {path} is {problem}", hint="point it at a data file")
    raise UserError(f"{key}: data file not found: {path}", hint=PATH_RULE)


# The marker peftcli writes into every folder it owns (rundir/layout.py MARKER; data sits below
# rundir): a run, a merge or a study inside a data folder is never data. Its checkpoints' JSON
# would fail as rows, and eval's predictions.jsonl would be trained on without a word.
PEFTCLI_MARKER = "peftcli.json"
_SKIPPED_HINT = "name the data file itself to read a file from such a folder, or copy it out first"


def _folder_files(root: Path, key: str) -> tuple[list[Path], list[Path]]:
    """The data files under `root` (folder links are not followed, as with rglob), and the folders
    left out because peftcli marked them."""

    def unreadable(exc: OSError) -> None:  # os.walk would skip a folder it cannot list, silently
        raise UserError(f"{key}: cannot list {exc.filename} ({exc.strerror or exc})") from None

    found: list[Path] = []
    skipped: list[Path] = []
    for folder, subfolders, names in os.walk(root, onerror=unreadable):
        here = Path(folder)
        marked = {name for name in subfolders if (here / name / PEFTCLI_MARKER).exists()}
        skipped += sorted(here / name for name in marked)
        subfolders[:] = [name for name in subfolders if name not in marked]
        found += [here / name for name in names if Path(name).suffix in SUFFIXES and (here / name).is_file()]
    return sorted(found), skipped


def _fixed_folder(pattern: str) -> Path:
    """The folder a glob starts from: its parts before the first one holding a wildcard."""
    parts = Path(pattern).parts
    fixed = next((i for i, part in enumerate(parts) if any(ch in part for ch in "*?[")), len(parts))
    return Path(*parts[:fixed])


def _outside_marked(files: list[Path], root: Path) -> tuple[list[Path], list[Path]]:
    """`files` less those inside a folder below `root` that peftcli marked, and those folders."""
    marked: dict[Path, bool] = {}
    kept: list[Path] = []
    for file in files:
        try:
            between = file.parent.relative_to(root).parts
        except ValueError:  # a relative pattern: nothing to go by
            between = ()
        folders = [root.joinpath(*between[: i + 1]) for i in range(len(between))]
        inside = [f for f in folders if marked.setdefault(f, (f / PEFTCLI_MARKER).exists())]
        if not inside:
            kept.append(file)
    skipped = sorted(f for f, is_marked in marked.items() if is_marked)
    # A marked folder inside another is not named again: the outer one already says it.
    return kept, [f for f in skipped if not any(other in f.parents for other in skipped)]


def _listed(folders: list[Path]) -> str:
    return ", ".join(str(f) for f in folders[:3]) + (f" and {len(folders) - 3} more" if len(folders) > 3 else "")


def _skipped_clause(skipped: list[Path]) -> str:
    """What an error about finding no data file adds when marked folders were left out."""
    if not skipped:
        return ""
    return f" outside the folder{'s' if len(skipped) > 1 else ''} peftcli wrote there ({_listed(skipped)})"


def _note_skipped(key: str, skipped: list[Path]) -> None:
    if skipped:
        what = f"{len(skipped)} folder{'s' if len(skipped) > 1 else ''}"
        console.note(
            f"{key}: skipped {what} that peftcli wrote (marked by {PEFTCLI_MARKER}: a run, a merge or a study), "
            f"whose files are not data: {_listed(skipped)}"
        )


# More .txt files than this in one source: how they were split is said in one line, not one per file.
_SPLIT_NOTES = 3


def _read_files(files: list[Path], key: str, text_split: str) -> list[Row | BadRow]:
    """The rows of a source's files, and a note saying how its .txt files were split."""
    splits: list[tuple[str, str]] = []  # (note, split chosen) of each .txt file
    rows = [row for file in files for row in _read_file(file, key, text_split, splits)]
    if len(splits) <= _SPLIT_NOTES:
        for note, _ in splits:
            console.note(note)
    else:
        lines = sum(1 for _, chosen in splits if chosen == "line")
        console.note(
            f"{key}: {len(splits):,} .txt files, {lines:,} read as lines (one example per line), "
            f"{len(splits) - lines:,} as paragraphs (blank-line separated); data.text_split: line | paragraph "
            "reads them all one way"
        )
    return rows


def _read_file(path: Path, key: str, text_split: str, splits: list[tuple[str, str]]) -> list[Row | BadRow]:
    kind = special_kind(path)  # checked before opening: reading a FIFO blocks, a device never ends
    if kind is not None:
        raise UserError(f"{key}: {path} is {kind}, not a regular file", hint="point it at a data file")
    if path.suffix not in SUFFIXES:
        raise UserError(f"{key}: {path.name}: unsupported file type '{path.suffix}'", hint=f"use one of {SUFFIXES}")
    if path.stat().st_size == 0:
        raise UserError(f"{key}: {path} is empty")
    readers = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet}
    try:
        return _read_text(path, text_split, splits) if path.suffix == ".txt" else readers[path.suffix](path)
    except UnicodeDecodeError as exc:
        raise UserError(f"{key}: {path}: not UTF-8 text (byte {exc.start})") from None
    except PermissionError:
        raise UserError(f"{key}: {path}: permission denied") from None
    except OSError as exc:  # an I/O error, a file removed while being read
        raise UserError(f"{key}: {path}: cannot read it ({exc.strerror or exc})") from None
    except UserError as exc:  # a reader's error about the whole file: say which key it came from
        raise UserError(f"{key}: {exc.message}", hint=exc.hint) from None


def _read_jsonl(path: Path) -> list[Row | BadRow]:
    rows: list[Row | BadRow] = []
    with path.open(encoding="utf-8-sig") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            origin = f"{path.name} line {number}"
            try:
                value = loads_row(line)
            except ValueError as exc:
                rows.append(BadRow(origin, str(exc)))
                continue
            if not isinstance(value, dict):
                rows.append(BadRow(origin, f"expected a JSON object, got {type(value).__name__}"))
                continue
            rows.append(Row(value, origin))
    return rows


def _read_json(path: Path) -> list[Row | BadRow]:
    rows: list[Row | BadRow] = []
    for record in read_json_records(path):
        if isinstance(record.value, dict):
            rows.append(Row(record.value, record.origin))
        else:
            reason = record.problem or f"expected a JSON object, got {type(record.value).__name__}"
            rows.append(BadRow(record.origin, reason))
    return rows


def _read_csv(path: Path) -> list[Row | BadRow]:
    # A record may span lines (a quoted cell with newlines): each row is cited by the line it starts
    # on, which csv.DictReader does not keep, so the header is applied here.
    limit = csv.field_size_limit()
    csv.field_size_limit(sys.maxsize)  # a long cell is data (encode bounds its cost), not an error
    try:
        with path.open(encoding="utf-8-sig", newline="") as handle:
            return _csv_rows(path, csv.reader(handle))
    finally:
        csv.field_size_limit(limit)


def _csv_rows(path: Path, reader) -> list[Row | BadRow]:
    header: list[str] | None = None
    rows: list[Row | BadRow] = []
    start = 1
    while True:
        try:
            record = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:  # the reader cannot resynchronise after this: the file is the error
            raise UserError(f"{path} line {start}: not readable as CSV ({exc})", hint="check its quoting") from None
        line, start = start, reader.line_num + 1
        if not record:  # a blank line
            continue
        if header is None:
            header = record
            continue
        origin = f"{path.name} line {line}"
        if len(record) > len(header):
            rows.append(BadRow(origin, f"{len(record)} cells for {len(header)} header columns"))
            continue
        rows.append(Row(dict(zip(header, record + [None] * (len(header) - len(record)))), origin))
    if not header:
        raise UserError(f"{path}: no header row", hint="the first line of a CSV must name its columns")
    return rows


def _read_text(path: Path, split: str, splits: list[tuple[str, str]]) -> list[Row | BadRow]:
    """Plain text: one `text` row per paragraph (blank-line separated) or per line; which one, and
    the note saying so, go into `splits`. `auto` takes paragraphs only when they are the file's
    structure (see `_paragraph_shaped`): a corpus of one document per line must not become a few
    examples cut at max_length because of a stray blank line."""
    lines = path.read_text(encoding="utf-8-sig").splitlines()
    blocks = _blocks(lines)
    chosen = split if split != "auto" else ("paragraph" if _paragraph_shaped(blocks) else "line")
    rows: list[Row | BadRow]
    if chosen == "line":
        rows = [Row({"text": line}, f"{path.name} line {n}") for n, line in enumerate(lines, start=1) if line.strip()]
    else:
        rows = [Row({"text": "\n".join(block)}, f"{path.name} line {start}") for start, block in blocks]
    splits.append((_split_note(path, chosen, split, len(rows), [len(block) for _, block in blocks]), chosen))
    return rows


def _blocks(lines: list[str]) -> list[tuple[int, list[str]]]:
    """Runs of non-blank lines, with the line number each starts on."""
    blocks: list[tuple[int, list[str]]] = []
    current: list[str] = []
    for number, line in enumerate(lines + [""], start=1):
        if line.strip():
            if not current:
                blocks.append((number, current))
            current.append(line)
        elif current:
            current = []
    return blocks


# A paragraph: a few lines of text between blank lines. A run far longer than this is not one, but
# the documents of a one-per-line corpus between two stray blank lines.
PARAGRAPH_MAX_LINES = 50
PARAGRAPH_MAX_CHARS = 10_000


def _paragraph_shaped(blocks: list[tuple[int, list[str]]]) -> bool:
    """Whether blank lines give the file its structure: there are at least two blank-line separated
    blocks, and most lines of text lie in blocks of several lines that are paragraph-sized. Blocks of
    one line read the same either way; a few huge blocks are lines split by a stray blank line."""
    if len(blocks) < 2:
        return False
    total = sum(len(block) for _, block in blocks)
    in_paragraphs = sum(
        len(block)
        for _, block in blocks
        if 1 < len(block) <= PARAGRAPH_MAX_LINES and sum(map(len, block)) <= PARAGRAPH_MAX_CHARS
    )
    return in_paragraphs * 2 > total


def _split_note(path: Path, chosen: str, setting: str, rows: int, block_lines: list[int]) -> str:
    if setting != "auto":
        what = "paragraphs (blank-line separated)" if chosen == "paragraph" else "lines (one example per line)"
        return f"{path.name}: read as {rows:,} {what}, as data.text_split: {setting} says"
    if chosen == "paragraph":
        return (
            f"{path.name}: read as {rows:,} paragraphs (blank-line separated); "
            "data.text_split: line reads one example per line"
        )
    gaps = len(block_lines) - 1
    if gaps and max(block_lines) == 1:  # either way the same examples
        why = "; its blank-line separated blocks are single lines"
    elif gaps:
        why = f"; {gaps:,} blank-line gap{'s' if gaps != 1 else ''} but no paragraphs"
    else:
        why = ""
    return (
        f"{path.name}: read as {rows:,} lines (one example per line{why}); "
        "data.text_split: paragraph reads blank-line separated paragraphs"
    )


def _read_parquet(path: Path) -> list[Row | BadRow]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for a damaged file
        raise UserError(f"{path}: cannot read as parquet ({exc.__class__.__name__}: {exc})") from None
    return [Row(record, f"{path.name} row {i}") for i, record in enumerate(table.to_pylist(), start=1)]


def _read_saved_dataset(path: Path, source: DataSource, key: str) -> list[Row | BadRow]:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as exc:  # noqa: BLE001 - a damaged or foreign folder: datasets raises many types
        raise UserError(
            f"{key}: {path} looks like a saved dataset (it has dataset_dict.json or state.json) but cannot "
            f"be loaded: {str(exc).splitlines()[0][:200] if str(exc) else exc.__class__.__name__}",
            hint="point data.train at the data files, or save the dataset again with save_to_disk",
        ) from None
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
