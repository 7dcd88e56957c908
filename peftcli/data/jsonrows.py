"""JSON rows that may be hostile: nested beyond Python's recursion limit, or holding integers longer
than Python converts (4,300 digits). Such a row is a bad row with its file and line, so that
`data.bad_rows: skip` can skip it; it never stops the reading of the rows around it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peftcli.errors import UserError

# A JSON string (escapes included) or one structural character: enough to find where the elements
# of the top-level list start and end without parsing them.
_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{},]')


@dataclass(frozen=True)
class Record:
    value: Any
    origin: str
    problem: str | None = None  # why it could not be read; `value` is None then


def loads_row(text: str) -> Any:
    """json.loads, with every failure a ValueError whose message is a reason a user can act on."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"invalid JSON ({exc.msg} at column {exc.colno})") from None
    except RecursionError:
        raise ValueError("nested too deeply to read (lists or objects inside each other)") from None
    except ValueError as exc:  # Python refuses to convert integers over 4,300 digits
        raise ValueError(f"cannot read a number in it ({str(exc).split(':')[0]})") from None
    _check_encodable(value)
    return value


def _check_encodable(value: Any) -> None:
    """JSON's \\ud800-style escapes can spell a lone surrogate, which is no character: no tokenizer can
    encode it (the fast ones fail with a TypeError), so such a row is refused here, where its line is known."""
    pending = [value]
    while pending:  # a loop, not recursion: json.loads already accepted the nesting depth
        item = pending.pop()
        if isinstance(item, dict):
            pending.extend(item.keys())
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
        elif isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError as exc:
                bad = item[exc.start]
                raise ValueError(
                    f"a string holds a lone surrogate (\\u{ord(bad):04x}) at character {exc.start + 1} of "
                    f"{item[:40]!r}, which is not text (a broken \\u escape); fix or drop that character"
                ) from None


def read_json_records(path: Path) -> list[Record]:
    """The records of a .json file: a list of objects, or columns ({"col": [...], ...})."""
    text = path.read_text(encoding="utf-8-sig")  # Notepad and Excel write a byte-order mark
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(
            f"{path}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}",
            hint="a .json file holds one list of records; use .jsonl for one record per line",
        ) from None
    except (RecursionError, ValueError):
        spans = _list_elements(text)
        if spans is not None:
            return _one_by_one(path, text, spans)  # one record is unreadable: find it, keep the others
        try:  # not a list: the whole file is the one unreadable value
            value = loads_row(text)
        except ValueError as exc:
            raise UserError(f"{path}: {exc}") from None
    if _is_columnar(value):
        lengths = {len(v) for v in value.values()}
        if len(lengths) != 1:
            raise UserError(f"{path}: columns have different lengths {sorted(lengths)}")
        keys = list(value)
        value = [dict(zip(keys, items)) for items in zip(*value.values())]
    if isinstance(value, dict):  # one record (Axolotl's fixtures, a single conversation)
        return [_checked(value, f"{path.name} (its one object)")]
    if not isinstance(value, list):
        raise UserError(f"{path}: expected a list of records, got a JSON {type(value).__name__}")
    return [_checked(item, f"{path.name} record {number}") for number, item in enumerate(value, start=1)]


def _checked(value: Any, origin: str) -> Record:
    try:
        _check_encodable(value)
    except ValueError as exc:
        return Record(None, origin, str(exc))
    return Record(value, origin)


def _is_columnar(value: Any) -> bool:
    """{"col": [...], ...} as pandas' to_json(orient="list") writes it. A single record whose only
    key holds a list of turns ({"messages": [{...}, ...]}) is not: columns hold no objects."""
    return (
        isinstance(value, dict)
        and bool(value)
        and all(isinstance(v, list) for v in value.values())
        and not any(isinstance(item, dict) for v in value.values() for item in v)
    )


def _one_by_one(path: Path, text: str, spans: list[tuple[int, int]]) -> list[Record]:
    records, line, counted = [], 1, 0
    for number, (start, end) in enumerate(spans, start=1):
        piece = text[start:end]
        start += len(piece) - len(piece.lstrip())
        line += text.count("\n", counted, start)
        counted = start
        try:
            records.append(Record(loads_row(piece), f"{path.name} record {number}"))
        except ValueError as exc:
            records.append(Record(None, f"{path.name} record {number} (line {line})", str(exc)))
    return records


def _list_elements(text: str) -> list[tuple[int, int]] | None:
    """(start, end) of each element of the top-level JSON list in `text`; None if it is not a list."""
    begin = len(text) - len(text.lstrip())
    if not text.startswith("[", begin):
        return None
    spans: list[tuple[int, int]] = []
    depth, start = 0, begin + 1
    for match in _TOKEN.finditer(text, begin):
        token = match.group()
        if token in "[{":
            depth += 1
        elif token in "]}":
            depth -= 1
            if depth == 0:
                if text[start : match.start()].strip() or spans:
                    spans.append((start, match.start()))
                return spans
        elif token == "," and depth == 1:
            spans.append((start, match.start()))
            start = match.end()
    return None
