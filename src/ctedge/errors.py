"""Errors that the CLI turns into a clear message and an exit code."""

from __future__ import annotations


class CtedgeError(Exception):
    """A problem with the user's input or environment, not a bug.

    ``exit_code`` tells the shell what happened (see ``cli.py``).
    """

    exit_code = 2


class UnreadableImage(CtedgeError):
    """A file that is not a readable image; names the file."""

    def __init__(self, path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


class CheckFailed(CtedgeError):
    """A verification (parity, checker, tolerance) refused the result."""

    exit_code = 3
