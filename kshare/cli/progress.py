"""Progress of the library's `Tick`s: rich bars on a terminal; elsewhere (a log file, CI, a pipe)
one plain line on stderr at least every `HEARTBEAT_SECONDS`, so long work says it is alive."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from kshare.progress import ProgressFn, Tick

HEARTBEAT_SECONDS = 30.0  # KSHARE_PROGRESS_SECONDS overrides it (tests, or a quieter log)


@contextmanager
def progress_bars(console: Console | None = None) -> Iterator[ProgressFn]:
    """A `ProgressFn` that draws each task's ticks as a bar while the block runs, or, when the
    console is not a terminal, writes a heartbeat line (task, step, elapsed, ETA)."""
    console = console or Console(stderr=True)
    if not console.is_terminal:
        with heartbeat_lines(console) as show:
            yield show
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("{task.fields[stats]}"))
    with Progress(*columns, console=console) as bars:
        tasks: dict[str, TaskID] = {}

        def show(tick: Tick) -> None:
            if tick.task not in tasks:
                tasks[tick.task] = bars.add_task(tick.task, total=tick.total, stats="")
            bars.update(tasks[tick.task], completed=tick.done, total=tick.total, stats=tick.stats)

        yield show


def _clock(seconds: float) -> str:
    seconds = round(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else \
        f"{seconds // 60}:{seconds % 60:02d}"


@contextmanager
def heartbeat_lines(console: Console, every: float | None = None) -> Iterator[ProgressFn]:
    """A `ProgressFn` for a console that is no terminal: a background thread writes the latest tick
    as one line every `every` seconds (`HEARTBEAT_SECONDS`), and a line when a task starts, so a
    step that takes minutes between ticks is still seen to be running."""
    every = every if every is not None else float(os.environ.get("KSHARE_PROGRESS_SECONDS", HEARTBEAT_SECONDS))
    start = time.monotonic()
    state: dict[str, object] = {}
    begun: dict[str, float] = {}
    lock = threading.Lock()
    stop = threading.Event()

    def line(tick: Tick, now: float) -> str:
        task_start = begun.get(tick.task, start)
        elapsed = now - task_start
        eta = f", ETA {_clock(elapsed / tick.done * (tick.total - tick.done))}" if 0 < tick.done < tick.total else ""
        stats = f", {tick.stats}" if tick.stats else ""
        return f"progress: {tick.task}, step {tick.done}/{tick.total}, {_clock(now - start)} elapsed{eta}{stats}"

    def beat() -> None:
        while not stop.wait(every):
            with lock:
                tick = state.get("tick")
            if isinstance(tick, Tick):
                console.print(line(tick, time.monotonic()), highlight=False, soft_wrap=True)
            else:
                console.print(f"progress: working, {_clock(time.monotonic() - start)} elapsed", highlight=False)

    def show(tick: Tick) -> None:
        with lock:
            first = tick.task not in begun
            if first:
                begun[tick.task] = time.monotonic()
            state["tick"] = tick
        if first and tick.done < tick.total:
            console.print(f"progress: {tick.task}, started ({tick.total} steps)", highlight=False, soft_wrap=True)

    thread = threading.Thread(target=beat, daemon=True, name="kshare-progress")
    thread.start()
    try:
        yield show
    finally:
        stop.set()
        thread.join(timeout=1.0)
