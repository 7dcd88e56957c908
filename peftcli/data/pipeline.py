"""The data stage, top to bottom: read sources -> normalise rows -> mix -> split -> tokenize + mask ->
fit to max_length. Produces exactly the `input_ids`/`labels` the trainer receives, plus statistics.

`peftcli data preview` and `peftcli train` both call `prepare_data`, so what the preview shows is
what the model trains on.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field

from peftcli import console
from peftcli.data.encode import Encoded, encode, fit_blocks, refuse_split
from peftcli.data.formats import (
    BadRowError,
    Example,
    alpaca_aliases,
    check_columns,
    detect_format,
    refuse_columns,
    rename_columns,
    to_example,
    turn_keys,
    unread_columns,
)
from peftcli.data.sources import BadRow, Row, read_source
from peftcli.data.templates import ChatTemplate, resolve_template, thinking_from_data
from peftcli.errors import UserError
from peftcli.recipe import DataSection, DataSource

_SHOWN_ROWS = 5  # how many skipped row numbers a report lists per reason

# What makes two reasons differ row by row while saying the same thing: numbers (a column, a turn,
# a character) and quoted text that is not a name (a row's own content; 'prompt' stays).
_ROW_DETAIL = re.compile(r"\d+|'(?![\w.-]{1,40}')[^']*'")


def reason_kind(reason: str) -> str:
    """`reason` less its row-specific details: the rows skipped for one kind of fault are counted
    together, so a thousand broken lines make one line of the report, not a thousand."""
    return _ROW_DETAIL.sub("#", reason)


@dataclass
class SplitStats:
    """Counts for one split; lands in metrics.json under `data`."""

    rows: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    truncated: int = 0
    split: int = 0  # examples cut into max_length blocks (data.overlong: split); `rows` counts the blocks
    dropped: int = 0
    skipped: int = 0
    # The first row's reason of each kind of fault -> the first few rows skipped for it, and how many.
    skipped_reasons: dict[str, list[str]] = field(default_factory=dict)
    skipped_counts: dict[str, int] = field(default_factory=dict)
    formats: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # reason_kind -> the reason shown for it; not a field, so not written to metrics.json.
        self._kinds = {reason_kind(reason): reason for reason in self.skipped_reasons}

    def skip(self, origin: str, reason: str) -> None:
        self.skipped += 1
        shown_as = self._kinds.setdefault(reason_kind(reason), reason)
        self.skipped_counts[shown_as] = self.skipped_counts.get(shown_as, 0) + 1
        shown = self.skipped_reasons.setdefault(shown_as, [])
        if len(shown) < _SHOWN_ROWS:
            shown.append(origin)

    def skipped_lines(self) -> list[str]:
        """One line per kind of fault: its first row's reason, how many rows, and the first of them."""
        lines = []
        for reason, origins in self.skipped_reasons.items():
            count = self.skipped_counts.get(reason, len(origins))
            more = f" and {count - len(origins):,} more" if count > len(origins) else ""
            lines.append(f"{reason}: {count:,} row{'s' if count > 1 else ''} ({', '.join(origins)}{more})")
        return lines

    def first_skipped(self) -> str:
        """The first skipped row and its reason, for an error saying that nothing was left."""
        return next((f"; the first, {rows[0]}: {reason}" for reason, rows in self.skipped_reasons.items()), "")


@dataclass
class PreparedData:
    train: list[Encoded]
    eval: list[Encoded]
    template: ChatTemplate | None
    train_stats: SplitStats
    eval_stats: SplitStats
    eval_examples: list[Example] = field(default_factory=list)  # before tokenization: prompts + references


@dataclass
class _Examples:
    """Examples read from a list of sources (one list per source), and what was skipped on the way."""

    per_source: list[list[Example]]
    stats: SplitStats


