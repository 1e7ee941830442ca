"""Details of progress that the broader tests let slip: which job is ours when the other one
starts over or the server shows no stamps, a stall's edges, and the job's ETA and progress
at their limits."""

from __future__ import annotations

import math

import pytest

from sdjobs.progress import JobTracker, PassShape, RequestShape, StageTracker, StallEvent, StallWatch
from sdjobs.status import ProgressInfo, TaskProgress
from sdjobs.testing import TIMESTAMPS, active_task, idle_sample, sample

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


# -- the request's share, exactly ---------------------------------------------------------------


def sent_at(tracker: StageTracker, now: float, *, task_mode: bool = False) -> StageTracker:
    tracker.request_sent(now, baseline=None if task_mode else idle_sample(), task_mode=task_mode)
    return tracker


def test_a_request_the_server_counts_fewer_passes_for_than_planned_is_shared_among_the_planned_ones():
    tracker = sent_at(StageTracker(passes_per_request=4), 0.0)  # e.g. two passes and two faces expected
    tracker.fold(sample(5, 10, job_no=1, job_count=2), None, 1.0)  # pass 2 of the server's 2, half way
    assert tracker.progress == pytest.approx(1.5 / 4)


def test_when_the_server_adds_passes_the_rest_of_its_count_maps_onto_the_rest_of_the_bar():
    tracker = sent_at(StageTracker(), 0.0)
    tracker.fold(sample(5, 10), None, 1.0)
    assert tracker.progress == 0.5
    tracker.fold(sample(0, 10, job_no=1, job_count=3), None, 2.0)  # two passes added: the server says 1/3
    assert tracker.progress == 0.5  # not back
    tracker.fold(sample(0, 10, job_no=2, job_count=3), None, 3.0)  # the server: 2/3, half of what was left
    assert tracker.progress == pytest.approx(0.5 + (2 / 3 - 1 / 3) / (1 - 1 / 3) * (1 - 0.5))


def test_a_count_that_grows_in_a_sample_showing_every_pass_done_leaves_the_bar_where_it_was():
    tracker = sent_at(StageTracker(), 0.0)
    tracker.fold(sample(3, 10), None, 1.0)
    tracker.fold(sample(10, 10, job_no=1, job_count=2), None, 2.0)  # 2 of 2 done: nothing left to map
    assert tracker.progress == 0.3


# -- what a sample without detail, a task or a missing sample shows ------------------------------


def test_a_sample_without_a_step_or_without_steps_shows_no_step():
    tracker = sent_at(StageTracker(), 0.0)
    tracker.fold(ProgressInfo(0.3, 5.0, current_step=3, total_steps=0, job_count=1, job_timestamp=OURS), None, 1.0)
    assert (tracker.step, tracker.steps) == (None, None)
    assert tracker.progress == pytest.approx(0.3)  # the server's own figure
    tracker.fold(sample(4, 10), None, 2.0)
    tracker.fold(ProgressInfo(0.6, 5.0, current_step=None, total_steps=10, job_count=1, job_timestamp=OURS), None, 3.0)
    assert (tracker.step, tracker.steps) == (4, 10)  # the last step shown stays


def test_without_a_baseline_sample_the_first_busy_sample_is_ours():
    assert ours_after(None, sample(3, stamp=OTHER)) == [True]


def test_a_task_not_queued_shows_no_queue_position_whatever_its_text():
    tracker = sent_at(StageTracker(), 0.0, task_mode=True)
    done = TaskProgress(active=False, queued=False, completed=True, queue_position=(1, 2), textinfo="In queue: 1/2")
    tracker.fold(None, done, 1.0)
    assert tracker.queue_position is None


def test_in_task_mode_the_tasks_eta_replaces_the_global_samples():
    tracker = sent_at(StageTracker(), 10.0, task_mode=True)
    stepless = ProgressInfo(0.5, 30.0, job_count=1, job_timestamp=OURS)  # no step detail (SD.Next)
    tracker.fold(stepless, active_task(0.5, eta=12.0), 11.0)
    assert tracker.eta(11.0) == 12.0


