"""`peftcli data preview`: the first examples exactly as the model will see them — every token, with
the ones that carry loss highlighted — and the statistics of the whole dataset.

It runs the same `prepare_data` as training, so a mask that looks right here is the mask that is
trained. `--json` prints one object per example (`text`, `input_ids`, `labels`) for scripts.
"""

from __future__ import annotations

import json
import random

from rich.table import Table
from rich.text import Text

from peftcli.data.encode import IGNORE, Encoded
from peftcli.data.pipeline import PreparedData, SplitStats


def estimated_padding(items: list[Encoded], batch_size: int, seed: int) -> float:
    """Padding share of randomly ordered, right-padded batches (what training without packing pays)."""
    lengths = [len(i.input_ids) for i in items]
    random.Random(seed).shuffle(lengths)
    padded = real = 0
    for start in range(0, len(lengths), batch_size):
        chunk = lengths[start : start + batch_size]
        real += sum(chunk)
        padded += max(chunk) * len(chunk) - sum(chunk)
    return padded / (padded + real) if real else 0.0


def example_json(tokenizer, item: Encoded) -> str:
    return json.dumps(
        {
            "origin": item.origin,
            "text": tokenizer.decode(item.input_ids),
            "input_ids": item.input_ids,
            "labels": item.labels,
        },
        ensure_ascii=False,
    )


def decoded_runs(tokenizer, item: Encoded) -> list[tuple[str, bool]]:
    """The example as (text, trained) runs of consecutive tokens with the same label.

    A run is the decoded whole text up to its end, less the text before it: a character spread
    over several byte-level tokens (a curly quote, an accent, Chinese) decodes whole, and a
    leading space a decoder drops at the start of a text (SentencePiece) stays. Where a character
    straddles two runs (the text up to the boundary ends in U+FFFD), the boundary moves past it."""
    ids, labels = item.input_ids, item.labels
    bounds = [j for j in range(1, len(ids)) if (labels[j] == IGNORE) != (labels[j - 1] == IGNORE)]
    runs: list[tuple[str, bool]] = []
    done, start = "", 0
    for end in [*bounds, len(ids)] if ids else []:
        text = tokenizer.decode(ids[:end], clean_up_tokenization_spaces=False)
        if end < len(ids) and text.endswith("\ufffd"):
            continue  # a character straddles the boundary: this run takes the rest of its tokens
        # A decoder that rewrites earlier text as tokens are added: this run decoded alone.
        piece = (
            text[len(done) :]
            if text.startswith(done)
            else tokenizer.decode(ids[start:end], clean_up_tokenization_spaces=False)
        )
        runs.append((piece, labels[start] != IGNORE))
        done, start = text, end
    return runs


def render_example(tokenizer, item: Encoded, marks: bool = False) -> Text:
    """The example run by run: trained tokens in bold green, the rest dimmed. With `marks` (no
    colour: a log or a pipe), trained runs are bracketed as ⟦...⟧ instead."""
    text = Text()
    for piece, trained in decoded_runs(tokenizer, item):
        if marks and trained:
            piece = f"⟦{piece}⟧"
        text.append(piece, style="bold green" if trained else "dim")
    return text


def stats_table(data: PreparedData, batch_size: int, seed: int, packing: bool) -> Table:
    table = Table(title="dataset")
    table.add_column("")
    splits: list[tuple[str, SplitStats, list[Encoded]]] = [("train", data.train_stats, data.train)]
    if data.eval:
        splits.append(("eval", data.eval_stats, data.eval))
    for name, _, _ in splits:
        table.add_column(name, justify="right")
    rows: dict[str, list[str]] = {
        key: [] for key in ("rows", "tokens", "trained_tokens", "truncated", "split", "dropped", "skipped")
    }
    for _, stats, _ in splits:
        for key in rows:
            rows[key].append(f"{getattr(stats, key):,}")
    for key, values in rows.items():
        table.add_row(key.replace("_", " "), *values)
    table.add_row("formats", *[", ".join(f"{k} {v}" for k, v in stats.formats.items()) for _, stats, _ in splits])
    padding = "0 % (packed)" if packing else f"{100 * estimated_padding(data.train, batch_size, seed):.1f} % (est.)"
    table.add_row("padding", padding, *([""] * (len(splits) - 1)))
    return table


def show(
    tokenizer, data: PreparedData, rows: int, as_json: bool, recipe, out_console, packing: bool, batch_size: int
) -> None:
    """`packing`: whether training on this machine packs (then no padding is estimated); `batch_size`:
    the micro-batch it trains with (training.batch_size, or what auto picks)."""
    items = data.train[:rows]
    if as_json:
        for item in items:
            out_console.print(example_json(tokenizer, item), markup=False, highlight=False, soft_wrap=True)
        return
    template = data.template.name if data.template else "none (raw text)"
    marks = out_console.color_system is None
    legend = "⟦trained tokens⟧" if marks else "[bold green]trained tokens[/] / [dim]masked tokens[/]"
    out_console.print(f"chat template: {template}; loss on: {recipe.data.train_on}; {legend}")
    for item in items:
        out_console.rule(
            f"{item.origin}: {len(item.input_ids)} tokens, {item.trained_tokens} trained"
            + (" (truncated)" if item.truncated else "")
            + (f" (block {item.block} of {item.blocks})" if item.blocks > 1 else "")
        )
        out_console.print(render_example(tokenizer, item, marks))
    out_console.rule()
    out_console.print(stats_table(data, batch_size, recipe.training.seed, packing))
    for name, stats in (("train", data.train_stats), ("eval", data.eval_stats)):
        for line in stats.skipped_lines():  # one per kind of fault, with its count: not one per row
            out_console.print(f"skipped ({name}): {line}", markup=False)
