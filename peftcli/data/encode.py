"""Tokenization and loss masks: an `Example` becomes `input_ids` + `labels` (-100 = no loss).

Masks are derived from character spans of the rendered text, mapped onto tokens through the fast
tokenizer's offsets. This works for any chat template (built-in or the model's own) without
`{% generation %}` markers, and it tokenizes the whole conversation at once, exactly as inference
will, so no token is split differently at a turn boundary.

What is trained, per `data.train_on` (spans.py finds the replies and their stop signal):
- completions: each assistant reply (its text and/or tool calls; or the completion / alpaca
  output) plus its end-of-turn marker (EOS for raw text), so the model learns to stop; never a
  tool's output, a reply marked `weight: 0`, a user or system turn;
- last_turn:   only the last assistant reply (+ its end marker);
- all:         every token of the example.

A text far longer than `max_length` tokens is not tokenized whole (a 50 MB row took 7 GB and minutes
to yield 64 tokens): only a prefix long enough to hold more than max_length tokens is, see
`_tokenize`. Texts that fit are tokenized whole, as before.

`data.overlong` then fits each example to max_length (`fit_blocks`): truncate, drop, error, or
split. `split` is pre-training: a plain text (format `text`) is cut into consecutive max_length
blocks, each an example of its own, so no token is dropped. The text is tokenized whole for it (pass
`max_length=None` to `encode`), and the blocks concatenate to exactly its tokens: BOS (where the
tokenizer adds one) only at the start of the first block, EOS only at the end of the last, as a
document cut from a pre-training stream; no BOS/EOS is added per block, which would either add tokens
the text does not hold or (LLaMA-Factory writes BOS over each block's first token) drop one. A
conversation or a prompt/completion pair is never split: a reply cut in two is not a reply
(`refuse_split`).
"""

from __future__ import annotations

import re
import weakref
from dataclasses import dataclass

from peftcli.data.formats import BadRowError, Example
from peftcli.data.spans import chat_spans
from peftcli.data.spans import special_token_ids as special_token_ids  # evaluation imports it from here
from peftcli.errors import UserError

IGNORE = -100
# Tokens past what is kept when a long text is tokenized by a prefix: the tokens next to the cut may
# be split differently than in the whole text, so these are tokenized and thrown away.
_SPARE_TOKENS = 16
_WORD_END = re.compile(r"\S(?=\s)")  # a cut here splits no word: pre-tokenizers split at whitespace
_LONGEST: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    labels: list[int]
    origin: str
    truncated: bool = False
    # False when only a prefix was tokenized: the example has more tokens than input_ids holds.
    complete: bool = True
    # data.overlong: split: this is block `block` (from 1) of the `blocks` its text was cut into.
    block: int = 1
    blocks: int = 1

    @property
    def trained_tokens(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE)


def raw_spans(tokenizer, example: Example, train_on: str) -> tuple[str, list[tuple[int, int]]]:
    eos = tokenizer.eos_token or ""
    text = example.prompt + example.completion + eos
    start = 0 if train_on == "all" else len(example.prompt)
    return text, [(start, len(text))]


def longest_token_chars(tokenizer) -> int:
    """L, the most characters one token can cover: the longest token string of the vocabulary, added
    tokens included. Byte-level BPE strings have one character per byte, and a text character is at
    least one byte, so they bound characters too. Computed once per tokenizer."""
    if tokenizer not in _LONGEST:
        strings = [*tokenizer.get_vocab(), *(t.content for t in tokenizer.added_tokens_decoder.values())]
        _LONGEST[tokenizer] = max((len(s) for s in strings), default=1) or 1
    return _LONGEST[tokenizer]


