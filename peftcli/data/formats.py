"""Row formats: detect which one a source uses, map the user's column names, and normalise every row
into an `Example` — a conversation (rendered later by a chat template) or raw prompt/completion text.

Nothing is dropped silently: every column of a source is read by its format, mapped by
`data.columns`, or named in one warning (`unread_columns`); columns that would change what is
trained if ignored (preference pairs, KTO labels, images, row weights) are refused with what the
file is and what to do (`refuse_columns`), whether their values are JSON or a CSV cell's text
(`false`, `0.5`, `[]`). Within a row, what cannot be honoured is a bad row, never dropped: a `system`
column that contradicts the conversation's own system turn, a media placeholder (`<image>`), a
system prompt for plain prompt/completion text. Turns are read in turns.py.

Every check a row can fail raises `BadRowError` with a reason a user can act on
("missing field 'output'", "turn 3: unknown role 'bot'"); the caller adds the file and line.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from peftcli.data.turns import (
    MESSAGES_ROLES,
    SHAREGPT_ROLES,
    BadRowError,
    Turn,
    TurnKeys,
    check_turns,
    history_turns,
    read_turns,
    tool_schemas,
)
from peftcli.errors import UserError

__all__ = ["BadRowError", "Example", "Turn", "detect_format", "to_example"]

# Each format: the fields that identify it (all required) and the optional ones it reads.
FORMAT_FIELDS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "messages": (("messages",), ("system", "tools", "functions")),
    "sharegpt": (("conversations",), ("system", "tools")),
    "alpaca": (("instruction", "output"), ("input", "system", "history", "tools")),
    "prompt_completion": (("prompt", "completion"), ("system",)),
    "text": (("text",), ()),
}
# Columns whose meaning changes what is trained: ignoring them would train something else than the
# file means. column -> (does a value, in this row, carry that meaning?, what the file is, what to do)
REFUSED: dict[str, tuple[Callable[[Any, dict], bool], str, str]] = {
    **{
        column: (
            lambda v, row: v is not None,
            "a preference (DPO/ORPO) file",
            "keep one reply per row (SFT)",
        )
        # TRL/LLaMA-Factory, ms-swift and OpenAI's preference formats
        for column in ("chosen", "rejected", "rejected_response", "non_preferred_output")
    },
    **{
        column: (
            # A CSV or parquet cell holds `true`, `0` or "false" as text; a text corpus (the `text`
            # format) may carry a class label, which is no KTO flag unless it is a JSON boolean.
            lambda v, row: isinstance(v, bool) or (_boolean_like(v) and not _is_text_row(row)),
            f"a KTO file (a {column} of false or 0 marks an undesirable reply, which would be trained as a target)",
            f"keep the rows whose {column} is true and drop the column",
        )
        for column in ("label", "kto_tag")
    },
    **{
        column: (
            lambda v, row: bool(_cell(v)),  # a CSV cell of `[]` is no media
            f"a multimodal file (its <{column.rstrip('s')}> placeholders would be trained as text)",
            "peftcli trains text-only models: drop the column and the placeholders",
        )
        # `images` (LLaMA-Factory, ms-swift, TRL) and LLaVA's single `image`
        for column in ("images", "videos", "audios", "image", "video", "audio")
    },
    "weight": (
        lambda v, row: _number_like(v),
        "a file with a weight per row",
        "peftcli weighs sources (data.train: [{path, weight}]) and single replies (a message's weight: 0), "
        "not rows: split the rows by weight into sources",
    ),
}
# LLaVA-style media placeholders: in a text-only model they would be trained as the literal text.
MEDIA_PLACEHOLDER = re.compile(r"<(?:image|video|audio)>")


def _cell(value: Any) -> Any:
    """A value as written in JSON: CSV and parquet files store lists and objects as JSON text."""
    if isinstance(value, str) and value.strip()[:1] in ("[", "{"):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def _boolean_like(value: Any) -> bool:
    """true/false/0/1 as a JSON boolean or number, or as text in any case (a CSV cell)."""
    if isinstance(value, (bool, int, float)):
        return value in (0, 1)
    return isinstance(value, str) and value.strip().lower() in ("true", "false", "0", "1")


def _number_like(value: Any) -> bool:
    """A number, or text that reads as a finite one (a CSV cell of `0.5`)."""
    if isinstance(value, bool):
        return False
    if isinstance(value, (int, float)):
        return True
    if isinstance(value, str):
        try:
            return math.isfinite(float(value))
        except ValueError:
            return False
    return False


def _is_text_row(row: dict) -> bool:
    """A row of the `text` format: raw text, no conversation in it."""
    conversation = ("messages", "conversations", "instruction", "prompt", "query")
    return "text" in row and not any(field in row for field in conversation)


@dataclass(frozen=True)
class Example:
    """One training example, before tokenization.

    Chat examples carry `turns` (rendered through the chat template); raw examples carry `prompt`
    (may be empty) and `completion` and are tokenized as plain text followed by EOS.
    """

    origin: str
    turns: tuple[Turn, ...] = ()
    prompt: str = ""
    completion: str = ""
    # Tool schemas offered in this conversation (OpenAI style), passed to the template as `tools=`.
    tools: tuple[dict, ...] = ()

    @property
    def is_chat(self) -> bool:
        return bool(self.turns)


# Column names other tools give alpaca's fields (ms-swift and LLaMA-Factory: query/response; Dolly:
# context/response): read as such when the file lacks alpaca's own, and said so.
ALPACA_ALIASES = {"instruction": ("query",), "output": ("response",), "input": ("context", "query_input")}


def alpaca_aliases(columns: set[str], mapped: dict[str, str]) -> dict[str, str]:
    """{alpaca field: column} for the aliased columns of a file that has no such field."""
    found = {}
    for field, aliases in ALPACA_ALIASES.items():
        if field in columns or field in mapped:
            continue
        alias = next((a for a in aliases if a in columns), None)
        if alias is not None:
            found[field] = alias
    return found if {"instruction", "output"} <= set(found) | columns else {}


def turn_keys(fmt: str, columns: Mapping[str, str], roles: Mapping[str, str]) -> TurnKeys:
    """How a source of format `fmt` writes its turns: data.columns may rename the keys inside a turn
    ({from: role, value: content}), data.roles adds role names ({human: user, observation: tool})."""
    if fmt == "sharegpt":
        return TurnKeys(columns.get("from", "from"), columns.get("value", "value"), {**SHAREGPT_ROLES, **roles})
    return TurnKeys(columns.get("role", "role"), columns.get("content", "content"), {**MESSAGES_ROLES, **roles})


def refuse_columns(rows: list[dict[str, Any]], where: str) -> None:
    """Refuse a source with a column whose meaning peftcli cannot honour (see REFUSED)."""
    for column, (meaningful, what, todo) in REFUSED.items():
        if any(meaningful(values.get(column), values) for values in rows if column in values):
            raise UserError(
                f"{where}: the '{column}' column makes this {what}",
                hint=f"{todo}; or, if the column means something else, rename it",
            )


def unread_columns(fmt: str, columns: set[str]) -> list[str]:
    """Columns of a source that its format does not read (after data.columns renamed them)."""
    required, optional = FORMAT_FIELDS[fmt]
    return sorted(columns - set(required) - set(optional))


def detect_format(columns: list[str], where: str) -> str:
    present = set(columns)
    for name, (required, _) in FORMAT_FIELDS.items():
        if set(required) <= present:
            return name
    needs = "; ".join(f"{name}: {', '.join(req)}" for name, (req, _) in FORMAT_FIELDS.items())
    headerless = " If this is a CSV file without a header row, add one." if ".csv" in where else ""
    raise UserError(
        f"{where}: cannot detect the data format from columns {sorted(columns)}",
        hint=f"columns each format needs — {needs}. Map yours with data.columns (e.g. {{output: answer}}) "
        f"or set data.format.{headerless}",
    )


def rename_columns(values: dict[str, Any], columns: dict[str, str]) -> dict[str, Any]:
    """Apply data.columns ({format field: your column}) to one row."""
    if not columns:
        return values
    renamed = dict(values)
    for field, column in columns.items():
        if column in renamed:
            renamed[field] = renamed.pop(column)
    return renamed


def check_columns(fmt: str, columns: list[str], where: str) -> None:
    required, _ = FORMAT_FIELDS[fmt]
    missing = [c for c in required if c not in columns]
    if missing:
        raise UserError(
            f"{where}: data.format is '{fmt}' but the columns {missing} are missing (columns seen: {sorted(columns)})",
            hint="map your column names with data.columns, e.g. {" + f"{missing[0]}: your_column" + "}",
        )


def _text(values: dict[str, Any], field: str, *, required: bool = True, allow_empty: bool = False) -> str:
    value = values.get(field)
    if value is None:
        if required:
            raise BadRowError(f"missing field '{field}'")
        return ""
    if not isinstance(value, str):
        raise BadRowError(f"field '{field}' should be text, got {type(value).__name__}")
    if required and not allow_empty and not value.strip():
        raise BadRowError(f"field '{field}' is empty")
    return value


def _system_first(turns: list[Turn], system: str) -> list[Turn]:
    """A `system` column, put first. A conversation that already opens with a different system turn
    is refused: keeping either one would drop the other."""
    if not system.strip():
        return turns
    if turns and turns[0].role == "system":
        if turns[0].content.strip() != system.strip():
            raise BadRowError(
                f"the 'system' column ({_quote(system)}) differs from the conversation's own system turn "
                f"({_quote(turns[0].content)}): keep one of them"
            )
        return turns
    return [Turn("system", system), *turns]


def _quote(text: str, limit: int = 40) -> str:
    text = " ".join(text.split())
    return repr(text if len(text) <= limit else text[: limit - 3] + "...")


def _refuse_placeholders(texts: list[tuple[str, str]]) -> None:
    """A media placeholder (LLaVA's `<image>`) would be trained as text: the row is multimodal."""
    for where, text in texts:
        found = MEDIA_PLACEHOLDER.search(text)
        if found:
            raise BadRowError(
                f"{where}: an {found.group(0)} placeholder (a multimodal row): peftcli trains text-only "
                "models; drop the placeholder, or the row"
            )


def _chat(origin: str, turns: list[Turn], tools: tuple[dict, ...] = ()) -> Example:
    _refuse_placeholders([(f"turn {i}", turn.content) for i, turn in enumerate(turns, start=1)])
    return Example(origin, turns=check_turns(turns), tools=tools)


def to_example(fmt: str, values: dict[str, Any], origin: str, keys: TurnKeys | None = None) -> Example:
    """Normalise one row; raises BadRowError when it does not fit `fmt`."""
    keys = keys or turn_keys(fmt, {}, {})
    system = _text(values, "system", required=False) if fmt != "text" else ""
    if fmt in ("messages", "sharegpt"):
        field = "messages" if fmt == "messages" else "conversations"
        turns = _system_first(read_turns(values.get(field), field, keys), system)
        return _chat(origin, turns, tool_schemas(values.get("tools") or values.get("functions"), "tools"))
    if fmt == "alpaca":
        instruction = _text(values, "instruction")
        extra = _text(values, "input", required=False)
        output = _text(values, "output")
        user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        turns = [*history_turns(values.get("history")), Turn("user", user), Turn("assistant", output)]
        return _chat(origin, _system_first(turns, system), tool_schemas(values.get("tools"), "tools"))
    if fmt == "prompt_completion":
        prompt, completion = values.get("prompt"), values.get("completion")
        if isinstance(prompt, list) and isinstance(completion, list):
            # Conversational prompt/completion (TRL's convention): lists of role/content turns.
            return _chat(origin, _system_first(read_turns(prompt + completion, "prompt", keys), system))
        if system.strip():
            raise BadRowError(
                "field 'system': a plain-text prompt/completion row is not rendered by a chat template, so it "
                "has no place for a system prompt; write it into the prompt, or give the row as messages"
            )
        prompt_text, completion_text = _text(values, "prompt", allow_empty=True), _text(values, "completion")
        _refuse_placeholders([("field 'prompt'", prompt_text), ("field 'completion'", completion_text)])
        return Example(origin, prompt=prompt_text, completion=completion_text)
    if fmt == "text":
        return Example(origin, completion=_text(values, "text"))
    raise AssertionError(f"unhandled format {fmt}")
