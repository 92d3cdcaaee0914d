"""Prefect's edge of the progress channel: `Progress` reports as a progress artifact.

Every long task builds its `ProgressFn` with `task_progress(...)`: the report updates the
task run's progress artifact (at most `UPDATES` times per stage) and is passed on to the
in-process edge, if one is shown (`lcmlora nightly` draws a live bar through `showing`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from prefect.artifacts import create_progress_artifact, update_progress_artifact

from components.progress import Progress, ProgressFn
from tasks.artifacts import artifact_key

UPDATES = 100  # progress artifact updates per stage, at most

_edges: list[ProgressFn] = []  # the ProgressFns of the process's edge (the CLI's view), innermost last


@contextlib.contextmanager
def showing(view: ProgressFn) -> Iterator[ProgressFn]:
    """While inside, every task's progress also reaches `view` (the flow runs in this process).

    Not a task or flow parameter: the view is no input of any stage and never part of a cache key.
    """
    _edges.append(view)
    try:
        yield view
    finally:
        _edges.remove(view)


def describe(report: Progress, title: str) -> str:
    """`title: step 120/300, loss 0.0123`: the artifact's description of a report."""
    metrics = "".join(f", {k} {v:.4g}" for k, v in report.metrics.items())
    return f"{title}: step {report.step}/{report.total}{metrics}" + (f" ({report.note})" if report.note else "")


class ArtifactProgress:
    """A ProgressFn keeping one Prefect progress artifact up to date (see the module docstring)."""

    def __init__(self, key: str, title: str):
        self.key, self.title = key, title
        self.artifact_id = None
        self._shown = -1  # last percent written to the artifact

    def __call__(self, report: Progress) -> None:
        for edge in _edges:
            edge(report)
        percent = int(100 * report.fraction)
        if self.artifact_id is None:
            self.artifact_id = create_progress_artifact(progress=float(percent), key=self.key,
                                                        description=describe(report, self.title))
            self._shown = percent
        elif percent >= self._shown + 100 // UPDATES or (report.total and report.step >= report.total):
            update_progress_artifact(self.artifact_id, progress=float(percent), description=describe(report, self.title))
            self._shown = percent

    def finish(self) -> None:
        """The stage is done: the artifact shows 100%."""
        if self.artifact_id is not None and self._shown < 100:
            update_progress_artifact(self.artifact_id, progress=100.0)
            self._shown = 100


def task_progress(stage: str, name: str, title: str) -> ArtifactProgress:
    """The ProgressFn of one task run: artifact `STAGE-progress-NAME`, forwarded to the edge."""
    return ArtifactProgress(artifact_key(f"{stage}-progress", name), title)
