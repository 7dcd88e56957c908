"""Where the trained replies lie in a rendered conversation, and what ends each one.

A trained reply's span runs from the first character the model would write after the generation
prompt to the end of the template's end-of-turn marker, the whitespace before the marker included
(Llama 2 writes `reply </s>`). A reply is the assistant's text and/or its tool calls, in the
template's own syntax. Tool outputs (`tool` turns), replies marked not to train (`weight: 0`),
user and system turns are never trained.

Finding a reply: the conversation up to it is rendered with the generation prompt, and again with
the reply included; the difference, less what the template writes after any reply (learnt once
from a probe), is the reply as the template writes it. Where a template renders history
differently from a prefix (Qwen3 drops think blocks of earlier replies), the reply is searched for
in the whole conversation instead, after the turn before it.

Reasoning: a reply with a <think> block is rendered in thinking mode. A template that keeps only
the text after `</think>` even in the last reply (DeepSeek-R1-distill's) would train the answer
without its reasoning: such a row is refused (REASONING_DROPPED), never trained silently. Dropping
the reasoning of earlier replies (Qwen3, R1) is how those templates render history at inference
too, so those replies are trained as the template writes them.

The stop signal: every trained reply ends in a token the model can emit. That is the end-of-turn
marker when it is one special token of the tokenizer. Otherwise (ChatML's `<|im_end|>` on a base
model that lacks it, a template from another family), the tokenizer's EOS is inserted after the
marker and trained with it, unless the template already writes EOS there.
"""

from __future__ import annotations

import json
import weakref
from dataclasses import dataclass

from rich.markup import escape

from peftcli import console
from peftcli.data.formats import BadRowError, Example
from peftcli.data.templates import render, render_raw
from peftcli.data.turns import carries_reasoning, reasoning_of

# A reply no template rewrites, to learn what a template writes after a reply.
PROBE = "peftcli-probe-reply"
# Reasons name no tool or value of the row, so that skipped rows group under one reason each.
CANNOT_RENDER_TOOLS = (
    "the chat template cannot render tool calls ({why}); set data.chat_template to one that can "
    "(e.g. chatml, or the model's own template if it supports tools)"
)
REASONING_DROPPED = (
    "the chat template removes the reasoning (<think> block) from the last reply, as "
    "DeepSeek-R1-distill templates do (they keep only the text after </think>), so the reply would be "
    "trained without it; to train the reasoning, set data.chat_template to a template that keeps it "
    "(a copy of this one without the split on '</think>', or chatml); to train answers alone, take "
    "the reasoning out of the data"
)
_MARKERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class EndMarker:
    """What the tokenizer's current template writes after a reply."""

    tail: str | None  # everything after the reply in a one-reply conversation (None: unknown)
    core: str  # the end-of-turn marker at its start, without leading whitespace ("" when none)
    special: bool  # `core` is one special token of the tokenizer: the model's stop signal


def special_token_ids(tokenizer) -> set[int]:
    """Ids of every special token, the added ones (chat markers) included."""
    ids = set(tokenizer.all_special_ids)
    ids.update(i for i, token in tokenizer.added_tokens_decoder.items() if token.special)
    return ids


def special_token_strings(tokenizer) -> list[str]:
    """The text of every special token, longest first (so `<|im_end|>` wins over a shorter prefix)."""
    strings = set(tokenizer.all_special_tokens)
    strings.update(t.content for t in tokenizer.added_tokens_decoder.values() if t.special)
    return sorted((s for s in strings if s), key=len, reverse=True)


def end_marker(tokenizer) -> EndMarker:
    """The end marker of the tokenizer's template, learnt from a probe once per tokenizer and
    template. A marker that is not a special token is said once here, not once per row."""
    key = str(tokenizer.chat_template)
    known = _MARKERS.setdefault(tokenizer, {})
    if key not in known:
        known[key] = _probe_marker(tokenizer)
        _warn_if_no_stop_token(tokenizer, known[key])
    return known[key]


