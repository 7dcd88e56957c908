"""One writer per run directory: `train` (and `eval`/`merge`, which write into or read a run) hold an
exclusive lock on the folder for as long as they run.

Without it a second `train --resume` (the error hint's own advice) or `--overwrite` writes into a
live run: the first then reports success over the second run's artifacts, or one dies on the
other's staging files.

The lock is `flock` on `RUN/.peftcli.lock`, which the kernel releases when the process ends however
it ends (kill -9 included), so a lock left by a dead process is never in the way. Where the file
system has no `flock` (some network mounts), the file's existence is the lock and the PID written
in it decides: a lock whose process no longer runs on this host is stale and is taken over.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from peftcli.errors import UserError
from peftcli.rundir.layout import LOCK


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        return True
    return True


def _holder(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _busy(folder: Path, holder: dict) -> UserError:
    pid = holder.get("pid", "?")
    where = f" on {holder['host']}" if holder.get("host") not in (None, socket.gethostname()) else ""
    command = f" ({holder['command']})" if holder.get("command") else ""
    return UserError(
        f"{folder} is in use by another peftcli process: PID {pid}{where}{command}",
        hint="wait for it to finish, or stop it first (Ctrl-C, or kill PID: it saves a checkpoint and exits); "
        f"a lock left behind on a shared file system can be removed: {folder / LOCK}",
    )


class RunLock:
    """`with RunLock(folder):` holds the folder's lock; the folder must exist."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.path = self.folder / LOCK
        self._fd: int | None = None

    def _record(self) -> bytes:
        command = " ".join(["peftcli", *sys.argv[1:]])[:300]
        return json.dumps(
            {"pid": os.getpid(), "host": socket.gethostname(), "command": command, "since": time.time()}
        ).encode()

    def acquire(self) -> None:
        for _ in range(20):  # the holder may unlink the file between our open and our flock: try again
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise _busy(self.folder, _holder(self.path)) from None
            except OSError as exc:
                os.close(fd)
                if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                    return self._acquire_without_flock()
                raise
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.write(fd, self._record())
            self._fd = fd
            return
        raise UserError(f"{self.folder}: could not take the run lock ({LOCK} keeps changing)")

    def _acquire_without_flock(self) -> None:
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                holder = _holder(self.path)
                try:
                    pid = int(holder.get("pid") or 0)
                except (TypeError, ValueError):
                    pid = 0
                stale = holder.get("host") == socket.gethostname() and (pid <= 0 or not _alive(pid))
                if not stale:
                    raise _busy(self.folder, holder) from None
                self.path.unlink(missing_ok=True)  # its process is gone: the lock is stale
                continue
            os.write(fd, self._record())
            os.close(fd)
            self._fd = -1
            return
        raise UserError(f"{self.folder}: could not take the run lock")

    def release(self) -> None:
        if self._fd is None:
            return
        self.path.unlink(missing_ok=True)  # before unlocking: a waiter then re-checks the inode
        if self._fd >= 0:
            os.close(self._fd)  # closing releases the flock
        self._fd = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
