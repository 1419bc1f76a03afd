"""Progress as events: library code reports through a callback the caller supplies
(the CLI draws bars on stderr from them); it never prints.

``console`` is the CLI's stderr console, kept here so stdout stays clean for --json.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, TypeVar

from rich.console import Console

T = TypeVar("T")
console = Console(stderr=True, soft_wrap=True)


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
