"""What a path a user named really is when it cannot be read as a file: "not found" hides a symlink
loop, a broken link or a folder that cannot be entered, and "no such file" a FIFO or a directory."""

from __future__ import annotations

import errno
import os
from pathlib import Path

from peftcli.recipe.files import special_kind


def not_a_file(path: str | Path) -> str | None:
    """What `path` is when it is there but no regular file ("a FIFO (named pipe)", "a directory",
    "a symlink loop ..."), to follow "<path> is"; None for a regular file, or for a path that simply
    does not exist (the caller's "not found"). `os.stat` never opens the file: a FIFO does not block."""
    kind = special_kind(path)
    if kind is not None:
        return kind
    try:
        os.stat(path)
    except ValueError:  # a NUL byte in the name
        return "not a valid path (it holds a NUL byte)"
    except OSError as exc:
        return _why_missing(Path(path), exc)
    return None


def _why_missing(path: Path, exc: OSError) -> str | None:
    if exc.errno == errno.ELOOP:
        return "a symlink loop (links that lead back to each other, never to a file)"
    if exc.errno == errno.ENOENT and path.is_symlink():
        return f"a broken symlink (to {os.readlink(path)}, which does not exist)"
    if exc.errno == errno.ENOENT:
        return None
    if exc.errno == errno.ENOTDIR:
        return "inside a file (a part of the path before its last is a file, not a folder)"
    return f"not reachable ({exc.strerror or exc})"
