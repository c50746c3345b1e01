"""The one progress bar of every stage: the task's description (bold), a bar, done/total, any
columns of the caller's, the elapsed time and, with eta, the time left. It writes to stderr
(stdout stays for results) unless given another console."""

from __future__ import annotations

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)


def progress_bar(*extra_columns: ProgressColumn | str, eta: bool = False, console: Console | None = None,
                 disable: bool = False, transient: bool = False) -> Progress:
    """A rich Progress: description, bar, M/N, `extra_columns` (a str is a TextColumn), elapsed
    time, and the time left when `eta`."""
    columns: list[ProgressColumn | str] = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                           *extra_columns, TimeElapsedColumn()]
    if eta:
        columns += [TextColumn("ETA"), TimeRemainingColumn()]
    return Progress(*columns, console=console or Console(stderr=True), disable=disable, transient=transient)
