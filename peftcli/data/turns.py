"""Conversations as the data files write them, read into `Turn`s: the role names of each convention
(OpenAI, ShareGPT/FastChat, LLaMA-Factory, ms-swift), per-message `weight`, reasoning (a turn's
`reasoning_content`, reasoning parts) and tool calling (OpenAI `tools`, `tool_calls` and `tool`
messages; ShareGPT's `function_call` and `observation` turns; ms-swift's `tool_call` and
`tool_response` turns).

Reasoning is written into the reply as a `<think>` block before the answer, the way DeepSeek-R1-style
models write it and the way Qwen3's template renders a `reasoning_content`, so every template sees it.
Calls without an id (ShareGPT, glaive, ms-swift) get one, linked to the tool outputs that answer
them: templates such as Mistral v0.3's refuse calls without ids.

Every check a turn can fail raises `BadRowError` with a reason a user can act on; a key of a turn
that nothing reads is reported once per source (formats.py), never dropped silently.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from typing import Any

# What each role name of a file stands for. tool = a tool's output (never trained); tool_call = an
# assistant turn whose text is a function call (ShareGPT's function_call).
MESSAGES_ROLES = {
    "system": "system",
    "developer": "system",  # OpenAI's newer name for the system message
    "user": "user",
    "assistant": "assistant",
    "tool": "tool",
    "function": "tool",  # OpenAI's older function-calling API
    "tool_call": "tool_call",  # ms-swift's agent format: the turn's text is the call
    "tool_response": "tool",  # ms-swift's agent format: a tool's output
}
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "model": "assistant",
    "chatgpt": "assistant",
    "observation": "tool",  # LLaMA-Factory / glaive: a tool's output
    "tool": "tool",
    "function_call": "tool_call",  # LLaMA-Factory / glaive: the assistant calls a function
    "tool_call": "tool_call",  # ms-swift
    "tool_response": "tool",  # ms-swift
}
# Keys of a message that a convention defines, read below.
MESSAGE_KEYS = {"role", "content", "weight", "loss_weight", "name", "tool_calls", "tool_call_id", "function_call"}
MESSAGE_KEYS.add("reasoning_content")  # DeepSeek's and Qwen3's reasoning beside the answer
# Ids given to calls that have none: alphanumeric and 9 characters long, as Mistral's template demands.
CALL_ID = "call{:05d}"
# Content given as typed parts (OpenAI's [{"type": "text", "text": ...}], LLaMA-Factory's v1 format
# with "value" and reasoning / tool_call parts). Parts of these types would need a model that sees them.
MEDIA_PARTS = {"image", "image_url", "input_image", "audio", "input_audio", "video", "video_url", "file"}


class BadRowError(Exception):
    """A row that does not fit its format; the message says what is wrong with it."""


@dataclass(frozen=True)
class Turn:
    role: str  # system | user | assistant | tool (a tool's output, never trained)
    content: str
    # False for an assistant reply the data says not to learn (OpenAI's per-message `weight: 0`):
    # it stays in the conversation as context, outside the loss.
    trained: bool = True
    # An assistant turn that calls functions, OpenAI style: [{"type": "function", "function":
    # {"name": ..., "arguments": {...}}}] (arguments as a dict, as chat templates expect).
    tool_calls: tuple[dict, ...] = ()
    name: str | None = None  # a tool turn: the tool that answered
    tool_call_id: str | None = None


@dataclass(frozen=True)
class TurnKeys:
    """How one source writes its turns: the keys holding role and text, and its role names."""

    role: str
    content: str
    roles: dict[str, str]
    # Keys found in turns that nothing reads (reported once per source by the caller).
    unread: set[str] = field(default_factory=set, compare=False)


def json_value(value: Any, what: str) -> Any:
    """A value that CSV, parquet and LLaMA-Factory files often store as a JSON string."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        raise BadRowError(f"{what} is text that is not valid JSON") from None


def tool_schemas(value: Any, field_name: str) -> tuple[dict, ...]:
    """A row's `tools`: OpenAI's [{"type": "function", "function": {...}}] or bare function schemas
    (LLaMA-Factory, OpenAI's older `functions`), as OpenAI-style entries."""
    if value is None or value == "" or value == []:
        return ()
    value = json_value(value, f"field '{field_name}'")
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise BadRowError(f"field '{field_name}' should be a list of tool schemas")
    out = []
    for tool in value:
        if "function" in tool and isinstance(tool["function"], dict):
            out.append({"type": tool.get("type", "function"), **tool})
        elif "name" in tool:
            out.append({"type": "function", "function": tool})
        else:
            raise BadRowError(f"field '{field_name}': a tool without a name")
    return tuple(out)


