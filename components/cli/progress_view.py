"""The command line's edge of the progress channel: `Progress` reports rendered for a person
(flows/cli.py and the toy's components/toy/cli.py draw with it).

On a terminal: a live rich bar per stage with step, total, metrics (loss, images/s) and ETA.
When stdout is not a terminal, or `CI` is set: one plain line per 10% of each stage instead
(a log, not an animation). Either way the lines go to stderr, so stdout keeps the results.

    with ProgressView() as view:
        run_encode(..., progress=view)
"""

from __future__ import annotations

import os
import sys
from typing import Self, TextIO

from rich.console import Console

from components.progress import Progress

PLAIN_EVERY = 10  # percent of a stage between two plain lines


def wants_live(stdout: TextIO | None = None, environ: dict[str, str] | os._Environ[str] = os.environ) -> bool:
    """A live bar only for a person at a terminal: stdout is a TTY and `CI` is not set."""
    stream = stdout if stdout is not None else sys.stdout
    return bool(getattr(stream, "isatty", lambda: False)()) and not environ.get("CI")


def metrics_text(report: Progress) -> str:
    """`loss 0.0123  images/s 41.2`: a report's metrics, 4 significant digits."""
    return "  ".join(f"{k} {v:.4g}" for k, v in report.metrics.items())


def plain_line(report: Progress) -> str:
    """`distill: 40% (120/300) loss 0.0123 - note`: one line of the non-terminal rendering."""
    pct = round(100 * report.fraction)
    parts = [f"{report.stage}: {pct}% ({report.step}/{report.total})", metrics_text(report), report.note]
    return " ".join(p for p in parts if p)


class ProgressView:
    """A `ProgressFn` that draws a live bar per stage, or prints one line per 10% (see the module)."""

    def __init__(self, console: Console | None = None, *, live: bool | None = None):
        self.console = console or Console(stderr=True)
        self.live = wants_live() if live is None else live
        self._bar = None
        self._tasks: dict[str, int] = {}
        self._printed: dict[str, int] = {}  # stage -> last 10% step printed (plain mode)

    def __enter__(self) -> Self:
        if self.live:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )
            from rich.progress import Progress as Bar

            self._bar = Bar(TextColumn("{task.description:>9}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[metrics]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                            console=self.console)
            self._bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    def __call__(self, report: Progress) -> None:
        if self._bar is not None:
            self._draw(report)
        elif report.total > 0:
            self._print(report)

    def _draw(self, report: Progress) -> None:
        total = report.total if report.total > 0 else None
        if report.stage not in self._tasks:
            self._tasks[report.stage] = self._bar.add_task(report.stage, total=total, metrics="")
        shown = " ".join(p for p in (metrics_text(report), report.note) if p)
        self._bar.update(self._tasks[report.stage], completed=report.step, total=total, metrics=shown)

    def _print(self, report: Progress) -> None:
        decile = int(100 * report.fraction) // PLAIN_EVERY
        last = self._printed.get(report.stage, 0)
        if decile < last:  # the stage started again (the next base): count from 0
            last = 0
        self._printed[report.stage] = max(decile, last)
        if decile <= last:
            return
        self.console.print(plain_line(report), markup=False, highlight=False, soft_wrap=True)