def read_examples(sources: list[DataSource], data: DataSection, key: str) -> _Examples:
    """Rows of every source as Examples, with what was skipped; no tokenizer needed (validate)."""
    stats = SplitStats()
    per_source: list[list[Example]] = []
    for index, source in enumerate(sources):
        where = key if len(sources) == 1 else f"{key}[{index}]"
        rows = read_source(source, where, data.text_split)
        columns_map = source.columns if source.columns is not None else data.columns
        good = [rename_columns(r.values, columns_map) for r in rows if isinstance(r, Row)]
        if not good:
            raise _no_usable_rows(where, source.path, rows, data.bad_rows)
        named = f"{where} ({source.path})"
        if (source.format or data.format) in ("auto", "alpaca"):
            aliases = alpaca_aliases(set(good[0]), columns_map)
            if aliases:
                console.note(f"{named}: read as alpaca: " + ", ".join(f"{c} -> {f}" for f, c in aliases.items()))
                columns_map = {**columns_map, **aliases}
                good = [rename_columns(values, aliases) for values in good]
        refuse_columns(good, named)
        columns = list(good[0])
        fmt: str = source.format or data.format
        if fmt == "auto":
            fmt = detect_format(columns, named)
        else:
            check_columns(fmt, columns, named)
        keys = turn_keys(fmt, columns_map, source.roles if source.roles is not None else data.roles)
        examples = []
        skipped = SplitStats()  # this source's own, for the error when none of its rows is left
        for row in rows:
            try:
                if isinstance(row, BadRow):
                    raise BadRowError(row.reason)
                examples.append(to_example(fmt, rename_columns(row.values, columns_map), row.origin, keys))
            except BadRowError as exc:
                origin = row.origin
                if data.bad_rows == "error":
                    raise UserError(
                        f"{where}: {origin}: {exc}",
                        hint="fix the row, or set data.bad_rows: skip to skip and count bad rows",
                    ) from None
                stats.skip(origin, str(exc))
                skipped.skip(origin, str(exc))
        if not examples:
            raise _all_bad(where, source.path, skipped)
        stats.formats[fmt] = stats.formats.get(fmt, 0) + len(examples)
        _say_unread(named, fmt, good, keys)
        per_source.append(examples)
    return _Examples(per_source, stats)


def _no_usable_rows(where: str, path: str, rows: list[Row | BadRow], bad_rows: str) -> UserError:
    """The error for a source none of whose rows could be read: why its first row could not (with
    data.bad_rows: error, as for any bad row), or that it holds no rows at all."""
    bad = [row for row in rows if isinstance(row, BadRow)]
    if not bad:
        return UserError(
            f"{where}: {path} has no usable rows: it holds no rows at all (only blank lines, or a header alone)",
            hint="add rows to it, or remove it from the recipe",
        )
    if bad_rows == "error":
        return UserError(
            f"{where}: {bad[0].origin}: {bad[0].reason}",
            hint="fix the row, or set data.bad_rows: skip to skip and count bad rows",
        )
    skipped = SplitStats()
    for row in bad:
        skipped.skip(row.origin, row.reason)
    return _all_bad(where, path, skipped)


def _all_bad(where: str, path: str, skipped: SplitStats) -> UserError:
    """data.bad_rows: skip has skipped every row of a source: why the first one is bad."""
    count = "its one row" if skipped.skipped == 1 else f"all {skipped.skipped:,} rows"
    return UserError(
        f"{where}: every row of {path} was skipped as bad ({count}, data.bad_rows: skip){skipped.first_skipped()}",
        hint="fix the rows; data.bad_rows: error stops at the first bad row with its reason",
    )


def _say_unread(where: str, fmt: str, rows: list[dict], keys) -> None:
    """One warning per source naming what its format does not read: nothing is dropped silently."""
    columns = set().union(*(values.keys() for values in rows))
    unread = unread_columns(fmt, columns)
    if unread:
        console.warn(
            f"{where}: ignored columns: {', '.join(unread)} (format {fmt} does not read them; "
            "map one with data.columns if it holds a field)"
        )
    if keys.unread:
        console.warn(f"{where}: ignored keys inside turns: {', '.join(sorted(keys.unread))}")


def _hold_out(per_source: list[list[Example]], fraction: float, seed: int) -> tuple[list[list[Example]], list[Example]]:
    """Hold out `fraction` of every source (seeded) before any mixing, so that no row, nor a repeat
    of it made by weighted mixing, is both trained on and evaluated."""
    rng = random.Random(seed)
    total = sum(len(examples) for examples in per_source)
    train_parts, held = [], []
    for examples in per_source:
        order = examples[:]
        rng.shuffle(order)
        cut = round(len(order) * fraction)
        held += order[:cut]
        train_parts.append(order[cut:])
    if not held:  # a tiny dataset: hold out one row of the largest source
        largest = max(range(len(train_parts)), key=lambda i: len(train_parts[i]))
        held.append(train_parts[largest].pop(0))
    if not any(train_parts):
        raise UserError(f"data.eval_split {fraction} leaves no training rows ({total} rows in all)")
    return train_parts, held