def _call(value: Any, where: str) -> dict:
    """One function call as OpenAI's `tool_calls` entry, arguments as a dict."""
    if not isinstance(value, dict):
        raise BadRowError(f"{where}: a function call should be an object with 'name' and 'arguments'")
    function = value.get("function", value)
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise BadRowError(f"{where}: a function call without a name")
    arguments = function.get("arguments", {})
    if isinstance(arguments, str):
        arguments = json_value(arguments, f"{where}: the arguments") if arguments.strip() else {}
    call = {"type": "function", "function": {"name": function["name"], "arguments": arguments}}
    if isinstance(value.get("id"), str):
        call["id"] = value["id"]
    return call


def _calls(value: Any, where: str) -> tuple[dict, ...]:
    value = json_value(value, f"{where}: the function call")
    items = value if isinstance(value, list) else [value]
    return tuple(_call(item, where) for item in items)


def _weight(item: dict, role: str, where: str) -> bool:
    """OpenAI's per-message `weight` (LLaMA-Factory's `loss_weight`): 0 leaves an assistant reply out
    of the loss, 1 keeps it. Other turns are never trained, so a 0 there changes nothing."""
    key = "weight" if "weight" in item else "loss_weight"
    weight = item.get(key)
    if weight is None:
        return True
    if isinstance(weight, bool) or weight not in (0, 1):
        raise BadRowError(f"{where}: '{key}' must be 0 or 1, got {weight!r}")
    if role != "assistant" and weight == 1:
        raise BadRowError(f"{where}: '{key}' 1 on a {role} turn: only assistant replies are trained")
    return weight == 1


def _parts(parts: list, where: str) -> tuple[str, tuple[dict, ...]]:
    """Text and function calls of content given as typed parts. A reasoning part is written the way
    LLaMA-Factory and DeepSeek-R1-style models write it, in <think> tags before the answer."""
    texts: list[str] = []
    reasoning: list[str] = []
    calls: list[dict] = []
    for part in parts:
        if not isinstance(part, dict) or not isinstance(part.get("type"), str):
            raise BadRowError(f"{where}: a content part should be an object with a 'type'")
        kind, value = part["type"], part.get("text", part.get("value"))
        if kind in MEDIA_PARTS:
            raise BadRowError(f"{where}: a '{kind}' part: peftcli trains text-only models")
        if kind == "tool_call":
            calls += _calls(value, where)
            continue
        if not isinstance(value, str):
            raise BadRowError(f"{where}: a '{kind}' part without text")
        if kind in ("reasoning", "thinking"):
            reasoning.append(value)
        elif kind == "text":
            texts.append(value)
        else:
            raise BadRowError(f"{where}: unknown content part type '{kind}'")
    text = "".join(texts)
    if reasoning:
        text = with_reasoning("\n".join(reasoning), text)
    return text, tuple(calls)


def with_reasoning(reasoning: str, answer: str) -> str:
    """A reply with its reasoning in a <think> block before the answer."""
    return "<think>\n" + reasoning + "\n</think>\n\n" + answer


def carries_reasoning(turns) -> bool:
    """Whether an assistant reply of the conversation writes its reasoning (a <think> block)."""
    return any(t.role == "assistant" and "</think>" in t.content for t in turns)


def reasoning_of(text: str) -> str:
    """The reasoning inside a reply's <think> block ("" when it has none)."""
    if "</think>" not in text:
        return ""
    return text.split("</think>")[0].split("<think>")[-1].strip()


def read_turns(items: Any, field_name: str, keys: TurnKeys) -> list[Turn]:
    """The turns of one conversation (a list of message objects, or a JSON string of one)."""
    if items is None:
        raise BadRowError(f"missing field '{field_name}'")
    if isinstance(items, str):  # CSV (and some parquet) files store the turns as a JSON string
        try:
            items = json.loads(items)
        except json.JSONDecodeError:
            raise BadRowError(f"field '{field_name}' is text that is not a JSON list of turns") from None
    if not isinstance(items, list):
        raise BadRowError(f"field '{field_name}' should be a list of turns, got {type(items).__name__}")
    return [_turn(item, i, keys) for i, item in enumerate(items, start=1)]


