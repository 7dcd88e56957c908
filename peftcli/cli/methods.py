"""`peftcli methods`: the registry as a table — keys and defaults, mergeable, quantized base, and
(with `--model`) the trainable-parameter share each method gives on that model.

The share is computed by model/size.py on the model built from its config on PyTorch's meta device.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Annotated

import typer

from peftcli import console
from peftcli.errors import UserError

if TYPE_CHECKING:
    from peftcli.methods import Method


def _format_default(value) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def key_summary(method: Method) -> str:
    keys = method.keys()
    return ", ".join(f"{k}={_format_default(v)}" for k, v in keys.items()) if keys else "(none)"


def rows(model_path: str | None = None) -> list[dict[str, str]]:
    from peftcli.methods import REGISTRY
    from peftcli.model.load import trainable_share

    shares = trainable_share(model_path) if model_path else {}
    return [
        {
            "method": name,
            "what it trains": method.summary,
            "keys (defaults)": key_summary(method),
            "mergeable": "yes" if method.mergeable else "no",
            "quantized base": "yes" if method.quantized_base else "no",
            **({"trainable params": shares[name]} if shares else {}),
        }
        for name, method in REGISTRY.items()
    ]


def markdown_table(table: list[dict[str, str]]) -> str:
    header = list(table[0])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row[h].replace("|", "\\|") for h in header) + " |" for row in table]
    return "\n".join(lines)


# Columns that hold names a user types (`peft.method: adaption_prompt`): never cut inside a word.
NAME_COLUMNS = ("method",)
# Columns of `key=default, ...` lists: as wide as their longest item, so a key is never cut either.
LIST_COLUMNS = ("keys (defaults)",)


def print_table(table: list[dict[str, str]], console) -> None:
    from rich.table import Table

    view = Table(show_lines=True)
    for column in table[0]:
        if column in NAME_COLUMNS:
            longest = max(len(row[column]) for row in table)
            view.add_column(column, no_wrap=True, min_width=longest)
        elif column in LIST_COLUMNS:
            longest = max(len(item) for row in table for item in row[column].split())
            view.add_column(column, overflow="fold", min_width=longest)
        else:
            view.add_column(column, overflow="fold")
    for row in table:
        view.add_row(*row.values())
    console.print(view)


def json_rows(model_path: str | None = None) -> list[dict]:
    """`methods --json`: the registry with typed values (defaults as JSON, booleans, shares as text)."""
    from peftcli.methods import REGISTRY
    from peftcli.model.load import trainable_share

    shares = trainable_share(model_path) if model_path else {}
    return [
        {
            "method": name,
            "summary": method.summary,
            "keys": method.keys(),
            "mergeable": method.mergeable,
            "quantized_base": method.quantized_base,
            **({"trainable_params": shares[name]} if shares else {}),
        }
        for name, method in REGISTRY.items()
    ]


def methods(
    model: Annotated[
        str | None, typer.Option("--model", help="Model folder (or hub id): show each method's trainable share.")
    ] = None,
    markdown: Annotated[
        bool, typer.Option("--markdown", help="Print a Markdown table (as in docs/methods.md).")
    ] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the registry as a JSON list, one object per method.")
    ] = False,
) -> None:
    """List every PEFT method: its keys and defaults, mergeable or not, quantized base or not.

    [dim]Example: peftcli methods --model models/tiny[/]
    """
    if markdown and as_json:
        raise UserError("--markdown and --json are two formats of the same table", hint="give one of them")
    if as_json:
        console.out.print(json.dumps(json_rows(model), indent=2, default=str), markup=False)
        return
    table = rows(model)
    if markdown:
        console.out.print(markdown_table(table), markup=False)
    else:
        print_table(table, console.out)
