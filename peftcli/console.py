"""Where peftcli talks to the user: results on stdout, progress/warnings/errors on stderr."""

from __future__ import annotations

from rich.console import Console

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


def warn(message: str) -> None:
    err.print(f"[yellow]warning:[/] {message}", markup=True)


def note(message: str) -> None:
    err.print(message, markup=False)
