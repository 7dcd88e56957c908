"""Where peftcli talks to the user: results on stdout, progress/warnings/errors on stderr.

`-q/--quiet` silences `err` (progress, notes, warnings) and leaves `out` (results) and `problems`
(errors) alone; `-v/--verbose` lets library warnings through. Colour follows rich's rules: none when
the stream is not a terminal or `NO_COLOR` is set, so no Console here forces it.
"""

from __future__ import annotations

from rich.console import Console

QUIET, NORMAL, VERBOSE = -1, 0, 1

# emoji=False: text is printed as written (rich would turn a ":fire:" in a prompt or recipe into an emoji).
out = Console(highlight=False, soft_wrap=True, emoji=False)
err = Console(stderr=True, highlight=False, soft_wrap=True, emoji=False)
# Errors and their hints are said even under --quiet: a failed command must say why.
problems = Console(stderr=True, highlight=False, soft_wrap=True, emoji=False)

verbosity = NORMAL


def set_verbosity(level: int) -> None:
    """QUIET, NORMAL or VERBOSE for the rest of this command (every command reads it through `err`)."""
    global verbosity
    verbosity = level
    err.quiet = level == QUIET


def verbose() -> bool:
    return verbosity == VERBOSE


def warn(message: str) -> None:
    err.print(f"[yellow]warning:[/] {message}", markup=True)


def note(message: str) -> None:
    err.print(message, markup=False)


def problem(label: str, message: str, hint: str | None = None) -> None:
    """`error: ...` (or `interrupted: ...`) and its `hint:` line, on stderr whatever the verbosity."""
    problems.print(f"{label}: {message}", markup=False, style="red" if label == "error" else "yellow")
    if hint:
        problems.print(f"hint: {hint}", markup=False)
