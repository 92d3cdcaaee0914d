"""The one progress channel: every long stage reports through `progress(Progress(...))`.

The shape follows k-diffusion's sampler `callback` dict: a stage name, the step it has
reached out of a total, and a few named metrics (loss, images/s, ...). Loops never print:
they call the callback they were given, and the edge renders it (a live bar in the CLI,
a progress artifact in Prefect, one line per N% when stdout is not a terminal).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Progress:
    """One progress report: `step` of `total` units of `stage` done, with named metrics."""

    stage: str  # "curate", "encode", "distill", "evaluate", "merge", "toy-base", ...
    step: int  # units done so far (optimizer steps, images, rows, methods)
    total: int  # units in the whole stage (0 when unknown)
    metrics: Mapping[str, float] = field(default_factory=dict)  # e.g. {"loss": 0.012}
    note: str = ""  # what is being done now, e.g. "DDIM-4" or "shard 3/8"

    @property
    def fraction(self) -> float:
        """Share of the stage done, in [0, 1] (0 when the total is unknown)."""
        return min(1.0, self.step / self.total) if self.total > 0 else 0.0


ProgressFn = Callable[[Progress], None]


def no_progress(_report: Progress) -> None:
    """The default callback: report nothing."""
