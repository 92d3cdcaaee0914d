"""The CLI's progress edge: a live rich bar on a terminal, one plain line per 10% otherwise."""

from __future__ import annotations

import io

from rich.console import Console

from components.cli.progress_view import ProgressView, plain_line, wants_live
from components.progress import Progress


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_live_only_on_a_terminal_without_ci():
    assert wants_live(_Tty(), {}) is True
    assert wants_live(_Tty(), {"CI": "true"}) is False
    assert wants_live(io.StringIO(), {}) is False


def _run(view: ProgressView, stage: str = "distill", total: int = 200) -> None:
    with view:
        for step in range(total + 1):
            view(Progress(stage=stage, step=step, total=total, metrics={"loss": 1.0 / (step + 1)}))


def test_plain_mode_prints_one_line_per_ten_percent():
    out = io.StringIO()
    _run(ProgressView(Console(file=out, width=120), live=False))
    lines = out.getvalue().splitlines()
    assert len(lines) == 10, lines
    assert lines[0].startswith("distill: 10% (20/200) loss 0.04762")
    assert lines[-1].startswith("distill: 100% (200/200)")


def test_plain_mode_counts_again_when_a_stage_restarts_and_skips_unknown_totals():
    out = io.StringIO()
    view = ProgressView(Console(file=out, width=120), live=False)
    _run(view, total=10)
    _run(view, total=10)  # the next base's distillation
    view(Progress(stage="curate", step=5000, total=0, note="metadata"))
    assert len(out.getvalue().splitlines()) == 20


def test_live_mode_draws_a_rich_bar_with_step_metrics_and_eta():
    out = _Tty()
    console = Console(file=out, force_terminal=True, width=140)
    view = ProgressView(console, live=True)
    _run(view, total=50)
    text = out.getvalue()
    assert "distill" in text and "50/50" in text and "loss" in text
    assert "\x1b[" in text  # drawn with terminal control codes, not printed as lines


def test_plain_line_has_stage_percent_step_metrics_and_note():
    line = plain_line(Progress(stage="encode", step=3, total=12, metrics={"images/s": 41.234}, note="shard 0"))
    assert line == "encode: 25% (3/12) images/s 41.23 shard 0"
