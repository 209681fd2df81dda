"""Progress bars for long work: one rich console on stderr, bars that vanish when done.

Library code asks for a bar with :func:`progress_bar` (a no-op when disabled); log lines from
``logging.getLogger("rstr")`` print above running bars through the same console, so the
terminal shows rstr's own lines and, while work runs, one bar per task -- no blank lines.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from functools import lru_cache

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


@lru_cache(maxsize=1)
def console() -> Console:
    """The stderr console shared by log lines and progress bars (lines unwrapped up to 160 columns in log files)."""
    terminal = Console(stderr=True)
    return terminal if terminal.is_terminal else Console(stderr=True, width=160)


class Bar:
    """A handle on one bar: ``advance`` and ``note`` (text after the bar, e.g. the best score so far)."""

    def __init__(self, progress: Progress | None, task: TaskID | None) -> None:
        self._progress, self._task = progress, task

    def advance(self, n: int = 1) -> None:
        if self._progress is not None and self._task is not None:
            self._progress.advance(self._task, n)

    def note(self, text: str) -> None:
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, note=text)


_active: Progress | None = None


@contextlib.contextmanager
def progress_bar(total: int, description: str, enabled: bool = True) -> Iterator[Bar]:
    """A transient bar of ``total`` steps (gone when the block ends); nothing at all when not ``enabled``.

    A bar opened while another runs joins the same display, below it.
    """
    global _active
    if not enabled or not console().is_terminal:
        yield Bar(None, None)
        return
    if _active is not None:
        task = _active.add_task(description, total=total, note="")
        try:
            yield Bar(_active, task)
        finally:
            _active.remove_task(task)
        return
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        TextColumn("{task.fields[note]}"),
    )
    with Progress(*columns, console=console(), transient=True) as progress:
        _active = progress
        try:
            yield Bar(progress, progress.add_task(description, total=total, note=""))
        finally:
            _active = None
