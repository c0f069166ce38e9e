"""Progress of long work as plain data: the library reports, the caller (the CLI) draws.

Long loops (an epoch, a statistics pass) call a `ProgressFn` with a `Tick` after each step.
A `Tick` names its task, so one callback can follow several tasks; `done == total` ends one.
Nothing here prints: the CLI turns ticks into progress bars, a script may log them or
pass nothing at all.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Tick:
    """One step of a task: `done` of `total` steps, and a short line of running figures."""

    task: str
    done: int
    total: int
    stats: str = ""


ProgressFn = Callable[[Tick], None]


def report(progress: ProgressFn | None, task: str, done: int, total: int, stats: str = "") -> None:
    """Call `progress` if the caller gave one."""
    if progress is not None:
        progress(Tick(task, done, total, stats))