def test_the_servers_eta_counts_down_with_the_clock_to_zero_and_an_unusable_one_is_none():
    tracker = sent_at(StageTracker(), 10.0, task_mode=True)
    tracker.fold(None, active_task(0.5, eta=10.0), 11.0)
    assert tracker.eta(15.0) == 6.0
    assert tracker.eta(30.0) == 0.0
    tracker.fold(None, active_task(0.6, eta=0.5), 31.0)  # under a second, or exactly 0: usable
    assert tracker.eta(31.0) == 0.5
    tracker.fold(None, active_task(0.7, eta=0.0), 32.0)
    assert tracker.eta(32.0) == 0.0
    tracker.fold(None, active_task(0.8, eta=-3.0), 33.0)  # not usable: no figure, not the old one
    assert tracker.eta(33.0) is None


def test_a_server_that_stops_answering_is_stalled_from_the_send_when_nothing_moved():
    tracker = sent_at(StageTracker(), 50.0)
    tracker.fold(None, None, 80.0, silent=True)  # the sample timed out
    assert tracker.stalled_for(80.0) == 30.0
    tracker.fold(sample(2), None, 81.0)
    tracker.fold(None, None, 90.0, silent=True)
    assert tracker.stalled_for(90.0) == 9.0  # from the last movement


def test_in_task_mode_an_active_task_that_does_not_move_is_stalled_and_a_missing_one_is_no_evidence():
    tracker = sent_at(StageTracker(), 10.0, task_mode=True)
    tracker.fold(None, active_task(0.2), 11.0)
    tracker.fold(None, active_task(0.2), 40.0)
    assert tracker.stalled_for(41.0) == 30.0
    tracker.fold(sample(3), None, 42.0)  # the task's own sample got no answer
    assert tracker.stalled_for(42.0) is None


def test_between_requests_nothing_runs_and_nothing_is_stalled():
    tracker = sent_at(StageTracker(requests=2), 0.0)
    tracker.fold(sample(3), None, 1.0)
    tracker.fold(None, None, 20.0, silent=True)
    tracker.request_returned(21.0)
    assert not tracker.running
    assert tracker.stalled_for(100.0) is None


def test_the_requests_still_to_send_take_the_mean_time_of_those_answered():
    tracker = sent_at(StageTracker(requests=4), 100.0, task_mode=True)
    tracker.fold(None, active_task(0.5, eta=5.0), 102.0)
    assert tracker.eta(102.0) == 5.0 + 3 * (2.0 + 5.0)  # each as long as this one will have taken
    tracker.request_returned(110.0)  # 10 s
    sent_at(tracker, 110.0, task_mode=True)
    tracker.request_returned(130.0)  # 20 s
    sent_at(tracker, 130.0, task_mode=True)
    tracker.fold(None, active_task(0.5, eta=4.0), 132.0)
    assert tracker.eta(132.0) == 4.0 + 1 * (10.0 + 20.0) / 2


def test_the_answers_decode_and_save_after_the_last_pass_is_no_stall_within_what_the_run_expects():
    """A1111 counts the last pass done (`job_no == job_count`) while it decodes and saves: that
    quiet phase is expected as long as the stage's first answer took after its last step."""
    tracker = StageTracker(requests=2, shape=RequestShape((PassShape(10),)))
    for start in (0.0, 30.0):
        sent_at(tracker, start)
        for step in range(1, 10):
            tracker.fold(sample(step, 10), None, start + step)
        tracker.fold(sample(0, 10, job_no=1, job_count=1), None, start + 9.5)  # the last pass counted done
        if start == 0.0:
            tracker.request_returned(start + 29.0)  # 20 s after its last step
    assert tracker.stalled_for(39.5 + 25.0) == 0.0  # within twice the 20 s the first one took
    assert tracker.stalled_for(39.5 + 45.0) == 5.0
