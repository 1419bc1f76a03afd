"""The CLI's view of library progress events: transient bars and lines on stderr."""

from __future__ import annotations

from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeRemainingColumn
from rich.text import Text

from ctedge.core.progress import ProgressEvent, console


class RateColumn(ProgressColumn):
    """Items per second (rich's estimate over the last 30 s), e.g. ``2.41 studies/s``."""

    def __init__(self, unit: str):
        super().__init__()
        self.unit = unit

    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:.2f} {self.unit}/s" if speed else f"- {self.unit}/s")


class Bars:
    """A progress callback (``ProgressFn``): one bar per task, each message a line.
    Use as a context manager so the bars are cleared however the command ends.
    ``rate``: the unit of a rate column (``studies`` shows studies/s)."""

    def __init__(self, rate: str | None = None) -> None:
        columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   *([RateColumn(rate)] if rate else []), TimeRemainingColumn()]
        self.progress = Progress(*columns, console=console, transient=True)
        self.tasks: dict[str, int] = {}

    def __call__(self, event: ProgressEvent) -> None:
        if event.message:
            self.progress.console.print(event.message, highlight=False, markup=False)
        task = self.tasks.get(event.task)
        if task is None:
            task = self.tasks[event.task] = self.progress.add_task(event.task, total=event.total)
        self.progress.update(task, completed=event.done, total=event.total)

    def __enter__(self) -> "Bars":
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()
