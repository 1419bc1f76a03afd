"""Progress bars on stderr (rich), so stdout stays clean for --json output."""

from __future__ import annotations

from typing import Iterable, TypeVar

from rich.console import Console
from rich.progress import track as _track

T = TypeVar("T")
console = Console(stderr=True, soft_wrap=True)


def track(items: Iterable[T], total: int | None = None, description: str = "") -> Iterable[T]:
    return _track(items, total=total, description=description, console=console, transient=True)
