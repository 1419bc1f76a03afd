"""Named crash points in the node's state transitions, and what counts as a full disk.

Every journal transition calls ``Faults.hit(point)`` right after its commit (and a few
side effects, such as an instance file on disk or a result the PACS acknowledged,
call it before the commit that records them); ``journal.write`` is hit inside every
transaction, before its commit. Nothing happens there in production.

- Tests install a hook (``Faults(hook=...)``) that may raise at a point: ``Crashed``
  simulates the process stopping there (``dead``: every later write and send fails
  too); another exception is an injected error (ENOSPC, "database or disk is full").
- ``CTEDGE_CRASH_AT=POINT`` or ``POINT:N`` (read once when the node starts) makes the
  node kill -9 itself the first (N-th) time it reaches POINT: how the subprocess tests
  crash it for real. For tests only; unset in production.
"""

from __future__ import annotations

import errno
import os
import signal
import sqlite3
import threading
from collections.abc import Callable

CRASH_ENV = "CTEDGE_CRASH_AT"
POINTS = (
    "journal.write",       # inside any journal transaction, before its commit
    "instance.written",    # the instance file is on disk, its journal row not yet
    "instance.committed",  # its row is committed, the C-STORE not yet acknowledged
    "association.closed",  # the association's end (released or aborted) is recorded
    "classify.failed",     # a transient classification error and its next try are recorded
    "answer.committed",    # the answer, its SR/SC bytes and its deliveries are committed
    "delivery.sent",       # the destination acknowledged the result, the journal not yet told
    "delivery.recorded",   # the delivery's outcome (sent, retry, failed) is committed
    "redelivery.queued",   # a re-sent study's answer is queued to go out again
    "retention.deleted",   # a study's rows are deleted, its files not yet
)


class Crashed(RuntimeError):
    """Raised at an injected crash point, and by every write after it."""


class Faults:
    """The crash points of one node (see the module's docstring)."""

    def __init__(self, hook: Callable[[str], None] | None = None, crash_at: str | None = None):
        self.hook = hook
        point, _, nth = (crash_at or "").partition(":")
        if point and point not in POINTS:
            raise ValueError(f"{CRASH_ENV}: no crash point {point!r} (one of {', '.join(POINTS)})")
        self.crash_at, self.crash_countdown = point or None, int(nth or 1)
        self.dead = threading.Event()
        self.lock = threading.Lock()

    @classmethod
    def from_environment(cls) -> Faults:
        return cls(crash_at=os.environ.get(CRASH_ENV) or None)

    def check(self) -> None:
        """Before a write or a send: refuse once a crash was injected."""
        if self.dead.is_set():
            raise Crashed("the node crashed (injected) before this write")

    def hit(self, point: str) -> None:
        self.check()
        if point == self.crash_at:
            with self.lock:
                self.crash_countdown -= 1
                if self.crash_countdown == 0:
                    os.kill(os.getpid(), signal.SIGKILL)
        if self.hook is not None:
            try:
                self.hook(point)
            except Crashed:
                self.dead.set()
                raise


def is_disk_full(exc: BaseException) -> bool:
    """ENOSPC/EDQUOT from a file write, or SQLite's "database or disk is full"."""
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    if isinstance(exc, sqlite3.Error):
        return getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL or "disk is full" in str(exc)
    return False
