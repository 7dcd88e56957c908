"""Errors that reach the user as one line, and the exit codes they map to.

Exit codes are part of the public contract: 0 success, 1 a bug (or a failed numeric check),
2 a user error (recipe, data, arguments, environment), 130/143 interrupted by SIGINT/SIGTERM.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_BUG = 1
EXIT_USER = 2


class UserError(Exception):
    """Something the user can fix. Printed as `error: <message>` plus an optional `hint:` line."""

    exit_code = EXIT_USER

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint


class CheckFailed(Exception):
    """A numeric verification failed (e.g. merged logits drifted): not the user's fault, exit 1."""

    exit_code = EXIT_BUG

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint


class Interrupted(Exception):
    """Training stopped on a signal after saving a checkpoint; exit 128 + signal number."""

    def __init__(self, signum: int, message: str, hint: str | None = None):
        super().__init__(message)
        self.exit_code = 128 + signum
        self.message = message
        self.hint = hint
