"""Row formats: detect which one a source uses, map the user's column names, and normalise every row
into an `Example` — a conversation (rendered later by a chat template) or raw prompt/completion text.

Every check a row can fail lives here and raises `BadRowError` with a reason a user can act on
("missing field 'output'", "turn 3: unknown role 'bot'"); the caller adds the file and line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from peftcli.errors import UserError

# Each format: the fields that identify it (all required) and optional ones.
FORMAT_FIELDS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "messages": (("messages",), ()),
    "sharegpt": (("conversations",), ("system",)),
    "alpaca": (("instruction", "output"), ("input", "system")),
    "prompt_completion": (("prompt", "completion"), ()),
    "text": (("text",), ()),
}
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "model": "assistant",
    "chatgpt": "assistant",
}


class BadRowError(Exception):
    """A row that does not fit its format; the message says what is wrong with it."""


@dataclass(frozen=True)
class Turn:
    role: str  # system | user | assistant
    content: str


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

    @property
    def is_chat(self) -> bool:
        return bool(self.turns)


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


def _check_turns(turns: list[Turn]) -> tuple[Turn, ...]:
    if not turns:
        raise BadRowError("the conversation has no turns")
    if not any(t.role == "assistant" for t in turns):
        raise BadRowError("the conversation has no assistant turn to learn from")
    for i, turn in enumerate(turns, start=1):
        if turn.role == "system" and i != 1:
            raise BadRowError(f"turn {i}: a system turn may only come first")
        if turn.role == "assistant" and not turn.content.strip():
            raise BadRowError(f"turn {i}: empty assistant reply")
    return tuple(turns)


def _turn_list(values: dict[str, Any], field: str, role_key: str, text_key: str, roles: dict[str, str]) -> list[Turn]:
    items = values.get(field)
    if items is None:
        raise BadRowError(f"missing field '{field}'")
    if isinstance(items, str):  # CSV (and some parquet) files store the turns as a JSON string
        try:
            items = json.loads(items)
        except json.JSONDecodeError:
            raise BadRowError(f"field '{field}' is text that is not a JSON list of turns") from None
    if not isinstance(items, list):
        raise BadRowError(f"field '{field}' should be a list of turns, got {type(items).__name__}")
    turns = []
    for i, item in enumerate(items, start=1):
        if not isinstance(item, dict):
            raise BadRowError(f"turn {i}: expected an object with '{role_key}' and '{text_key}'")
        role, text = item.get(role_key), item.get(text_key)
        if role is None or text is None:
            missing = role_key if role is None else text_key
            raise BadRowError(f"turn {i}: missing '{missing}'")
        if not isinstance(text, str):
            raise BadRowError(f"turn {i}: '{text_key}' should be text, got {type(text).__name__}")
        if not isinstance(role, str):  # a list or object cannot even be looked up among the roles
            raise BadRowError(f"turn {i}: '{role_key}' should be text, got {type(role).__name__}")
        if role not in roles:
            raise BadRowError(f"turn {i}: unknown role '{role}' (expected one of {', '.join(sorted(roles))})")
        turns.append(Turn(roles[role], text))
    return turns


def to_example(fmt: str, values: dict[str, Any], origin: str) -> Example:
    """Normalise one row; raises BadRowError when it does not fit `fmt`."""
    if fmt == "messages":
        turns = _turn_list(values, "messages", "role", "content", {r: r for r in ROLES})
        return Example(origin, turns=_check_turns(turns))
    if fmt == "sharegpt":
        turns = _turn_list(values, "conversations", "from", "value", SHAREGPT_ROLES)
        system = _text(values, "system", required=False)
        if system.strip() and not (turns and turns[0].role == "system"):
            turns.insert(0, Turn("system", system))
        return Example(origin, turns=_check_turns(turns))
    if fmt == "alpaca":
        instruction = _text(values, "instruction")
        extra = _text(values, "input", required=False)
        output = _text(values, "output")
        system = _text(values, "system", required=False)
        user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        turns = ([Turn("system", system)] if system.strip() else []) + [Turn("user", user), Turn("assistant", output)]
        return Example(origin, turns=tuple(turns))
    if fmt == "prompt_completion":
        prompt, completion = values.get("prompt"), values.get("completion")
        if isinstance(prompt, list) and isinstance(completion, list):
            # Conversational prompt/completion (TRL's convention): lists of role/content turns.
            convo = {"messages": prompt + completion}
            turns = _turn_list(convo, "messages", "role", "content", {r: r for r in ROLES})
            return Example(origin, turns=_check_turns(turns))
        return Example(origin, prompt=_text(values, "prompt", allow_empty=True), completion=_text(values, "completion"))
    if fmt == "text":
        return Example(origin, completion=_text(values, "text"))
    raise AssertionError(f"unhandled format {fmt}")