def _probe_marker(tokenizer) -> EndMarker:
    specials = special_token_strings(tokenizer)
    try:
        text = render_raw(tokenizer, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": PROBE}])
    except Exception:  # noqa: BLE001 - resolve_template checked the template; a marker stays unknown
        text = ""
    at = text.find(PROBE)
    if at < 0:
        return EndMarker(None, "", False)
    tail = text[at + len(PROBE) :]
    rest = tail.lstrip()
    core = next((s for s in specials if rest.startswith(s)), None)
    if core is None and rest:
        # The marker is the first run of non-space text, up to and with a special token inside it
        # (`<|end|>` of `<|end|>\n<|endoftext|>`).
        chunk = rest.split(None, 1)[0]
        cut = min((chunk.find(s) + len(s) for s in specials if s in chunk), default=len(chunk))
        core = chunk[:cut]
    return EndMarker(tail, core or "", bool(core) and core in specials)


def _warn_if_no_stop_token(tokenizer, marker: EndMarker) -> None:
    if marker.special:
        return
    eos = tokenizer.eos_token
    if marker.core:
        what = f"the end-of-turn marker {marker.core} is not a special token of this tokenizer"
    elif marker.tail is not None:
        what = "the chat template writes no end-of-turn marker after a reply"
    else:
        what = "could not tell what the chat template writes after a reply"
    if eos:
        consequence = f"the model learns to stop by the EOS {eos} appended after it"
    else:
        consequence = "and the tokenizer has no EOS token: the model may not learn to stop"
    console.warn(escape(f"{what}: {consequence}"))


def chat_spans(tokenizer, example: Example, train_on: str) -> tuple[str, list[tuple[int, int]]]:
    """Render a conversation, with EOS inserted where a reply needs one to stop, and return the
    text with the character span of each trained reply (the whole text for `all`)."""
    turns = example.turns
    # A reply that writes its own think block is trained with it, in thinking mode; otherwise
    # templates that take `enable_thinking` render in the mode the template records (templates.py).
    thinking = True if carries_reasoning(turns) else None
    full = _render_whole(tokenizer, example, thinking)
    _check_reasoning_kept(turns, full)
    marker = end_marker(tokenizer)
    assistants = [i for i, turn in enumerate(turns) if turn.role == "assistant"]
    if train_on == "all":
        if marker.special:
            return full, [(0, len(full))]
        bodies: list[tuple[int, int]] = []
        for i in assistants:  # only to place the EOS after each reply: a reply not found gets none
            try:
                bodies.append(_locate(tokenizer, example, i, full, bodies[-1][1] if bodies else 0, thinking, marker))
            except BadRowError:
                continue
        text, _ = _with_stops(tokenizer, full, bodies, marker)
        return text, [(0, len(text))]
    chosen = assistants[-1:] if train_on == "last_turn" else assistants
    chosen = [i for i in chosen if turns[i].trained]
    if not chosen:
        which = "the last assistant reply is" if train_on == "last_turn" else "every assistant reply is"
        raise BadRowError(f"nothing to learn: {which} marked not to train (weight 0)")
    bodies = []  # the located replies so far: each is searched for after the one before
    for i in chosen:
        bodies.append(_locate(tokenizer, example, i, full, bodies[-1][1] if bodies else 0, thinking, marker))
    return _with_stops(tokenizer, full, bodies, marker)


def _check_reasoning_kept(turns, full: str) -> None:
    """Refuse a row whose last reply's reasoning the template leaves out (see REASONING_DROPPED)."""
    last = next((t for t in reversed(turns) if t.role == "assistant"), None)
    reasoning = reasoning_of(last.content) if last is not None else ""
    if reasoning and reasoning not in full:
        raise BadRowError(REASONING_DROPPED)


def _render_whole(tokenizer, example: Example, thinking: bool | None) -> str:
    """The whole conversation. A template that raises on, or drops, tool calls, tool outputs or
    tool schemas makes a row it cannot train: say so, and what to do."""
    turns = example.turns
    calls = [call for turn in turns for call in turn.tool_calls]
    outputs = [turn.content.strip() for turn in turns if turn.role == "tool" and turn.content.strip()]
    if not (calls or outputs or example.tools):
        return render(tokenizer, turns, thinking=thinking)
    try:
        full = render_raw(tokenizer, turns, tools=example.tools, thinking=thinking)
    except Exception as exc:  # noqa: BLE001 - jinja and templates raise anything
        raise BadRowError(CANNOT_RENDER_TOOLS.format(why=f"it raised: {_first_line(exc)}")) from None
    for call in calls:
        if _name(call) not in full:
            raise BadRowError(CANNOT_RENDER_TOOLS.format(why="it drops function calls"))
    for tool in example.tools:
        if _name(tool) not in full:
            raise BadRowError(CANNOT_RENDER_TOOLS.format(why="it drops tool schemas"))
    for output in outputs:
        # Templates that write tool outputs as JSON (Llama 3.1) escape them.
        if output not in full and json.dumps(output, ensure_ascii=False)[1:-1] not in full:
            raise BadRowError(CANNOT_RENDER_TOOLS.format(why="it drops tool outputs"))
    return full


def _locate(
    tokenizer, example: Example, i: int, full: str, cursor: int, thinking: bool | None, marker: EndMarker
) -> tuple[int, int]:
    """The span of reply `i` in `full` (its text and tool calls, without the end marker)."""
    turns, turn = example.turns, example.turns[i]
    gen = _try_render(tokenizer, turns[:i], True, example, thinking)
    done = _try_render(tokenizer, turns[: i + 1], False, example, thinking)
    body = ""
    if gen is not None and done is not None and done.startswith(gen):
        body = _without_tail(done[len(gen) :], marker)
        for call in turn.tool_calls:
            if _name(call) not in body:
                raise BadRowError(CANNOT_RENDER_TOOLS.format(why="it drops function calls"))
    # Where the reply starts when the template renders the history as a prefix (almost all do).
    at = len(gen) if gen is not None and full.startswith(gen) and len(gen) >= cursor else None
    if at is not None and body.strip() and full.startswith(body, at):
        return at, at + len(body)
    if not body.strip():
        if turn.tool_calls:
            raise BadRowError(
                f"turn {i + 1}: the chat template renders this reply's tool calls differently in a prefix "
                "of the conversation, so its tokens cannot be masked reliably"
            )
        body = turn.content
    needle = body.strip()
    if at is not None:
        search_from = at
    else:
        # A template that renders history differently (e.g. drops earlier reasoning): start after
        # the turn just before this reply, so a reply quoted in the user's message is not taken.
        before = turns[i - 1].content.strip() if i else ""
        anchor = full.find(before, cursor) if before else -1
        search_from = anchor + len(before) if anchor >= 0 else cursor
    start = full.find(needle, search_from) if needle else -1
    if start < 0 and "</think>" in needle:
        # A template that drops the reasoning of earlier replies (Qwen3) still writes their answer.
        needle = needle.split("</think>")[-1].strip()
        start = full.find(needle, search_from) if needle else -1
    if start < 0:
        raise BadRowError(
            f"turn {i + 1}: the chat template does not reproduce the assistant reply verbatim, "
            "so its tokens cannot be masked reliably"
        )
    return start, start + len(needle)


def _try_render(tokenizer, turns, generation: bool, example: Example, thinking: bool | None) -> str | None:
    # A part of a conversation may be refused where the whole is not (a reply first, say): then
    # the reply is searched for instead.
    try:
        return render_raw(tokenizer, turns, generation, tools=example.tools, thinking=thinking)
    except Exception:  # noqa: BLE001 - jinja and templates raise anything
        return None


def _without_tail(segment: str, marker: EndMarker) -> str:
    """A reply as the template writes it, less what follows every reply (marker, separator)."""
    if marker.tail and segment.endswith(marker.tail):
        segment = segment[: -len(marker.tail)]
    elif marker.core and marker.core in segment:
        segment = segment[: segment.rfind(marker.core)]
    return segment.rstrip()  # whitespace before the marker is trained with the marker


def _with_stops(tokenizer, full: str, bodies: list[tuple[int, int]], marker: EndMarker):
    """Extend each reply's span over its end marker, inserting EOS after markers that are not one
    special token. Returns the text (with the insertions) and the shifted spans."""
    eos = tokenizer.eos_token or ""
    specials = special_token_strings(tokenizer)
    parts, spans, pos, shift = [], [], 0, 0
    for n, (start, end) in enumerate(bodies):
        stop, insert = _stop_after(full, end, marker, eos, specials)
        if n + 1 < len(bodies):
            stop = min(stop, bodies[n + 1][0])
        parts.append(full[pos:stop])
        span_start = start + shift
        if insert:
            parts.append(eos)
            shift += len(eos)
        spans.append((span_start, stop + shift))
        pos = stop
    parts.append(full[pos:])
    return "".join(parts), spans


def _stop_after(full: str, end: int, marker: EndMarker, eos: str, specials: list[str]) -> tuple[int, bool]:
    """Where the trained text after a reply ending at `end` stops, and whether EOS goes there."""
    rest = full[end:]
    gap = len(rest) - len(rest.lstrip())
    after = rest[gap:]
    if marker.core and after.startswith(marker.core):
        stop, special = end + gap + len(marker.core), marker.special
    else:
        # The template wrote something else after this reply: a special token there still ends it.
        token = next((s for s in specials if after.startswith(s)), None)
        stop, special = (end + gap + len(token), True) if token else (end, False)
    if special or not eos:
        return stop, False
    rest = full[stop:]
    gap = len(rest) - len(rest.lstrip())
    if rest[gap:].startswith(eos):  # the template writes EOS itself (Phi-3, at a conversation's end)
        return stop + gap + len(eos), False
    return stop, True


def _name(item: dict) -> str:
    """The function name of a tool call or tool schema (OpenAI style, or bare)."""
    function = item.get("function", item)
    return str(function.get("name", "")) if isinstance(function, dict) else ""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else exc.__class__.__name__
