"""The CLI's progress edge: a live rich bar on a terminal, one plain line per 10% otherwise; both
with done/total, rate and ETA, and the times whole at 120 columns."""

from __future__ import annotations

import io
import re

from rich.console import Console

from components.cli.progress_view import ProgressView, clock_text, plain_line, rate_text, wants_live
from components.progress import Progress

DISTILL_METRICS = {"loss": 0.02477, "lr": 0.0005, "grad_norm": 0.3123, "samples_per_s": 42.65,
                   "step_seconds": 0.3751}  # what a distill step reports: longer than a 120-column line leaves


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


class _Clock:
    """A clock the test moves: rates and times come out exact."""

    def __init__(self, start: float = 100.0):
        self.now = start

    def __call__(self) -> float:
        return self.now


def _frame(out: io.StringIO) -> list[str]:
    """The lines of the live display's last frame, terminal control codes removed."""
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", out.getvalue())
    return [line.rstrip() for line in text.split("\r")[-1].splitlines() if line.strip()]


def _live(width: int = 120, clock: _Clock | None = None) -> tuple[ProgressView, _Tty]:
    out = _Tty()
    console = Console(file=out, force_terminal=True, width=width, color_system=None)
    return ProgressView(console, live=True, clock=clock or _Clock()), out


def test_live_only_on_a_terminal_without_ci():
    assert wants_live(_Tty(), {}) is True
    assert wants_live(_Tty(), {"CI": "true"}) is False
    assert wants_live(io.StringIO(), {}) is False


def _run(view: ProgressView, stage: str = "distill", total: int = 200, clock: _Clock | None = None) -> None:
    with view:
        for step in range(total + 1):
            view(Progress(stage=stage, step=step, total=total, metrics={"loss": 1.0 / (step + 1)}))
            if clock is not None:
                clock.now += 1.0


def test_plain_mode_prints_one_line_per_ten_percent_with_rate_and_eta():
    out, clock = io.StringIO(), _Clock()
    _run(ProgressView(Console(file=out, width=120), live=False, clock=clock), clock=clock)
    lines = out.getvalue().splitlines()
    assert len(lines) == 10, lines
    assert lines[0] == "distill: 10% (20/200, 1/s, ETA 0:03:00) loss 0.04762"
    assert lines[-1].startswith("distill: 100% (200/200, 1/s, ETA 0:00:00)")


def test_plain_mode_counts_again_when_a_stage_restarts_and_skips_unknown_totals():
    out = io.StringIO()
    view = ProgressView(Console(file=out, width=120), live=False)
    _run(view, total=10)
    _run(view, total=10)  # the next base's distillation
    view(Progress(stage="curate", step=5000, total=0, note="metadata"))
    assert len(out.getvalue().splitlines()) == 20


def test_plain_mode_prints_a_new_run_that_is_done_in_one_report():
    """Curate's images pass after its metadata pass: one batch, 100% at once, still one line."""
    out = io.StringIO()
    view = ProgressView(Console(file=out, width=120), live=False)
    view(Progress(stage="curate", step=1857, total=1857, note="metadata"))
    view(Progress(stage="curate", step=1471, total=1471, note="images"))
    assert [line.split(" (")[0] for line in out.getvalue().splitlines()] == ["curate: 100%", "curate: 100%"]


def test_live_mode_draws_a_rich_bar_with_step_metrics_and_eta():
    view, out = _live(width=140)
    _run(view, total=50)
    text = out.getvalue()
    assert "distill" in text and "50/50" in text and "loss" in text
    assert "\x1b[" in text  # drawn with terminal control codes, not printed as lines


def test_live_bar_at_120_columns_keeps_done_total_rate_and_times_whole():
    """The metrics are cut to fit, never the step count, rate, elapsed time or ETA."""
    clock = _Clock()
    view, out = _live(width=120, clock=clock)
    with view:
        for step in range(1, 7):
            view(Progress(stage="distill", step=step, total=300, metrics=DISTILL_METRICS, note="DDIM-4"))
            clock.now += 2.5
    [line] = _frame(out)
    assert len(line) <= 120
    # 5 steps in 12.5 s since the first report: 0.4/s; 294 left: 735 s; 15 s since the bar started
    assert re.search(r"\b6/300 0\.4/s 0:00:15 ETA 0:12:15 loss 0\.02477 ", line), line
    assert line.endswith("…"), line  # the metrics column gave way
    assert "0:00:…" not in line and "0:12:…" not in line


def test_live_bar_shows_an_unknown_total_as_a_question_mark_only_until_a_total_arrives():
    clock = _Clock()
    view, out = _live(clock=clock)
    with view:
        view(Progress(stage="curate", step=1541, total=0, note="metadata"))
        assert "1541/?" in _frame_now(view, out)
        view(Progress(stage="curate", step=1857, total=1857, note="metadata"))
        assert "1857/1857" in _frame_now(view, out)
        view(Progress(stage="curate", step=10, total=0, note="metadata"))  # the next base: unknown again
        assert "10/?" in _frame_now(view, out)
        view(Progress(stage="curate", step=400, total=1471, note="images"))
        frame = _frame_now(view, out)
    assert "400/1471" in frame and "/?" not in frame


def _frame_now(view: ProgressView, out: io.StringIO) -> str:
    view._bar.refresh()
    return "\n".join(_frame(out))


def test_plain_line_has_stage_percent_done_rate_eta_metrics_and_note():
    report = Progress(stage="encode", step=3, total=12, metrics={"images/s": 41.234}, note="shard 0")
    assert plain_line(report, 1.5) == "encode: 25% (3/12, 1.5/s, ETA 0:00:06) images/s 41.23 shard 0"
    assert plain_line(report) == "encode: 25% (3/12, ?/s, ETA ?) images/s 41.23 shard 0"  # no rate yet


def test_rate_and_clock_formats():
    assert [rate_text(r) for r in (0.01234, 2.0, 41.26, 553.0, 12345.6, None)] == \
        ["0.0123/s", "2/s", "41.3/s", "553/s", "12346/s", "?/s"]
    assert [clock_text(s) for s in (0, 65.9, 3600 * 12 + 61, None)] == ["0:00:00", "0:01:05", "12:01:01", "?"]


def test_a_real_curation_reports_its_totals(tmp_path):
    """Curate's metadata pass ends with its row count, its images pass counts the candidates: both
    forms show done/total (a curation once showed `1541/?` to its end)."""
    from components.config import CurateConfig
    from components.stages.curate import run_curate
    from components.storage.storage import Storage
    from components.toy.source import write_toy_source

    write_toy_source(tmp_path / "source", seed=0)
    out = io.StringIO()
    with ProgressView(Console(file=out, width=120), live=False) as view:
        result = run_curate(CurateConfig(), source=Storage(str(tmp_path / "source")),
                            storage=Storage(str(tmp_path / "root")), output="c", min_side=32,
                            resolved_yaml="curate: {}\n", progress=view)
    lines = out.getvalue().splitlines()
    done = [re.match(r"curate: 100% \((\d+)/(\d+), .*\) (\w+)$", line) for line in lines]
    assert all(done) and [m.group(3) for m in done] == ["metadata", "images"], lines
    (rows, rows_total), (candidates, candidates_total) = [(int(m.group(1)), int(m.group(2))) for m in done]
    assert rows == rows_total == result.rows_in
    assert candidates == candidates_total and result.kept <= candidates < result.rows_in
