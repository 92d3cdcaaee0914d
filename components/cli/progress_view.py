"""The command line's edge of the progress channel: `Progress` reports rendered for a person
(flows/cli.py and the toy's components/toy/cli.py draw with it).

On a terminal: a live rich bar per stage with done/total, rate, elapsed time and ETA, then the
metrics (loss, images/s) and note; at any width the times stay whole and the metrics are cut
instead. When stdout is not a terminal, or `CI` is set: one plain line per 10% of each stage
with the same done/total, rate and ETA (a log, not an animation). Either way the lines go to
stderr, so stdout keeps the results. A stage's total may be unknown (0) at first: the bar shows
`?` until a report with a total arrives; plain lines start then.

    with ProgressView() as view:
        run_encode(..., progress=view)
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Self, TextIO

from rich.console import Console

from components.progress import Progress

PLAIN_EVERY = 10  # percent of a stage between two plain lines
BAR_WIDTH = 24  # characters; the metrics get the rest of the line


def wants_live(stdout: TextIO | None = None, environ: dict[str, str] | os._Environ[str] = os.environ) -> bool:
    """A live bar only for a person at a terminal: stdout is a TTY and `CI` is not set."""
    stream = stdout if stdout is not None else sys.stdout
    return bool(getattr(stream, "isatty", lambda: False)()) and not environ.get("CI")


def metrics_text(report: Progress) -> str:
    """`loss 0.0123  images/s 41.2`: a report's metrics, 4 significant digits."""
    return "  ".join(f"{k} {v:.4g}" for k, v in report.metrics.items())


def clock_text(seconds: float | None) -> str:
    """`0:01:05` (hours unbounded), or `?` when unknown: rich's elapsed/remaining format."""
    if seconds is None:
        return "?"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


def rate_text(per_s: float | None) -> str:
    """`41.2/s`: units per second, 3 significant digits (whole units from 1000), or `?/s`."""
    if per_s is None:
        return "?/s"
    return f"{per_s:.0f}/s" if per_s >= 1000 else f"{per_s:.3g}/s"


def eta_seconds(report: Progress, per_s: float | None) -> float | None:
    """Seconds left at `per_s` units per second; None without a rate or a total."""
    if not per_s or report.total <= 0:
        return None
    return max(0, report.total - report.step) / per_s


def plain_line(report: Progress, per_s: float | None = None) -> str:
    """`distill: 40% (120/300, 2.5/s, ETA 0:01:12) loss 0.0123 DDIM-4`: one non-terminal line."""
    pct = round(100 * report.fraction)
    done = f"({report.step}/{report.total}, {rate_text(per_s)}, ETA {clock_text(eta_seconds(report, per_s))})"
    parts = [f"{report.stage}: {pct}% {done}", metrics_text(report), report.note]
    return " ".join(p for p in parts if p)


@dataclass
class _Run:
    """One run of a stage, from its first report: where the rate is measured from."""

    started: float  # clock time of the run's first report
    first_step: int  # its step
    step: int  # the latest report's step

    def per_s(self, now: float) -> float | None:
        """Units per second since the run's first report; None before any time or work passed."""
        seconds, units = now - self.started, self.step - self.first_step
        return units / seconds if seconds > 0 and units > 0 else None


class ProgressView:
    """A `ProgressFn` that draws a live bar per stage, or prints one line per 10% (see the module).

    A report whose step is below the stage's last one starts a new run of that stage (the next
    base, or the stage's next pass): its bar, rate and elapsed time start again.
    """

    def __init__(self, console: Console | None = None, *, live: bool | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.console = console or Console(stderr=True)
        self.live = wants_live() if live is None else live
        self.clock = clock
        self._bar = None
        self._tasks: dict[str, int] = {}
        self._runs: dict[str, _Run] = {}
        self._printed: dict[str, int] = {}  # stage -> last 10% step printed in its run (plain mode)

    def __enter__(self) -> Self:
        if self.live:
            self._bar = _live_bar(self.console, self.clock)
            self._bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    def __call__(self, report: Progress) -> None:
        run = self._runs.get(report.stage)
        restarted = run is None or report.step < run.step
        if restarted:
            run = self._runs[report.stage] = _Run(started=self.clock(), first_step=report.step, step=report.step)
            self._printed[report.stage] = 0
        run.step = report.step
        if self._bar is not None:
            self._draw(report, restarted)
        elif report.total > 0:
            self._print(report, run.per_s(self.clock()))

    def _draw(self, report: Progress, restarted: bool) -> None:
        total = report.total if report.total > 0 else None
        if restarted and report.stage in self._tasks:  # a fresh bar: its total may be unknown again
            self._bar.remove_task(self._tasks.pop(report.stage))
        if report.stage not in self._tasks:
            self._tasks[report.stage] = self._bar.add_task(report.stage, total=total, completed=report.step,
                                                           metrics="")
        shown = " ".join(p for p in (metrics_text(report), report.note) if p)
        self._bar.update(self._tasks[report.stage], completed=report.step, total=total, metrics=shown)

    def _print(self, report: Progress, per_s: float | None) -> None:
        decile = int(100 * report.fraction) // PLAIN_EVERY
        if decile <= self._printed[report.stage]:
            return
        self._printed[report.stage] = decile
        self.console.print(plain_line(report, per_s), markup=False, highlight=False, soft_wrap=True)


def _live_bar(console: Console, clock: Callable[[], float]):
    """The rich bar: fixed-width columns (never cut), then the metrics column, cut to what is left."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        ProgressColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from rich.progress import Progress as Bar
    from rich.table import Column
    from rich.text import Text

    class RateColumn(ProgressColumn):
        def render(self, task) -> Text:
            return Text(rate_text(task.speed), style="progress.data.speed")

    class MetricsColumn(ProgressColumn):
        def render(self, task) -> Text:  # no_wrap on the text, not the column: the table shrinks this one
            return Text(task.fields.get("metrics", ""), no_wrap=True, overflow="ellipsis")

    fixed = Column(no_wrap=True)  # rich copies it per column
    return Bar(TextColumn("{task.description:>9}", table_column=fixed),
               BarColumn(bar_width=BAR_WIDTH, table_column=fixed), MofNCompleteColumn(table_column=fixed),
               RateColumn(table_column=fixed), TimeElapsedColumn(table_column=fixed),
               TextColumn("ETA", table_column=fixed), TimeRemainingColumn(table_column=fixed),
               MetricsColumn(), console=console, get_time=clock)
