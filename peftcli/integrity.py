"""Is an artifact on disk whole? Checked before anything loads it (and before anything is deleted
because of it), without torch and without reading the tensors.

A safetensors file is an 8-byte little-endian header length, a JSON header giving each tensor's
byte range, then the data: a file cut short (a full disk, a copy that stopped, a kill mid-write of a
tool that does not write atomically) has a header whose ranges end past the end of the file.
Pickles (`.bin`, `.pt`, `.pth`) are never loaded: unpickling can run code, so they are reported
instead, with the reason. A write the disk refused (full, over quota, read-only) is told apart from
a bug by `refused_write`, and `free_space` says how much room is left.
"""

from __future__ import annotations

import errno
import json
import shutil
import struct
from pathlib import Path

MAX_HEADER = 100 * 2**20  # a header is a few KB to a few MB; anything larger is not one
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle")
PICKLE_WHY = "a PyTorch pickle, which can run code when loaded; peftcli loads safetensors only"


def safetensors_problem(path: Path) -> str | None:
    """Why `path` is not a complete safetensors file, or None when it is."""
    try:
        size = path.stat().st_size
        with path.open("rb") as handle:
            head = handle.read(8)
            if len(head) < 8:
                return "truncated (no header)"
            (length,) = struct.unpack("<Q", head)
            if length > min(MAX_HEADER, size - 8):
                return "truncated or not safetensors (header length past the end of the file)"
            header = json.loads(handle.read(length))
    except OSError as exc:
        return f"unreadable ({exc.strerror})"
    except (ValueError, UnicodeDecodeError):
        return "damaged (its header is not valid JSON)"
    if not isinstance(header, dict):
        return "damaged (its header is not a JSON object)"
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            end = max(end, int(entry["data_offsets"][1]))
        except (KeyError, IndexError, TypeError, ValueError):
            return f"damaged (no byte range for tensor {name!r})"
    if 8 + length + end > size:
        return f"truncated ({size:,} bytes, the header describes {8 + length + end:,})"
    return None


def json_problem(path: Path) -> str | None:
    """Why `path` is not a readable JSON file, or None when it is."""
    try:
        json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        return f"unreadable ({exc.strerror})"
    except (ValueError, UnicodeDecodeError):
        return "damaged (not valid JSON: cut short?)"
    return None


def damaged_files(folder: Path) -> list[str]:
    """'name: reason' for every safetensors or JSON file of `folder` (not recursive) that is not whole."""
    problems = []
    for path in sorted(folder.iterdir()) if folder.is_dir() else []:
        if not path.is_file():
            continue
        if path.suffix == ".safetensors":
            problem = safetensors_problem(path)
        elif path.suffix == ".json":
            problem = json_problem(path)
        else:
            continue
        if problem:
            problems.append(f"{path.name}: {problem}")
    return problems


def pickles(folder: Path, stem: str = "") -> list[str]:
    """Names of pickle files in `folder` (whose name starts with `stem`)."""
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES and p.name.startswith(stem))


# Why a disk refuses a write. The user fixes these (frees space, raises the quota, picks a writable
# folder); they are not bugs.
REFUSED_WRITES = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)
# Libraries written in Rust (safetensors, tokenizers) report a full disk in their own words.
_FULL_DISK_WORDS = ("No space left on device", "StorageFull", "os error 28")


def refused_write(exc: BaseException) -> int | None:
    """The errno of a write the disk refused (one of REFUSED_WRITES), or None for any other failure."""
    if isinstance(exc, OSError) and exc.errno in REFUSED_WRITES:
        return exc.errno
    if isinstance(exc, Exception) and any(words in str(exc) for words in _FULL_DISK_WORDS):
        return errno.ENOSPC
    return None


def free_space(path: Path) -> str | None:
    """Space free to this user on the disk that holds `path` (or its nearest existing folder), as
    "1.2 GiB", "15.0 MiB" or "640 KiB"; None when it cannot be read."""
    folder = next((p for p in (path, *path.parents) if p.exists()), None)
    try:
        free = shutil.disk_usage(folder).free if folder is not None else None
    except OSError:
        return None
    if free is None:
        return None
    for unit, size in (("GiB", 2**30), ("MiB", 2**20)):
        if free >= size:
            return f"{free / size:.1f} {unit}"
    return f"{free // 1024} KiB"
