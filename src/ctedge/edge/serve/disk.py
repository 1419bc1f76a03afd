"""A full disk pauses the node; it resumes by itself when writes succeed again.

Any write that fails with ENOSPC/EDQUOT (or SQLite's "database or disk is full") calls
``Pause.set``: new C-STOREs get 0xA700, answers and deliveries wait, ``/readyz`` says
503 with the reason. The disk watcher's step checks the free space against
``--min-free-disk`` and, while paused, probes a file write and a journal write; both
succeeding ends the pause. Nothing acknowledged is lost: an instance is acknowledged
only after its journal row is committed.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from pathlib import Path

from ctedge.core.files import atomic_write

log = logging.getLogger(__name__)


class Pause:
    """Whether the node is paused, and why; thread-safe."""

    def __init__(self):
        self.lock = threading.Lock()
        self.reason: str | None = None
        self.since: float | None = None  # time.time()
        self.pauses = 0

    @property
    def paused(self) -> bool:
        return self.reason is not None

    def set(self, reason: str) -> None:
        with self.lock:
            if self.reason is not None:
                return
            self.reason, self.since, self.pauses = reason, time.time(), self.pauses + 1
        log.error("node paused: %s; C-STOREs get 0xA700 until writes succeed again", reason)

    def clear(self) -> None:
        with self.lock:
            if self.reason is None:
                return
            seconds = time.time() - (self.since or time.time())
            self.reason = self.since = None
        log.warning("node resumed after %.0f s paused: writes succeed again", seconds)

    def to_dict(self) -> dict:
        with self.lock:
            return {"paused": self.reason is not None, "reason": self.reason, "since": self.since}


class DiskWatch:
    """The disk watcher loop's step: free space, and the end of a pause."""

    def __init__(self, root: Path, journal, pause: Pause, min_free: int, every: float):
        self.root, self.journal, self.pause, self.min_free, self.every = Path(root), journal, pause, min_free, every
        self.free: int | None = None

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free

    def low(self) -> bool:
        return self.free is not None and self.free < self.min_free

    def step(self) -> float:
        self.free = self.free_bytes()
        if self.pause.paused and not self.low() and self._writes_succeed():
            self.pause.clear()
        return self.every

    def _writes_succeed(self) -> bool:
        probe = self.root / ".probe"
        try:
            atomic_write(b"probe", probe, fresh_name=True)
            probe.unlink()
            self.journal.probe()
        except Exception as exc:  # still full (or another error): the pause goes on
            log.debug("disk probe failed: %s", exc)
            return False
        return True

    def to_dict(self) -> dict:
        return {"free_bytes": self.free, "min_free_bytes": self.min_free, "low": self.low()}
