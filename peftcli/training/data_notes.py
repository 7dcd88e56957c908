"""What the data stage did that the user may not expect, said once before training starts: rows
skipped as bad, examples truncated or dropped, and how packing keeps examples apart."""

from __future__ import annotations

from peftcli import console as cli_console
from peftcli.recipe import Recipe
from peftcli.training.setup import Setup


def report_data(setup: Setup, trainer, recipe: Recipe) -> None:
    """Say what the data stage did that the user may not expect: skips, drops, packing."""
    for name, stats in (("train", setup.data.train_stats), ("eval", setup.data.eval_stats)):
        if stats.skipped:
            reasons = "; ".join(stats.skipped_lines())
            cli_console.warn(f"data.{name}: skipped {stats.skipped} bad rows (data.bad_rows: skip): {reasons}")
        if stats.dropped or stats.truncated:
            cli_console.note(
                f"data.{name}: {stats.truncated} examples truncated, {stats.dropped} dropped "
                f"(longer than data.max_length {recipe.data.max_length}, data.overlong: {recipe.data.overlong})"
            )
        if stats.split:
            cli_console.note(
                f"data.{name}: {stats.split} texts longer than data.max_length {recipe.data.max_length} cut into "
                f"blocks (data.overlong: split): {stats.rows} examples, no token dropped"
            )
    if setup.settings.packing:
        cli_console.note(describe_packing(trainer, setup))


def describe_packing(trainer, setup: Setup) -> str:
    settings = setup.settings
    rows = len(trainer.train_dataset)
    layout = (
        "each batch is one padding-free row cut at example boundaries"
        if settings.packing_layout == "varlen"
        else "each batch keeps its rows (no varlen kernel here)"
    )
    return (
        f"packing: {len(setup.data.train)} examples into {rows} rows of up to data.max_length; {layout}; "
        f"examples stay apart via {settings.attention}"
    )
