"""Details of progress that the broader tests let slip: which job is ours when the other one
starts over or the server shows no stamps, a stall's edges, and the job's ETA and progress
at their limits."""

from __future__ import annotations

import math

import pytest

from sdjobs.progress import JobTracker, StageTracker, StallEvent, StallWatch
from sdjobs.status import ProgressInfo
from sdjobs.testing import TIMESTAMPS, idle_sample, sample

OURS, OTHER = TIMESTAMPS[:2]


def ours_after(baseline: ProgressInfo, *answers: ProgressInfo) -> list[bool]:
    """Whether each answer, folded in turn after a request sent with `baseline`, is taken for ours."""
    tracker = StageTracker()
    tracker.request_sent(0.0, baseline=baseline, task_mode=False)
    seen = []
    for now, answer in enumerate(answers, start=1):
        tracker.fold(answer, None, float(now))
        seen.append(tracker.running)
    return seen


@pytest.mark.parametrize(
    ("baseline", "answer"),
    [
        (sample(6, stamp=OTHER), sample(2, stamp=OTHER)),  # the step went back at once
        (sample(1, stamp=OTHER), sample(0, stamp=OTHER)),  # back to step 0
        (sample(5, job_no=1, job_count=2, stamp=OTHER), sample(9, job_no=0, job_count=2, stamp=OTHER)),  # an earlier pass
    ],
    ids=["step back", "step 0", "pass back"],
)
def test_the_other_job_starting_over_in_the_same_second_is_our_job(baseline, answer):
    assert ours_after(baseline, answer) == [True]


def test_the_other_job_going_on_is_not_ours():
    assert ours_after(sample(5, job_no=1, job_count=2, stamp=OTHER), sample(6, job_no=1, job_count=2, stamp=OTHER)) == [False]


def test_a_busy_server_counting_no_passes_starts_over_at_begin():
    busy = ProgressInfo(progress=0.3, eta_relative=5.0, current_step=0, total_steps=10, job_no=0, job_count=0, job_timestamp=OTHER)
    begun = sample(0, job_count=-1, stamp=OTHER)
    assert ours_after(busy, begun) == [True]


def test_after_the_other_job_went_idle_the_next_job_is_ours_whatever_its_stamp_and_step():
    assert ours_after(sample(6, stamp=OTHER), idle_sample(OTHER), sample(8, stamp=OTHER)) == [False, True]


def test_without_stamps_the_first_busy_sample_after_an_idle_server_is_ours():
    assert ours_after(idle_sample(None), sample(3, stamp=None)) == [True]


def test_a_stall_is_reported_once_while_it_lasts_and_the_interrupt_at_its_time():
    watch = StallWatch(stall_after=60.0, interrupt_after=90.0)
    assert watch.check(60.0) == (StallEvent.STALLED,)
    assert watch.check(60.0) == ()  # the same stall, seen again
    assert watch.check(90.0) == (StallEvent.INTERRUPT,)


def test_no_stall_in_the_first_moments_of_a_decode_the_run_expects():
    tracker = StageTracker(passes_per_request=2, steps_per_request=20, images_per_request=2)
    tracker.request_sent(0.0, baseline=idle_sample(), task_mode=False)
    for step in range(1, 10):
        tracker.fold(sample(step, 10, job_count=2), None, float(step))
    tracker.fold(sample(0, 10, job_no=1, job_count=2), None, 12.0)  # a 3 s decode
    for step in range(1, 10):
        tracker.fold(sample(step, 10, job_no=1, job_count=2), None, 13.0 + step)
    assert tracker.stalled_for(22.5) == 0.0  # half a second into the decode expected to take 3 s


def test_a_stage_progress_over_one_counts_as_that_stage_done_and_nan_as_nothing():
    jobs = JobTracker(costs=(1.0, 1.0))
    assert jobs.job_progress(0, 1.5) == 0.5
    assert jobs.job_progress(1, math.nan) == 0.5


def test_later_stages_take_the_seconds_history_expects_where_it_knows_them():
    jobs = JobTracker(costs=(10.0, 10.0, 10.0), seconds=(100.0, 30.0, 7.0))
    assert jobs.job_eta(0, 5.0) == 5.0 + 30.0 + 7.0
    assert jobs.job_eta(1, 5.0) == 5.0 + 7.0
    partial = JobTracker(costs=(10.0, 10.0, 10.0), seconds=(100.0, None, 7.0))
    assert partial.job_eta(0, 5.0) is None  # a later stage history has no figure for, and no step timed
    assert partial.job_eta(0, 5.0, seconds_per_step=0.5) == 5.0 + 10 * 0.5 + 7.0  # that one at the step rate


def test_a_step_rate_of_zero_is_no_rate():
    jobs = JobTracker(costs=(10.0, 10.0))
    assert jobs.job_eta(0, 5.0, seconds_per_step=0.0) is None
