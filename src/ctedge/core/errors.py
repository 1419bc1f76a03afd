"""Errors that the CLI turns into a clear message and an exit code, and the
exit codes themselves (one enum, listed in the README)."""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """What every ``ctedge`` command tells the shell."""

    OK = 0  # done
    FAILED = 1  # a failure found: a file or study without an answer, a variant beyond its tolerance
    BAD_INPUT = 2  # bad input or environment; the message names the file, value or option
    CHECK_REFUSED = 3  # a check refused the result (parity, constant model)
    LEAKAGE = 4  # `audit`: the same image is in more than one split
    INTERRUPTED = 130  # Ctrl-C or SIGTERM; temp files are removed


class CtedgeError(Exception):
    """A problem with the user's input or environment, not a bug.

    ``param``: the library parameter the message is about (``fine_tune_blocks``);
    the message then starts with it, and the CLI shows the matching flag instead.
    ``exit_code`` tells the shell what happened.
    """

    exit_code = ExitCode.BAD_INPUT

    def __init__(self, message: str, *, param: str | None = None):
        self.param, self.detail = param, message
        super().__init__(message if param is None else f"{param}{'' if message[:1] in ':,' else ' '}{message}")

    def with_name(self, name: str) -> str:
        """The message with ``param`` spelled as ``name`` (e.g. the CLI flag)."""
        if self.param is None:
            return str(self)
        return f"{name}{'' if self.detail[:1] in ':,' else ' '}{self.detail}"


class UnreadableImage(CtedgeError):
    """A file that is not a readable image; names the file."""

    def __init__(self, path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


class ModelFailed(CtedgeError):
    """The model's engine raised part way through a run (memory, a lost device); what was
    answered before it is kept."""

    exit_code = ExitCode.FAILED


class CheckFailed(CtedgeError):
    """A verification (parity, checker, tolerance) refused the result."""

    exit_code = ExitCode.CHECK_REFUSED
