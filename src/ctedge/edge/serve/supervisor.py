"""The node's loops and the supervisor that keeps them running.

A ``Loop`` calls its ``step`` again and again (``step`` returns how long to wait, and
handles each row's errors itself); an exception out of ``step`` ends the loop's thread.
The ``Supervisor`` starts every loop, restarts one that died after a backoff (doubling,
reset once it runs again), and keeps each loop's state for ``/readyz``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass
class LoopState:
    """What ``/readyz`` shows of one loop."""

    state: str = "stopped"  # running, restarting, stopped
    restarts: int = 0
    last_error: str | None = None
    last_error_at: float | None = None  # time.time()
    last_step_at: float | None = None

    def to_dict(self) -> dict:
        return dict(self.__dict__)


class Loop:
    """One thread that runs ``step`` until stopped; ``wake()`` cuts its wait short."""

    def __init__(self, name: str, step: Callable[[], float]):
        self.name, self.step = name, step
        self.state = LoopState()
        self.wakeup = threading.Event()
        self.stopping = threading.Event()
        self.thread: threading.Thread | None = None

    def wake(self) -> None:
        self.wakeup.set()

    def start(self) -> None:
        self.state.state = "running"
        self.thread = threading.Thread(target=self._run, name=f"ctedge-{self.name}", daemon=True)
        self.thread.start()

    def alive(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    def _run(self) -> None:
        try:
            while not self.stopping.is_set():
                wait = self.step()
                self.state.last_step_at = time.time()
                self.wakeup.wait(max(wait, 0.0))
                self.wakeup.clear()
        except Exception as exc:  # the supervisor restarts the loop; the state says why it died
            log.exception("%s loop stopped by an error; it will be restarted", self.name)
            self.state.state, self.state.last_error = "restarting", f"{exc.__class__.__name__}: {exc}"
            self.state.last_error_at = time.time()

    def stop(self, timeout: float = 10.0) -> None:
        self.stopping.set()
        self.wakeup.set()
        if self.thread is not None:
            self.thread.join(timeout)
        self.state.state = "stopped"


class Supervisor:
    """Starts the loops, restarts a dead one after ``backoff`` seconds (doubling up to
    ``max_backoff`` while it keeps dying), stops them all."""

    def __init__(self, loops: list[Loop], backoff: float = 1.0, max_backoff: float = 60.0, check_every: float = 0.1):
        self.loops = {loop.name: loop for loop in loops}
        self.backoff, self.max_backoff, self.check_every = backoff, max_backoff, check_every
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._watch, name="ctedge-supervisor", daemon=True)
        self._waits = {name: backoff for name in self.loops}
        self._restart_at: dict[str, float] = {}
        self._started_at: dict[str, float] = {}

    def start(self) -> None:
        for loop in self.loops.values():
            loop.start()
        self.thread.start()

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(timeout=5)
        for loop in self.loops.values():
            loop.stop()

    def states(self) -> dict[str, dict]:
        return {name: loop.state.to_dict() for name, loop in self.loops.items()}

    def healthy(self) -> list[str]:
        """The loops not running (empty: all are)."""
        return [name for name, loop in self.loops.items() if not loop.alive()]

    def _watch(self) -> None:
        while not self.stopping.wait(self.check_every):
            now = time.monotonic()
            for name, loop in self.loops.items():
                if loop.alive():
                    if (loop.state.last_step_at or 0) > self._started_at.get(name, 0):
                        self._waits[name] = self.backoff  # it steps again: the next death waits the least
                    continue
                if loop.stopping.is_set():
                    continue
                due = self._restart_at.setdefault(name, now + self._waits[name])
                if now >= due:
                    del self._restart_at[name]
                    self._waits[name] = min(self._waits[name] * 2, self.max_backoff)
                    self._started_at[name] = time.time()
                    loop.state.restarts += 1
                    log.warning("%s loop restarted (restart %d)", name, loop.state.restarts)
                    loop.start()
