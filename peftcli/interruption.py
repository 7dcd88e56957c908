"""Ctrl-C and SIGTERM anywhere: exit 128 + the signal number, saying what was and was not saved.

By default Python turns SIGINT into KeyboardInterrupt, which typer swallows into a return code
(`peftcli train r.yaml && peftcli merge ...` would carry on), and SIGTERM kills the process without
running any cleanup (a half-made run folder stays behind). `install()` makes both raise
`Interruption` instead: a BaseException, so no `except Exception` swallows it and typer does not
intercept it, `finally` blocks and the atomic writers clean up on the way out, and `cli.main`
reports it as one line. While the training loop runs, training/signals.py installs its own
handlers (finish the step, save a checkpoint, stop).

What a command has saved when it is interrupted is said by the innermost `saving(...)` block
around the work, evaluated after everything inside it has cleaned up.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

HANDLED = (signal.SIGINT, signal.SIGTERM)
NOTHING_WRITTEN = "nothing was written"

# A description of what is saved, or a function that works it out when the interruption lands.
Describe = str | Callable[[], "tuple[str, str | None]"]


class Interruption(BaseException):
    """SIGINT or SIGTERM arrived outside the training loop."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.saved: str | None = None  # filled in by the innermost `saving` block
        self.hint: str | None = None

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name


def _raise(signum, frame) -> None:
    raise Interruption(signum)


@contextmanager
def installed() -> Iterator[None]:
    """SIGINT/SIGTERM raise Interruption while the block runs (in the main thread: only it can
    handle signals); the previous handlers come back afterwards (peftcli may run inside a host)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.signal(signum, _raise) for signum in HANDLED}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@contextmanager
def saving(describe: Describe, hint: str | None = None) -> Iterator[None]:
    """Say `describe` (what is saved at this point) if an interruption passes through this block."""
    try:
        yield
    except Interruption as exc:
        if exc.saved is None:
            exc.saved, exc.hint = describe() if callable(describe) else (describe, hint)
        raise


def message(exc: Interruption) -> tuple[str, str | None]:
    """The line `cli.main` prints, and its hint."""
    return f"{exc.signal_name} received; {exc.saved or NOTHING_WRITTEN}", exc.hint
