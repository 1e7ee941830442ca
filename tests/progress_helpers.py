"""Driving a `StageTracker` by hand in the progress tests: a request sent, a pass's steps seen."""

from __future__ import annotations

from sdjobs.progress import StageTracker
from sdjobs.status import ProgressInfo
from sdjobs.testing import idle_sample, sample


def sent(
    tracker: StageTracker | None = None, *, baseline: ProgressInfo | None = None, now: float = 0.0, task_mode: bool = False
) -> StageTracker:
    """`tracker` (a plain one by default) with a request sent at `now`: in task mode, or after
    `baseline` (an idle server by default)."""
    tracker = tracker or StageTracker()
    tracker.request_sent(now, baseline=None if task_mode else baseline or idle_sample(), task_mode=task_mode)
    return tracker


def steps_at(tracker: StageTracker, times, steps: int = 10, **where) -> None:
    """Steps 1, 2, ... of a pass first seen at `times`."""
    for step, now in enumerate(times, start=1):
        tracker.fold(sample(step, steps, **where), None, now)
