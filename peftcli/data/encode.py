"""Tokenization and loss masks: an `Example` becomes `input_ids` + `labels` (-100 = no loss).

Masks are derived from character spans of the rendered text, mapped onto tokens through the fast
tokenizer's offsets. This works for any chat template (built-in or the model's own) without
`{% generation %}` markers, and it tokenizes the whole conversation at once, exactly as inference
will, so no token is split differently at a turn boundary.

What is trained, per `data.train_on`:
- completions: each assistant reply (or the completion / alpaca output) plus the end-of-turn
  token the template writes right after it (EOS for raw text), so the model learns to stop;
- last_turn:   only the last assistant reply (+ its end token);
- all:         every token of the example.
"""

from __future__ import annotations

from dataclasses import dataclass

from peftcli.data.formats import BadRowError, Example
from peftcli.data.templates import render

IGNORE = -100


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    labels: list[int]
    origin: str
    truncated: bool = False

    @property
    def trained_tokens(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE)


def special_token_ids(tokenizer) -> set[int]:
    """Ids of every special token, the added ones (chat markers) included."""
    ids = set(tokenizer.all_special_ids)
    ids.update(i for i, token in tokenizer.added_tokens_decoder.items() if token.special)
    return ids


def chat_spans(tokenizer, example: Example, train_on: str) -> tuple[str, list[tuple[int, int]]]:
    """Render a conversation and find the character span of each trained assistant reply."""
    turns = example.turns
    full = render(tokenizer, turns)
    if train_on == "all":
        return full, [(0, len(full))]
    replies = [i for i, turn in enumerate(turns) if turn.role == "assistant"]
    if train_on == "last_turn":
        replies = replies[-1:]
    spans, cursor = [], 0
    for i in replies:
        # Where the reply starts: right after the rendered history + generation prompt, when the
        # template renders prefixes consistently (almost all do); else the next match after the
        # previous reply.
        prefix = render(tokenizer, turns[:i], add_generation_prompt=True)
        if full.startswith(prefix):
            search_from = max(len(prefix), cursor)
        else:
            # A template that renders history differently (e.g. drops earlier reasoning): start after
            # the turn just before this reply, so a reply quoted in the user's message is not taken.
            before = turns[i - 1].content.strip() if i else ""
            anchor = full.find(before, cursor) if before else -1
            search_from = anchor + len(before) if anchor >= 0 else cursor
        content = turns[i].content.strip()
        start = full.find(content, search_from)
        if start < 0:
            raise BadRowError(
                f"turn {i + 1}: the chat template does not reproduce the assistant reply verbatim, "
                "so its tokens cannot be masked reliably"
            )
        spans.append((start, start + len(content)))
        cursor = start + len(content)
    return full, spans


def raw_spans(tokenizer, example: Example, train_on: str) -> tuple[str, list[tuple[int, int]]]:
    eos = tokenizer.eos_token or ""
    text = example.prompt + example.completion + eos
    start = 0 if train_on == "all" else len(example.prompt)
    return text, [(start, len(text))]


def encode(tokenizer, example: Example, train_on: str) -> Encoded:
    """Tokenize one example with its loss mask (no length limit applied here)."""
    if example.is_chat:
        text, spans = chat_spans(tokenizer, example, train_on)
        # Templates write their own BOS where the model expects one.
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    else:
        text, spans = raw_spans(tokenizer, example, train_on)
        enc = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    trained = [False] * len(ids)
    special = special_token_ids(tokenizer)
    for span_start, span_end in spans:
        last = -1
        for j, (a, b) in enumerate(offsets):
            if b > a and a < span_end and b > span_start:
                trained[j] = True
                last = j
        if last < 0:
            raise BadRowError("a trained span maps to no tokens (empty reply after tokenization)")
        if example.is_chat and train_on != "all":
            # Also learn the end-of-turn token right after the reply (skipping whitespace).
            j = last + 1
            while j < len(ids) and ids[j] not in special and not text[offsets[j][0] : offsets[j][1]].strip():
                j += 1
            if j < len(ids) and ids[j] in special:
                trained[j] = True
    labels = [token if keep else IGNORE for token, keep in zip(ids, trained)]
    return Encoded(list(ids), labels, example.origin)


def fit_length(item: Encoded, max_length: int, overlong: str) -> Encoded | None:
    """Apply data.overlong. Returns None when the example is dropped."""
    if len(item.input_ids) <= max_length:
        return item
    if overlong == "drop":
        return None
    # overlong == "error" is handled by the caller, which knows how to phrase it for the user.
    cut = Encoded(item.input_ids[:max_length], item.labels[:max_length], item.origin, truncated=True)
    return cut if cut.trained_tokens else None
