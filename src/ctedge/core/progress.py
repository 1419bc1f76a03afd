"""Progress as events: library code reports through a callback the caller supplies
(the CLI draws bars on stderr from them); it never prints.

``console`` is the CLI's stderr console, kept here so stdout stays clean for --json.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, TypeVar

from rich.console import Console, ConsoleDimensions

T = TypeVar("T")
PIPE_COLUMNS = 1024  # into a file or a pipe, COLUMNS unset: tables at their own width (bench's: ~420)


class _Console(Console):
    """Rich's console. Rich draws into a file or a pipe (a log, CI, ``2> out.txt``) 80
    columns wide and cuts a wider table's cells to "…"; here tables keep their own width
    there (nothing ctedge prints fills the console's width), or follow COLUMNS."""

    @property
    def size(self) -> ConsoleDimensions:
        size = super().size
        if self.is_terminal or os.environ.get("COLUMNS"):
            return size
        return ConsoleDimensions(max(size.width, PIPE_COLUMNS), size.height)


console = _Console(stderr=True, soft_wrap=True)


@dataclass(frozen=True)
class ProgressEvent:
    """Where a long task stands: ``done`` of ``total`` items of ``task``; ``message``
    is a finished step worth a line of its own (an epoch's metrics, a trial's score)."""

    task: str
    done: int = 0
    total: int | None = None
    message: str | None = None


ProgressFn = Callable[[ProgressEvent], None]


def tracked(items: Iterable[T], task: str, total: int | None = None,
            progress: ProgressFn | None = None) -> Iterator[T]:
    """``items`` unchanged, with an event before the first and after each one."""
    if progress is None:
        yield from items
        return
    progress(ProgressEvent(task, 0, total))
    for done, item in enumerate(items, 1):
        yield item
        progress(ProgressEvent(task, done, total))


def report(progress: ProgressFn | None, task: str, message: str, done: int = 0,
           total: int | None = None) -> None:
    """Send one line (and where ``task`` stands) to ``progress``, if there is one."""
    if progress is not None:
        progress(ProgressEvent(task, done, total, message))
