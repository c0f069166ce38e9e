"""Rich progress bars for the library's `Tick`s: one bar per task, on stderr, only on a terminal."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from kshare.progress import ProgressFn, Tick


@contextmanager
def progress_bars(console: Console | None = None) -> Iterator[ProgressFn]:
    """A `ProgressFn` that draws each task's ticks as a bar while the block runs."""
    console = console or Console(stderr=True)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("{task.fields[stats]}"))
    with Progress(*columns, console=console, disable=not console.is_terminal) as bars:
        tasks: dict[str, TaskID] = {}

        def show(tick: Tick) -> None:
            if tick.task not in tasks:
                tasks[tick.task] = bars.add_task(tick.task, total=tick.total, stats="")
            bars.update(tasks[tick.task], completed=tick.done, total=tick.total, stats=tick.stats)

        yield show
