"""The CLI's view of library progress events: transient bars and lines on stderr."""

from __future__ import annotations

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from ctedge.core.progress import ProgressEvent, console


class Bars:
    """A progress callback (``ProgressFn``): one bar per task, each message a line.
    Use as a context manager so the bars are cleared however the command ends."""

    def __init__(self) -> None:
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeRemainingColumn(), console=console, transient=True)
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