def _tokenize(tokenizer, text: str, add_special_tokens: bool, max_length: int | None):
    """Token ids and character offsets of `text`, and whether they are all of its tokens.

    Past max_length, only the first max_length + 1 tokens (enough to truncate, and to know the
    example is overlong) need to be exact. Each token covers at most L characters, so a prefix of
    (max_length + 1 + spare) * L characters already holds that many tokens plus spare ones; it is cut
    at a word end, and the spare tokens, the only ones a cut can change, are dropped. A tokenizer
    whose normaliser deletes characters can break the bound: then the prefix is doubled until the
    tokens are there, or the text is whole."""

    def run(part: str):
        enc = tokenizer(part, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
        return list(enc["input_ids"]), list(enc["offset_mapping"])

    need = None if max_length is None else max_length + 1 + _SPARE_TOKENS
    cut = len(text) if need is None else need * longest_token_chars(tokenizer)
    while cut < len(text):
        word_end = _WORD_END.search(text, cut - 1, cut + cut // 4 + 64)
        ids, offsets = run(text[: word_end.end() if word_end else cut])
        if need is not None and len(ids) >= need:
            return ids[:-_SPARE_TOKENS], offsets[:-_SPARE_TOKENS], False
        cut *= 2
    ids, offsets = run(text)
    return ids, offsets, True


def encode(tokenizer, example: Example, train_on: str, max_length: int | None = None) -> Encoded:
    """Tokenize one example with its loss mask. No length limit is applied here, but with
    `max_length` a text far longer than that is tokenized only as far as truncating it needs
    (`complete` is then False); its first max_length tokens and labels are what the whole
    text's would be."""
    if example.is_chat:
        text, spans = chat_spans(tokenizer, example, train_on)
        # Templates write their own BOS where the model expects one.
        ids, offsets, complete = _tokenize(tokenizer, text, False, max_length)
    else:
        text, spans = raw_spans(tokenizer, example, train_on)
        ids, offsets, complete = _tokenize(tokenizer, text, True, max_length)
    covered = len(text) if complete else max((b for _, b in offsets), default=0)
    trained = [False] * len(ids)
    for span_start, span_end in spans:  # each span already holds its reply's end marker
        if span_start >= covered:  # beyond the tokens kept, so truncated away in any case
            continue
        hit = False
        for j, (a, b) in enumerate(offsets):
            if b > a and a < span_end and b > span_start:
                trained[j] = hit = True
        if not hit:
            raise BadRowError("a trained span maps to no tokens (empty reply after tokenization)")
    labels = [token if keep else IGNORE for token, keep in zip(ids, trained)]
    return Encoded(ids, labels, example.origin, complete=complete)


def fit_length(item: Encoded, max_length: int, overlong: str) -> Encoded | None:
    """Apply data.overlong truncate or drop. Returns None when the example is dropped."""
    if overlong == "split":  # one example becomes several: only fit_blocks can return them
        raise ValueError("data.overlong: split is applied by fit_blocks, not fit_length")
    if len(item.input_ids) <= max_length:
        return item
    if overlong == "drop":
        return None
    # overlong == "error" is handled by the caller, which knows how to phrase it for the user.
    cut = Encoded(item.input_ids[:max_length], item.labels[:max_length], item.origin, truncated=True, complete=False)
    return cut if cut.trained_tokens else None


def fit_blocks(item: Encoded, max_length: int, overlong: str) -> list[Encoded]:
    """Apply data.overlong: the examples `item` becomes (several with split; none when dropped)."""
    if overlong == "split":
        return split_blocks(item, max_length)
    fitted = fit_length(item, max_length, overlong)
    return [] if fitted is None else [fitted]


def split_blocks(item: Encoded, max_length: int) -> list[Encoded]:
    """`item` cut into consecutive blocks of max_length tokens (the last one shorter), which
    concatenate to exactly its tokens and labels. Needs every token: encode it with max_length=None.
    A block keeps the labels of its tokens, so a plain text trains every token of every block."""
    if not item.complete:
        raise ValueError("split_blocks needs the whole text tokenized: encode it with max_length=None")
    if len(item.input_ids) <= max_length:
        return [item]
    starts = range(0, len(item.input_ids), max_length)
    return [
        Encoded(
            item.input_ids[start : start + max_length],
            item.labels[start : start + max_length],
            item.origin,  # the row's own origin: evaluation matches examples to rows by it
            block=number,
            blocks=len(starts),
        )
        for number, start in enumerate(starts, 1)
    ]


def refuse_split(example: Example, key: str) -> None:
    """data.overlong: split cuts plain text only: a conversation, or a prompt/completion pair, cut
    into blocks would train replies cut in two, or blocks of prompt with nothing to learn."""
    if example.is_chat or example.prompt:
        what = "a conversation" if example.is_chat else "a prompt/completion pair"
        raise UserError(
            f"data.overlong: split: {key}: {example.origin} is {what}; split cuts plain text (format text) into "
            "max_length blocks, and a reply cut in two is not a reply",
            hint="use data.overlong: truncate, drop or error for this data, or train the plain text in a recipe of "
            "its own",
        )
