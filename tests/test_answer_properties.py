"""Whatever a server answers about progress, reading it gives a sample with every field usable
(or the one ValueError that makes the poller hand over None), never another exception."""

from __future__ import annotations

import math

from hypothesis import event, given

from sdjobs.status import MAX_COUNT, ProgressInfo, TaskProgress
from sdjobs.testing import progress_bodies, task_bodies


def finite_or_none(value: float | None) -> bool:
    return value is None or (isinstance(value, float) and math.isfinite(value))


def count_or_none(value: int | None, least: int = 0) -> bool:
    return value is None or (type(value) is int and least <= value <= MAX_COUNT)


@given(progress_bodies())
def test_any_progress_body_reads_as_a_usable_sample_or_a_value_error(body):
    try:
        info = ProgressInfo.from_response(body)
    except ValueError:
        event("not a sample")
        return
    event("a sample")
    assert isinstance(info.progress, float) and math.isfinite(info.progress) and info.progress >= 0
    assert finite_or_none(info.eta_relative) and info.eta_relative is not None
    assert count_or_none(info.current_step) and count_or_none(info.total_steps)
    assert count_or_none(info.job_no) and count_or_none(info.job_count, least=-1)
    assert all(isinstance(v, str | None) for v in (info.job_timestamp, info.textinfo, info.current_image))
    assert all(not isinstance(v, list | dict) for v in info.state.values())


@given(task_bodies())
def test_any_task_body_reads_as_a_usable_answer_or_a_value_error(body):
    try:
        task = TaskProgress.from_response(body)
    except ValueError:
        event("not an answer")
        return
    event("an answer")
    assert all(isinstance(flag, bool) for flag in (task.active, task.queued, task.completed))
    assert finite_or_none(task.progress) and finite_or_none(task.eta)
    assert count_or_none(task.id_live_preview, least=-1) and task.id_live_preview is not None
    assert task.queue_position is None or all(count_or_none(n) for n in task.queue_position)