def _turn(item: Any, i: int, keys: TurnKeys) -> Turn:
    where = f"turn {i}"
    if not isinstance(item, dict):
        raise BadRowError(f"{where}: expected an object with '{keys.role}' and '{keys.content}'")
    keys.unread.update(k for k in item if k not in MESSAGE_KEYS | {keys.role, keys.content})
    role_name = item.get(keys.role)
    if role_name is None:
        raise BadRowError(f"{where}: missing '{keys.role}'")
    if not isinstance(role_name, str):  # a list or object cannot even be looked up among the roles
        raise BadRowError(f"{where}: '{keys.role}' should be text, got {type(role_name).__name__}")
    if role_name not in keys.roles:
        raise BadRowError(
            f"{where}: unknown role '{role_name}' (expected one of {', '.join(sorted(keys.roles))}); "
            f"map it with data.roles, e.g. {{{role_name}: assistant}}",
        )
    role = keys.roles[role_name]
    calls: tuple[dict, ...] = ()
    if role == "tool_call":  # ShareGPT: the turn's text is the call itself
        calls, role = _calls(item.get(keys.content), where), "assistant"
        text: Any = ""
    else:
        text = item.get(keys.content)
        if isinstance(text, list):
            text, calls = _parts(text, where)
        if item.get("tool_calls") or item.get("function_call"):
            calls += _calls(item.get("tool_calls") or item["function_call"], where)
            text = text or ""
    if text is None:
        raise BadRowError(f"{where}: missing '{keys.content}'")
    if not isinstance(text, str):
        raise BadRowError(f"{where}: '{keys.content}' should be text, got {type(text).__name__}")
    if calls and role != "assistant":
        raise BadRowError(f"{where}: only an assistant turn can call a function (this one is {role})")
    text = _reasoned(item.get("reasoning_content"), text, role, where)
    name, call_id = item.get("name"), item.get("tool_call_id")
    return Turn(
        role,
        text,
        trained=_weight(item, role, where),
        tool_calls=calls,
        name=name if isinstance(name, str) else None,
        tool_call_id=call_id if isinstance(call_id, str) else None,
    )


def _reasoned(reasoning: Any, text: str, role: str, where: str) -> str:
    """The turn's text with its `reasoning_content` (DeepSeek, Qwen3) as a <think> block before it."""
    if reasoning is None or reasoning == "":
        return text
    if not isinstance(reasoning, str):
        raise BadRowError(f"{where}: 'reasoning_content' should be text, got {type(reasoning).__name__}")
    if role != "assistant":
        raise BadRowError(f"{where}: 'reasoning_content' on a {role} turn: only an assistant reply reasons")
    if "</think>" in text:
        raise BadRowError(
            f"{where}: both 'reasoning_content' and a <think> block in the text; keep the reasoning in one of them"
        )
    return with_reasoning(reasoning, text)


def check_turns(turns: list[Turn]) -> tuple[Turn, ...]:
    """A conversation a model can learn from: one leading system turn at most, an assistant turn,
    no empty reply, tool outputs only after a call; calls without an id get one (`_with_call_ids`)."""
    if not turns:
        raise BadRowError("the conversation has no turns")
    if not any(t.role == "assistant" for t in turns):
        raise BadRowError("the conversation has no assistant turn to learn from")
    called = False
    for i, turn in enumerate(turns, start=1):
        if turn.role == "system" and i != 1:
            raise BadRowError(f"turn {i}: a system turn may only come first")
        if turn.role == "assistant" and not turn.content.strip() and not turn.tool_calls:
            raise BadRowError(f"turn {i}: empty assistant reply")
        if turn.role == "tool" and not called:
            raise BadRowError(f"turn {i}: a tool's output with no function call before it")
        called = called or bool(turn.tool_calls)
    return tuple(_with_call_ids(turns))


def _with_call_ids(turns: list[Turn]) -> list[Turn]:
    """Give each call without an id one (call00001, call00002, ... per conversation, skipping ids the
    row uses), and each tool output without a `tool_call_id` the id of the call it answers: the call
    of the latest calling turn with the tool's `name`, else the first one not answered yet."""
    used = {c["id"] for t in turns for c in t.tool_calls if "id" in c}
    used |= {t.tool_call_id for t in turns if t.tool_call_id}
    numbers = (CALL_ID.format(n) for n in range(1, 100_000))
    out: list[Turn] = []
    open_calls: list[dict] = []  # calls of the latest calling turn that no output has answered yet
    for turn in turns:
        if turn.tool_calls:
            calls = []
            for call in turn.tool_calls:
                if "id" not in call:
                    call = {**call, "id": next(n for n in numbers if n not in used)}
                calls.append(call)
            turn, open_calls = replace(turn, tool_calls=tuple(calls)), list(calls)
        elif turn.role == "tool" and open_calls:
            if turn.tool_call_id is None:
                named = [c for c in open_calls if c["function"].get("name") == turn.name]
                answered = (named or open_calls)[0]
                turn = replace(turn, tool_call_id=answered["id"])
            open_calls = [c for c in open_calls if c["id"] != turn.tool_call_id]
        out.append(turn)
    return out


def history_turns(value: Any) -> list[Turn]:
    """Alpaca-style `history`: earlier rounds as [[instruction, output], ...], before this one."""
    if value is None or value == "" or value == []:
        return []
    value = json_value(value, "field 'history'")
    if not isinstance(value, list):
        raise BadRowError(
            f"field 'history' should be a list of [instruction, output] pairs, got {type(value).__name__}"
        )
    turns = []
    for i, pair in enumerate(value, start=1):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            raise BadRowError(f"history round {i}: expected [instruction, output], two texts")
        if not pair[1].strip():
            raise BadRowError(f"history round {i}: empty output")
        turns += [Turn("user", pair[0]), Turn("assistant", pair[1])]
    return turns
