"""Row formats: detect which one a source uses, map the user's column names, and normalise every row
into an `Example` — a conversation (rendered later by a chat template) or raw prompt/completion text.

Nothing is dropped silently: every column of a source is read by its format, mapped by
`data.columns`, or named in one warning (`unread_columns`); columns that would change what is
trained if ignored (preference pairs, KTO labels, images, row weights) are refused with what the
file is and what to do (`refuse_columns`). Turns are read in turns.py.

Every check a row can fail raises `BadRowError` with a reason a user can act on
("missing field 'output'", "turn 3: unknown role 'bot'"); the caller adds the file and line.
"""

from __future__ import annotations

from collections.abc import Mapping
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
    "prompt_completion": (("prompt", "completion"), ()),
    "text": (("text",), ()),
}
# Columns whose meaning changes what is trained: ignoring them would train something else than the
# file means. column -> (does a value carry that meaning?, what the file is, what to do)
REFUSED: dict[str, tuple[Any, str, str]] = {
    "chosen": (lambda v: v is not None, "a preference (DPO/ORPO) file", "keep one reply per row (SFT)"),
    "rejected": (lambda v: v is not None, "a preference (DPO/ORPO) file", "keep one reply per row (SFT)"),
    "label": (
        lambda v: isinstance(v, bool),
        "a KTO file (label false marks an undesirable reply, which would be trained as a target)",
        "keep the rows labelled true and drop the column",
    ),
    "kto_tag": (
        lambda v: isinstance(v, bool),
        "a KTO file (kto_tag false marks an undesirable reply, which would be trained as a target)",
        "keep the rows tagged true and drop the column",
    ),
    **{
        column: (
            lambda v: bool(v),
            f"a multimodal file (its <{column[:-1]}> placeholders would be trained as text)",
            "peftcli trains text-only models: drop the column and the placeholders",
        )
        for column in ("images", "videos", "audios")
    },
    "weight": (
        lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        "a file with a weight per row",
        "peftcli weighs sources (data.train: [{path, weight}]) and single replies (a message's weight: 0), "
        "not rows: split the rows by weight into sources",
    ),
}


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
        if any(meaningful(values.get(column)) for values in rows if column in values):
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
    """A `system` column, put first unless the conversation already opens with a system turn."""
    if system.strip() and not (turns and turns[0].role == "system"):
        return [Turn("system", system), *turns]
    return turns


def to_example(fmt: str, values: dict[str, Any], origin: str, keys: TurnKeys | None = None) -> Example:
    """Normalise one row; raises BadRowError when it does not fit `fmt`."""
    keys = keys or turn_keys(fmt, {}, {})
    if fmt in ("messages", "sharegpt"):
        field = "messages" if fmt == "messages" else "conversations"
        turns = _system_first(read_turns(values.get(field), field, keys), _text(values, "system", required=False))
        tools = tool_schemas(values.get("tools") or values.get("functions"), "tools")
        return Example(origin, turns=check_turns(turns), tools=tools)
    if fmt == "alpaca":
        instruction = _text(values, "instruction")
        extra = _text(values, "input", required=False)
        output = _text(values, "output")
        user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        turns = [*history_turns(values.get("history")), Turn("user", user), Turn("assistant", output)]
        turns = _system_first(turns, _text(values, "system", required=False))
        return Example(origin, turns=check_turns(turns), tools=tool_schemas(values.get("tools"), "tools"))
    if fmt == "prompt_completion":
        prompt, completion = values.get("prompt"), values.get("completion")
        if isinstance(prompt, list) and isinstance(completion, list):
            # Conversational prompt/completion (TRL's convention): lists of role/content turns.
            turns = read_turns(prompt + completion, "prompt", keys)
            return Example(origin, turns=check_turns(turns))
        return Example(origin, prompt=_text(values, "prompt", allow_empty=True), completion=_text(values, "completion"))
    if fmt == "text":
        return Example(origin, completion=_text(values, "text"))
    raise AssertionError(f"unhandled format {fmt}")
