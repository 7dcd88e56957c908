"""Errors that reach the user as one line, and the exit codes they map to.

Exit codes are part of the public contract: 0 success, 1 a bug (or a failed numeric check),
2 a user error (recipe, data, arguments, environment), 130/143 interrupted by SIGINT/SIGTERM.
"""

from __future__ import annotations

EXIT_BUG = 1
EXIT_USER = 2


class ReportedError(Exception):
    """An error printed as `error: <message>` plus an optional `hint:` line, exiting with `exit_code`."""

    exit_code = EXIT_BUG
    label = "error"
    per_rank = False  # in a multi-process run: said by the rank that hit it, not only by rank 0

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint


class UserError(ReportedError):
    """Something the user can fix: recipe, data, arguments, environment."""

    exit_code = EXIT_USER


class CheckFailed(ReportedError):
    """A numeric verification failed (e.g. merged logits drifted): not the user's fault."""

    exit_code = EXIT_BUG


class Interrupted(ReportedError):
    """Training stopped on a signal after saving a checkpoint; exits 128 + the signal number."""

    label = "interrupted"

    def __init__(self, signum: int, message: str, hint: str | None = None):
        super().__init__(message, hint)
        self.exit_code = 128 + signum


# Where a relative path in an error message was resolved from (the hint of every "not found").
PATH_RULE = (
    "relative paths in a recipe file resolve against its folder; on the command line (--set, --data), "
    "against the current directory"
)