def _mix(per_source: list[list[Example]], sources: list[DataSource], seed: int) -> list[Example]:
    """Combine sources. With weights, source i contributes weight_i / sum(weights) of the mix (same
    total size as all sources together), sampled without replacement while it has rows, then repeated."""
    if len(per_source) == 1 or all(s.weight is None for s in sources):
        return [e for examples in per_source for e in examples]
    rng = random.Random(seed)
    # A source left empty (all its rows held out for eval) has no share to give.
    pairs = [
        (examples, s.weight if s.weight is not None else 1.0) for examples, s in zip(per_source, sources) if examples
    ]
    total = sum(len(examples) for examples, _ in pairs)
    weight_sum = sum(weight for _, weight in pairs)
    mixed: list[Example] = []
    for examples, weight in pairs:
        want = round(total * weight / weight_sum)
        order = examples[:]
        rng.shuffle(order)
        mixed.extend(order[i % len(order)] for i in range(want))
    rng.shuffle(mixed)
    return mixed


def split_train(per_source: list[list[Example]], data: DataSection, seed: int) -> tuple[list[Example], list[Example]]:
    """The examples training takes from data.train's sources (read in order): data.eval_split held
    out, then the sources mixed by weight; and the held-out rows. `tune` counts its steps from these."""
    held: list[Example] = []
    if data.eval_split is not None:
        per_source, held = _hold_out(per_source, data.eval_split, seed)
    return _mix(per_source, data.train, seed), held


def _needs_chat(per_source: list[list[Example]]) -> bool:
    return any(e.is_chat for examples in per_source for e in examples)


def _encode_all(examples: list[Example], tokenizer, data: DataSection, stats: SplitStats, key: str) -> list[Encoded]:
    out: list[Encoded] = []
    split = data.overlong == "split"
    for example in examples:
        if split:
            refuse_split(example, key)
        try:
            # split trains every token, so it needs them all; the others need only what max_length keeps
            item = encode(tokenizer, example, data.train_on, None if split else data.max_length)
        except BadRowError as exc:
            if data.bad_rows == "error":
                raise UserError(f"{key}: {example.origin}: {exc}", hint="or set data.bad_rows: skip") from None
            stats.skip(example.origin, str(exc))
            continue
        if len(item.input_ids) > data.max_length and data.overlong == "error":
            # A very long text is tokenized only until it is known to be over (see encode).
            count = f"{len(item.input_ids)} tokens" if item.complete else f"more than {data.max_length} tokens"
            raise UserError(
                f"{key}: {example.origin}: {count}, over data.max_length {data.max_length}",
                hint="raise data.max_length, or set data.overlong: truncate | drop",
            )
        pieces = fit_blocks(item, data.max_length, data.overlong)
        if not pieces:
            stats.dropped += 1
            continue
        stats.split += len(pieces) > 1
        for fitted in pieces:
            stats.truncated += fitted.truncated
            stats.rows += 1
            stats.tokens += len(fitted.input_ids)
            stats.trained_tokens += fitted.trained_tokens
            out.append(fitted)
    if not out:
        raise UserError(
            f"{key}: no usable examples left (dropped {stats.dropped}, skipped {stats.skipped})"
            + stats.first_skipped(),
            hint="check data.max_length and data.overlong, or the data itself",
        )
    return out


def prepare_data(
    data: DataSection, tokenizer, seed: int, eval_only: list[DataSource] | None = None, eval_key: str = "data.eval"
) -> PreparedData:
    """Everything the trainer (or `eval --data`) needs from the data section. `eval_key` names the eval
    sources in errors: `eval --reference FILE` is no `data.eval`."""
    train_read = None if eval_only else read_examples(data.train, data, "data.train")
    eval_sources = eval_only or data.eval
    eval_read = read_examples(eval_sources, data, eval_key) if eval_sources else None

    chat = any(r is not None and _needs_chat(r.per_source) for r in (train_read, eval_read))
    template = resolve_template(data.chat_template, tokenizer) if chat or data.chat_template != "auto" else None

    train_examples: list[Example] = []
    eval_examples: list[Example] = []
    eval_stats = eval_read.stats if eval_read else SplitStats()
    if train_read is not None:
        train_examples, eval_examples = split_train(train_read.per_source, data, seed)
        if template is not None:  # generation prompts in the thinking mode of the trained rows
            template = thinking_from_data(tokenizer, template, train_examples)
    if eval_read is not None:
        eval_examples = [e for examples in eval_read.per_source for e in examples]

    train_stats = train_read.stats if train_read else SplitStats()
    train = _encode_all(train_examples, tokenizer, data, train_stats, "data.train") if train_read else []
    evaluation = _encode_all(eval_examples, tokenizer, data, eval_stats, eval_key) if eval_examples else []
    return PreparedData(train, evaluation, template, train_stats, eval_stats, eval_examples)
