"""Reading files a user names (recipe, chat template, data): only regular files, so that a FIFO or a
device (`/dev/zero`) is refused by its kind instead of blocking or filling memory when read."""

from __future__ import annotations

import os
import stat
from pathlib import Path

_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def special_kind(path: str | Path) -> str | None:
    """What `path` is when it exists but is not a regular file ("a FIFO (named pipe)", ...), else None.

    `os.stat` never opens the file, so asking about a FIFO does not block."""
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):  # missing, unreadable folder, NUL in the name: the caller's "not found"
        return None
    if stat.S_ISREG(mode):
        return None
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def human_size(size: int) -> str:
    return f"{size / (1 << 20):.1f} MiB" if size >= 1 << 20 else f"{size / 1024:.0f} KiB"


def read_capped(path: Path, limit: int) -> bytes | None:
    """The bytes of a regular file, or None when it holds more than `limit` bytes (checked while
    reading too: the size may change between the stat and the read)."""
    if path.stat().st_size > limit:
        return None
    with path.open("rb") as handle:
        data = handle.read(limit + 1)
    return None if len(data) > limit else data
