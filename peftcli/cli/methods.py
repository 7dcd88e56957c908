"""`peftcli methods`: the registry as a table — keys and defaults, mergeable, quantized base, and
(with `--model`) the trainable-parameter share each method gives on that model.

The share is computed by model/size.py on the model built from its config on PyTorch's meta device.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from peftcli import console

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


def print_table(table: list[dict[str, str]], console) -> None:
    from rich.table import Table

    view = Table(show_lines=True)
    for column in table[0]:
        view.add_column(column, overflow="fold")
    for row in table:
        view.add_row(*row.values())
    console.print(view)


def methods(
    model: Annotated[
        str | None, typer.Option("--model", help="Model folder (or hub id): show each method's trainable share.")
    ] = None,
    markdown: Annotated[
        bool, typer.Option("--markdown", help="Print a Markdown table (as in docs/methods.md).")
    ] = False,
) -> None:
    """List every PEFT method: its keys and defaults, mergeable or not, quantized base or not.

    [dim]Example: peftcli methods --model models/tiny[/]
    """
    table = rows(model)
    if markdown:
        console.out.print(markdown_table(table), markup=False)
    else:
        print_table(table, console.out)
