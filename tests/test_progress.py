"""`sdjobs.progress`: folding samples into monotonic progress, ETA and stalls, with a fake clock."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from sdjobs.progress import (
    UNFINISHED_CAP,
    JobTracker,
    PassShape,
    RequestShape,
    StageTracker,
    StallEvent,
    StallWatch,
)
from sdjobs.status import ProgressInfo, TaskProgress
from progress_helpers import sent, steps_at
from sdjobs.testing import (
    COMPLETED,
    QUEUED,
    TIMESTAMPS,
    WAITING,
    active_task,
    idle_sample,
    progress_samples,
    sample,
    task_samples,
)

OURS, OTHER, OLD = TIMESTAMPS[:3]


def fold_all(tracker: StageTracker, answers, start: float = 1.0, every: float = 1.0) -> list[float]:
    """Fold answers one per `every` seconds; the progress after each."""
    shown = []
    for i, answer in enumerate(answers):
        tracker.fold(answer, None, start + i * every)
        shown.append(tracker.progress)
    return shown


# -- the seed's acceptance criteria --------------------------------------------------------


def test_given_polls_0_2_0_1_0_5_only_0_2_and_0_5_are_applied():
    tracker = sent()
    applied = [tracker.fold(sample(step), None, now) for now, step in enumerate((2, 1, 5), start=1)]
    assert applied == [True, False, True]
    assert tracker.progress == 0.5


def test_given_a_60_second_generation_the_eta_decreases():
    tracker = sent(StageTracker(steps_per_request=20))
    etas = []
    for step in range(1, 20):
        tracker.fold(sample(step, 20), None, 3.0 * step)
        etas.append(tracker.eta(3.0 * step + 1.5))
    known = [eta for eta in etas if eta is not None]
    assert known == sorted(known, reverse=True) and len(known) == 18
    # 17 steps left less the 1.5 s gone, and something for the decode after the last one
    assert 17 * 3.0 - 1.5 < known[0] <= 17 * 3.0 - 1.5 + 3.0


# -- folding -------------------------------------------------------------------------------


def test_none_sample_changes_nothing():
    tracker = sent()
    tracker.fold(sample(3), None, 1.0)
    assert tracker.fold(None, None, 2.0) is False
    assert (tracker.progress, tracker.step, tracker.steps) == (0.3, 3, 10)


def test_samples_before_the_request_was_sent_are_not_ours():
    tracker = StageTracker()
    assert tracker.fold(sample(5), None, 0.0) is False
    tracker.request_sent(1.0, baseline=idle_sample(), task_mode=False)
    assert tracker.progress == 0.0 and tracker.step is None


def test_stale_idle_samples_count_for_nothing_and_the_first_busy_one_starts_our_job():
    tracker = sent()
    assert fold_all(tracker, [idle_sample(), idle_sample(), sample(0, job_count=-1), sample(4)]) == [0.0, 0.0, 0.0, 0.4]
    assert tracker.running


def test_job_count_minus_one_twice_is_still_our_starting_job():
    tracker = sent()
    assert fold_all(tracker, [sample(0, job_count=-1), sample(0, job_count=-1), sample(2)]) == [0.0, 0.0, 0.2]


def test_another_jobs_samples_are_ignored_until_its_timestamp_changes():
    tracker = sent(baseline=sample(2, stamp=OTHER))
    assert fold_all(tracker, [sample(5, stamp=OTHER), sample(9, stamp=OTHER)]) == [0.0, 0.0]
    assert not tracker.running
    assert fold_all(tracker, [sample(0, stamp=OURS), sample(3, stamp=OURS)]) == [0.0, 0.3]
    assert tracker.running


def test_a_job_begun_in_the_same_second_as_the_other_one_is_ours_when_it_starts_over():
    tracker = sent(baseline=sample(6, stamp=OTHER))
    assert fold_all(tracker, [sample(8, stamp=OTHER), sample(1, stamp=OTHER), sample(4, stamp=OTHER)]) == [0.0, 0.1, 0.4]


def test_after_the_other_job_went_idle_the_next_job_is_ours_even_with_its_timestamp():
    tracker = sent(baseline=sample(6, stamp=OTHER))
    assert fold_all(tracker, [idle_sample(OTHER), sample(4, stamp=OTHER)]) == [0.0, 0.4]


def test_once_our_job_ended_a_back_to_back_job_is_not_ours():
    tracker = sent()
    fold_all(tracker, [sample(7, stamp=OURS)])
    assert tracker.fold(sample(9, stamp="20260101120010"), None, 5.0) is False
    assert not tracker.running
    assert tracker.fold(sample(9, stamp=OURS), None, 6.0) is False  # ended: nothing later is ours
    assert tracker.progress == 0.7


def test_nan_negative_and_oversized_values_stay_within_bounds():
    tracker = sent()
    weird = [
        sample(progress=math.nan, job_count=0),
        sample(progress=-3.0, job_count=0),
        sample(progress=7.0, job_count=0),
        sample(15, 10),
        sample(-4, -2, job_no=-1),
    ]
    for now, answer in enumerate(weird, start=1):
        tracker.fold(answer, None, now)
        assert 0.0 <= tracker.progress <= UNFINISHED_CAP


def test_a_stage_shows_at_most_99_percent_until_it_finishes():
    tracker = sent()
    fold_all(tracker, [sample(9), sample(0, job_no=1, job_count=1, eta=-0.2)])
    assert tracker.progress == 0.9
    tracker.fold(sample(progress=1.0, job_count=0, stamp=None), None, 9.0)
    assert tracker.progress <= UNFINISHED_CAP
    tracker.request_returned(10.0)
    assert tracker.progress == UNFINISHED_CAP
    tracker.finish(10.0)
    assert tracker.progress == 1.0 and tracker.eta(11.0) == 0.0


def test_the_false_one_before_adetailer_is_not_completion_and_the_faces_keep_moving_forward():
    # trace 16: 8 main steps, then 1.0 (job_no == job_count == 1), then job_count 1 -> 3 (two faces)
    tracker = sent(StageTracker(steps_per_request=10, passes_per_request=2))
    main = [sample(step, 8) for step in range(8)]
    false_one = [sample(0, 8, job_no=1, job_count=1)]
    faces = [sample(0, 8, job_no=1, job_count=3), sample(0, 2, job_no=1, job_count=3), sample(1, 2, job_no=1, job_count=3)]
    faces += [sample(0, 2, job_no=2, job_count=3), sample(1, 2, job_no=2, job_count=3)]
    shown = fold_all(tracker, main + false_one + faces)
    before_faces = shown[len(main)]
    assert before_faces == shown[len(main) - 1] < 0.5  # the plan left room for a face
    face_progress = shown[len(main) + 2 :]
    assert face_progress == sorted(face_progress)
    assert face_progress[-1] > face_progress[1] > before_faces
    assert face_progress[-1] < UNFINISHED_CAP


def test_a_job_count_that_grows_twice_is_rescaled_each_time():
    # n_iter 2 with ADetailer finding 2 faces per image: job_count 2 -> 4 -> 6
    tracker = sent(StageTracker(passes_per_request=4))
    samples = [sample(s, 4, job_no=0, job_count=2) for s in range(4)]
    samples += [sample(0, 4, job_no=1, job_count=4)] + [sample(1, 2, job_no=n, job_count=4) for n in (1, 2)]
    samples += [sample(s, 4, job_no=3, job_count=4) for s in range(1, 4)]
    samples += [sample(0, 4, job_no=4, job_count=4), sample(0, 4, job_no=4, job_count=6)]
    samples += [sample(1, 2, job_no=n, job_count=6) for n in (4, 5)]
    shown = fold_all(tracker, samples)
    assert shown == sorted(shown)
    moved = [later > earlier for earlier, later in zip(shown, shown[1:])]
    assert moved[-2:] == [True, True]  # the last faces still move the bar
    assert shown[-1] < UNFINISHED_CAP


def test_each_request_of_a_stage_has_its_share():
    tracker = sent(StageTracker(requests=2))
    tracker.fold(sample(5), None, 1.0)
    assert tracker.progress == 0.25
    tracker.request_returned(2.0)
    assert tracker.progress == 0.5
    tracker.request_sent(2.0, baseline=idle_sample(OURS), task_mode=False)
    tracker.fold(sample(5, stamp="20260101120009"), None, 3.0)
    assert tracker.progress == 0.75


def test_step_and_steps_follow_the_pass_and_ignore_stale_steps():
    tracker = sent()
    tracker.fold(sample(0, 2), None, 1.0)  # sampling_steps still the last job's
    assert (tracker.step, tracker.steps) == (0, None)
    tracker.fold(sample(0, 12), None, 1.5)  # changed: now it is this pass's
    assert (tracker.step, tracker.steps) == (0, 12)
    tracker.fold(sample(3, 12), None, 2.0)
    assert (tracker.step, tracker.steps) == (3, 12)
    tracker.fold(sample(0, 12, job_no=1, job_count=2), None, 3.0)  # hires pass, steps not yet switched
    assert (tracker.step, tracker.steps) == (0, None)


def test_the_image_is_the_request_in_flight_then_the_next_one():
    tracker = StageTracker(requests=3)
    assert tracker.image == (1, 3)  # before the first request
    seen = []
    for number, stamp in enumerate(("20260101120001", "20260101120002", "20260101120003")):
        tracker.request_sent(number * 10.0, baseline=idle_sample(OURS), task_mode=False)
        tracker.fold(sample(5, stamp=stamp), None, number * 10.0 + 1)
        seen.append(tracker.image)
        tracker.request_returned(number * 10.0 + 2)
    assert seen == [(1, 3), (2, 3), (3, 3)]
    assert tracker.image == (3, 3)  # never past the last
    assert StageTracker().image is None  # one image: nothing to count


def test_the_image_of_one_request_follows_its_passes_two_each_with_hires():
    # n_iter 3 with hires fix: passes 0-1 sample image 1, 2-3 image 2, 4-5 image 3
    tracker = sent(StageTracker(passes_per_request=6, images_per_request=3))
    images = []
    for job_no in range(7):  # job_no 6: the server's count is done, the request not yet answered
        tracker.fold(sample(3, job_no=job_no, job_count=6), None, 1.0 + job_no)
        images.append(tracker.image)
    assert images == [(1, 3), (1, 3), (2, 3), (2, 3), (3, 3), (3, 3), (3, 3)]


def test_the_images_of_several_requests_of_several_iterations_are_counted_across_the_stage():
    tracker = sent(StageTracker(requests=2, passes_per_request=2, images_per_request=2))
    tracker.request_returned(1.0)
    tracker.request_sent(2.0, baseline=idle_sample(OURS), task_mode=False)
    assert tracker.image == (3, 4)
    tracker.fold(sample(3, job_no=1, job_count=2, stamp="20260101120009"), None, 3.0)
    assert tracker.image == (4, 4)


@pytest.mark.parametrize(
    "bad", [{"requests": 0}, {"passes_per_request": 0}, {"steps_per_request": 0}, {"images_per_request": 0}]
)
def test_a_nonsensical_plan_is_refused(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        StageTracker(**bad)


# -- task mode -----------------------------------------------------------------------------


def test_task_mode_queued_shows_the_position_and_no_progress():
    tracker = sent(task_mode=True)
    assert tracker.fold(None, QUEUED, 1.0) is True
    assert tracker.queue_position == (2, 3) and tracker.progress == 0.0 and not tracker.running
    assert tracker.stalled_for(500.0) is None


def test_task_mode_active_uses_the_global_sample_for_steps():
    tracker = sent(task_mode=True)
    tracker.fold(None, QUEUED, 1.0)
    assert tracker.fold(sample(4), active_task(0.4), 2.0) is True
    assert (tracker.progress, tracker.step, tracker.steps, tracker.queue_position) == (0.4, 4, 10, None)
    assert tracker.running


def test_task_mode_a_global_sample_that_disagrees_with_the_task_gives_only_the_tasks_figure():
    tracker = sent(task_mode=True)
    tracker.fold(sample(8, stamp=OTHER), active_task(0.0), 1.0)  # taken while the job before ours ended
    assert (tracker.progress, tracker.step) == (0.0, None)
    tracker.fold(None, active_task(0.3), 2.0)
    assert tracker.progress == 0.3


def test_task_mode_samples_without_our_task_are_not_ours():
    tracker = sent(task_mode=True)
    for now, task in enumerate((None, WAITING), start=1):
        assert tracker.fold(sample(5), task, now) is False
    assert tracker.progress == 0.0


def test_task_mode_completed_means_no_longer_running():
    tracker = sent(task_mode=True)
    tracker.fold(sample(5), active_task(0.5), 1.0)
    tracker.fold(None, COMPLETED, 2.0)
    assert not tracker.running and tracker.progress == 0.5


# -- ETA -------------------------------------------------------------------------------------


def test_eta_is_none_until_two_steps_have_been_seen():
    tracker = sent(StageTracker(steps_per_request=10))
    tracker.fold(sample(0, 10, eta=400.0), None, 1.0)
    assert tracker.eta(2.0) is None
    tracker.fold(sample(1, 10, eta=30.0), None, 5.0)  # the first step hides the warm-up
    assert tracker.eta(5.5) is None
    tracker.fold(sample(2, 10, eta=20.0), None, 7.0)
    assert tracker.seconds_per_step == 2.0
    assert 7 * 2.0 < tracker.eta(7.0) <= 8 * 2.0  # steps 3..9 are left, then the decode
    assert tracker.eta(8.5) == pytest.approx(tracker.eta(7.0) - 1.5)


def test_eta_counts_the_passes_still_to_come():
    # n_iter 2: two passes of 10 steps each
    tracker = sent(StageTracker(steps_per_request=20, passes_per_request=2))
    tracker.fold(sample(1, 10, job_count=2), None, 1.0)
    tracker.fold(sample(2, 10, job_count=2), None, 2.0)
    assert 7 + 10 < tracker.eta(2.0) <= 7 + 10 + 2


def test_eta_counts_the_hires_pass_from_the_plan():
    # 10 steps, then a hires pass of 4 (hr_second_pass_steps)
    tracker = sent(StageTracker(steps_per_request=14, passes_per_request=2))
    tracker.fold(sample(1, 10, job_count=2), None, 1.0)
    tracker.fold(sample(2, 10, job_count=2), None, 2.0)
    assert 7 + 4 < tracker.eta(2.0) <= 7 + 4 + 2


def test_eta_counts_the_requests_still_to_send():
    alone = sent(StageTracker(requests=1))
    tracker = sent(StageTracker(requests=3))
    for one in (alone, tracker):
        one.fold(sample(1, 10), None, 1.0)
        one.fold(sample(2, 10), None, 2.0)
    left = alone.eta(2.0)
    # `left` in this request, which will have taken 2 s + `left`: two more like it
    assert tracker.eta(2.0) == pytest.approx(left + 2 * (2 + left))
    tracker.request_returned(10.0)
    tracker.request_sent(10.0, baseline=idle_sample(OURS), task_mode=False)
    tracker.fold(sample(1, 10, stamp="20260101120011"), None, 11.0)
    tracker.fold(sample(2, 10, stamp="20260101120011"), None, 12.0)
    assert tracker.eta(12.0) == pytest.approx(left + 10)  # the first one took 10 s


def test_the_servers_eta_is_used_only_when_its_samples_show_no_steps():
    def stepless(progress: float, eta: float) -> ProgressInfo:
        return ProgressInfo(progress=progress, eta_relative=eta, job_count=1, job_timestamp=OURS)

    tracker = sent()
    tracker.fold(stepless(0.01, 300.0), None, 1.0)  # its start: wild
    assert tracker.eta(1.0) is None
    tracker.fold(stepless(0.5, 8.0), None, 2.0)
    assert tracker.eta(3.0) == pytest.approx(7.0)


def test_the_task_eta_is_used_when_the_global_sample_is_missing():
    tracker = sent(task_mode=True)
    tracker.fold(None, active_task(0.0), 1.0)
    assert tracker.eta(1.0) is None
    tracker.fold(None, active_task(0.25, eta=12.0), 2.0)
    assert tracker.eta(4.0) == pytest.approx(10.0)


def test_eta_is_none_while_queued():
    tracker = sent(task_mode=True)
    tracker.fold(sample(5, stamp=OTHER), QUEUED, 1.0)
    assert tracker.eta(2.0) is None


# -- stalls ----------------------------------------------------------------------------------


def test_stalled_for_counts_while_our_job_shows_no_change():
    tracker = sent()
    tracker.fold(sample(3), None, 1.0)
    tracker.fold(sample(3), None, 30.0)
    assert tracker.stalled_for(61.0) == 60.0
    tracker.fold(sample(4), None, 62.0)
    assert tracker.stalled_for(63.0) == 1.0


def test_a_new_pass_is_movement_even_when_the_bar_does_not_move():
    tracker = sent(StageTracker(passes_per_request=2))
    tracker.fold(sample(0, 8, job_no=1, job_count=1), None, 1.0)  # the false 1.0: nothing shown
    tracker.fold(sample(0, 8, job_no=1, job_count=3), None, 50.0)  # ADetailer adds its faces
    assert tracker.stalled_for(60.0) == 10.0


def test_no_evidence_is_no_stall():
    tracker = sent()
    assert tracker.stalled_for(100.0) is None  # our job never seen
    tracker.fold(sample(3), None, 1.0)
    tracker.fold(None, None, 2.0)  # the poller got no answer
    assert tracker.stalled_for(100.0) is None
    tracker.fold(sample(3), None, 101.0)
    assert tracker.stalled_for(101.0) == 100.0


def test_stall_watch_reports_once_per_stall_and_interrupts_once():
    watch = StallWatch(stall_after=60.0, interrupt_after=90.0)
    seen = [watch.check(seconds) for seconds in (10.0, 60.0, 70.0, None, 95.0, 100.0)]
    assert seen == [(), (StallEvent.STALLED,), (), (), (StallEvent.INTERRUPT,), ()]
    assert watch.check(1.0) == ()  # progress again: the stall is over
    assert watch.check(200.0) == (StallEvent.STALLED, StallEvent.INTERRUPT)


def test_stall_watch_never_interrupts_by_default():
    watch = StallWatch()
    assert watch.check(1e6) == (StallEvent.STALLED,)


# -- the job ---------------------------------------------------------------------------------


def test_job_progress_weighs_stages_by_cost():
    jobs = JobTracker(costs=(20.0, 10.0, 10.0))
    assert jobs.job_progress(0, 0.5) == 0.25
    assert jobs.job_progress(1, 0.5) == 0.625
    assert jobs.job_progress(2, 1.0) == 1.0


def test_job_progress_never_goes_back():
    jobs = JobTracker(costs=(1.0, 1.0))
    assert jobs.job_progress(0, 0.8) == 0.4
    assert jobs.job_progress(0, 0.2) == 0.4
    assert jobs.job_progress(1, math.nan) == 0.4


def test_job_eta_counts_later_stages_at_the_observed_step_rate():
    jobs = JobTracker(costs=(20.0, 8.0, 1.0))
    assert jobs.job_eta(0, 10.0) is None  # no step timed yet
    assert jobs.job_eta(0, 10.0, seconds_per_step=0.5) == pytest.approx(10.0 + 9 * 0.5)
    assert jobs.job_eta(2, 3.0) == 3.0
    assert jobs.job_eta(1, None, 0.5) is None
    assert jobs.job_eta(1, 2.0) == pytest.approx(2.5)  # the last rate is remembered


def test_job_eta_takes_each_later_stage_from_history_where_it_knows_it_else_at_the_step_rate():
    jobs = JobTracker(costs=(20.0, 8.0, 2.0), seconds=(30.0, 12.0, None))  # an upscale never run there
    assert jobs.job_eta(0, 10.0) is None  # the upscale: neither history nor a timed step prices it
    assert jobs.job_eta(0, 10.0, seconds_per_step=0.5) == pytest.approx(10.0 + 12.0 + 2 * 0.5)
    assert jobs.job_eta(1, 4.0) == pytest.approx(4.0 + 2 * 0.5)


@pytest.mark.parametrize("costs", [(), (1.0, 0.0), (1.0, -2.0), (math.nan,)])
def test_job_costs_must_be_positive(costs):
    with pytest.raises(ValueError, match="costs"):
        JobTracker(costs=costs)


def test_a_server_eta_too_large_for_the_requests_left_is_no_estimate():
    tracker = StageTracker(requests=3)
    tracker.request_sent(0.0, baseline=None, task_mode=True)
    task = TaskProgress(active=True, queued=False, completed=False, progress=0.5, eta=6e307)
    tracker.fold(None, task, 1.0)  # no step detail: the server's own figure, times three requests
    assert tracker.eta(1.0) is None


# -- properties ------------------------------------------------------------------------------

class StageRules(RuleBasedStateMachine):
    """Any interleaving of requests, samples and time keeps the stage's promises."""

    def __init__(self) -> None:
        super().__init__()
        self.tracker = StageTracker(requests=3, steps_per_request=20, passes_per_request=2)
        self.now = 0.0
        self.sent = 0
        self.in_flight = False
        self.finished = False
        self.highest = 0.0

    @precondition(lambda self: not self.in_flight and self.sent < 3 and not self.finished)
    @rule(baseline=progress_samples(), task_mode=st.booleans())
    def send(self, baseline, task_mode) -> None:
        self.tracker.request_sent(self.now, baseline=baseline, task_mode=task_mode)
        self.sent += 1
        self.in_flight = True

    @rule(sample=progress_samples(), task=task_samples(), seconds=st.floats(0.0, 5.0))
    def poll(self, sample, task, seconds) -> None:
        self.now += seconds
        before = (self.tracker.progress, self.tracker.step, self.tracker.steps, self.tracker.queue_position)
        changed = self.tracker.fold(sample, task, self.now)
        after = (self.tracker.progress, self.tracker.step, self.tracker.steps, self.tracker.queue_position)
        assert changed == (before != after)
        if sample is None and task is None:
            assert not changed

    @precondition(lambda self: self.in_flight)
    @rule(seconds=st.floats(0.0, 100.0))
    def returned(self, seconds) -> None:
        self.now += seconds
        self.tracker.request_returned(self.now)
        self.in_flight = False

    @precondition(lambda self: self.sent == 3 and not self.finished)
    @rule()
    def finish(self) -> None:
        self.tracker.finish(self.now)
        self.finished = True

    @invariant()
    def progress_only_moves_forward_within_bounds(self) -> None:
        progress = self.tracker.progress
        assert self.highest <= progress <= (1.0 if self.finished else UNFINISHED_CAP)
        assert not self.finished or progress == 1.0
        self.highest = progress

    @invariant()
    def eta_and_stall_are_sensible(self) -> None:
        eta = self.tracker.eta(self.now)
        assert eta is None or (math.isfinite(eta) and eta >= 0.0)
        stalled = self.tracker.stalled_for(self.now)
        assert stalled is None or stalled >= 0.0
        assert stalled is None or self.tracker.running


TestStageRules = StageRules.TestCase


@given(st.lists(st.tuples(st.integers(0, 3), st.floats(allow_nan=True, allow_infinity=True)), max_size=30))
def test_job_progress_is_monotonic_and_within_bounds(calls):
    jobs = JobTracker(costs=(3.0, 1.0, 0.5, 2.0))
    highest, stage = 0.0, 0
    for index, value in calls:
        stage = max(stage, index)
        progress = jobs.job_progress(stage, value)
        assert highest <= progress <= 1.0
        highest = progress


# -- the in-run model: recent rate, tails, sizes, added passes, quiet phases -----------------


def test_the_rate_follows_the_latest_steps_not_the_mean_of_the_pass():
    tracker = sent(StageTracker(steps_per_request=20))
    times, now = [], 0.0
    for step in range(1, 13):  # steps slow down from 1 s to 3 s
        now += 1.0 if step <= 6 else 3.0
        times.append(now)
    steps_at(tracker, times, 20)
    mean = (times[-1] - times[0]) / (len(times) - 1)
    assert tracker.seconds_per_step == pytest.approx(3.0)
    assert tracker.eta(now) > 7 * 3.0 > 7 * mean  # 7 steps left, at the latest pace


def test_the_tail_after_a_pass_is_learned_and_priced_into_the_next():
    shape = RequestShape((PassShape(10),), iterations=2)
    quick, slow = (sent(StageTracker(shape=shape)) for _ in range(2))
    for tracker, tail in ((quick, 0.5), (slow, 6.0)):
        steps_at(tracker, [1.0 * s for s in range(1, 10)], job_count=2)  # step 9 of 10 at 9 s
        tracker.fold(sample(0, 10, job_no=1, job_count=2), None, 9.0 + tail)
        steps_at(tracker, [9.0 + tail + 2 + s for s in range(2)], job_count=2, job_no=1)
    # at step 2 of the second pass: the slow decode is expected again at its end
    assert slow.eta(9.0 + 6.0 + 3) - quick.eta(9.0 + 0.5 + 3) == pytest.approx(6.0 - 0.5)


def test_a_hires_pass_is_priced_by_its_size_until_its_own_steps_are_timed():
    settings = {"steps": 10, "width": 512, "height": 512, "enable_hr": True, "hr_scale": 2, "hr_second_pass_steps": 10}
    sized = sent(StageTracker(shape=RequestShape.of("txt2img", settings)))
    counted = sent(StageTracker(steps_per_request=20, passes_per_request=2))
    for tracker in (sized, counted):
        steps_at(tracker, [1.0 * s for s in range(1, 5)], job_count=2)
    assert sized.eta(4.0) > counted.eta(4.0) + 2.0  # its steps cost more than the base size's
    for tracker in (sized, counted):
        tracker.fold(sample(9, 10, job_count=2), None, 9.0)
        tracker.fold(sample(0, 10, job_no=1, job_count=2), None, 9.5)
        steps_at(tracker, [9.5 + 2 * 1.2, 9.5 + 3 * 1.2], job_count=2, job_no=1)  # hires: 1.2 s a step
    assert sized.seconds_per_step == pytest.approx(1.2)
    assert sized.eta(13.1) == pytest.approx(counted.eta(13.1), rel=0.05)  # the evidence wins


def test_adetailer_faces_are_priced_as_the_server_counts_them():
    shape = RequestShape.of("txt2img", {"steps": 10}, {"ad_steps": 10, "ad_use_steps": True, "ad_denoising_strength": 0.4})
    tracker = sent(StageTracker(shape=shape))
    steps_at(tracker, [1.0 * s for s in range(1, 10)])
    one_face = tracker.eta(9.0)
    tracker.fold(sample(0, 10, job_no=1, job_count=1), None, 9.5)  # the false 1.0: detection
    assert tracker.eta(9.5) > 0
    tracker.fold(sample(0, 10, job_no=1, job_count=4), None, 11.0)  # three faces
    three_faces = tracker.eta(11.0)
    assert three_faces >= 3 * 5 * 1.0 > one_face  # three face passes of 5 steps, no longer one
    steps_at(tracker, [12.0, 13.0], 5, job_no=1, job_count=4)
    assert tracker.eta(13.0) > 2 * 5 * 1.0  # the other two faces are still to come


def test_passes_a_script_adds_do_not_collapse_the_estimate():
    tracker = sent(StageTracker(steps_per_request=10))
    steps_at(tracker, [1.0 * s for s in range(1, 10)])
    tracker.fold(sample(0, 10, job_no=1, job_count=3), None, 10.0)  # the server adds two passes
    steps_at(tracker, [12.0, 13.0], job_no=1, job_count=3)
    assert tracker.eta(13.0) >= 7 + 10  # the rest of this pass and one more like it


def test_a_long_decode_within_what_the_run_expects_is_no_stall():
    shape = RequestShape((PassShape(10),), iterations=2)
    tracker = sent(StageTracker(shape=shape))
    steps_at(tracker, [1.0 * s for s in range(1, 10)], job_count=2)
    tracker.fold(sample(0, 10, job_no=1, job_count=2), None, 29.0)  # a 20 s decode
    steps_at(tracker, [29.0 + s for s in range(2, 11)], job_count=2, job_no=1)  # last step at 38 s
    assert tracker.stalled_for(58.0) == 0.0  # 20 s after the last step: as the first decode took
    assert tracker.stalled_for(100.0) > 0.0  # far past it: a stall
    watch = StallWatch(stall_after=10.0)
    assert watch.check(tracker.stalled_for(58.0)) == ()


class _History:
    """A prior as a server's history would give it: 2 s a step, 3 s of warm-up, 1 s decode."""

    def seconds_per_step(self, pixels: int, batch: int) -> float:
        return 2.0 * pixels / (512 * 512)

    def warmup(self) -> float:
        return 3.0

    def tail(self, pixels: int, batch: int, images: int) -> float:
        return 1.0

    def detection(self) -> None:
        return None

    def lead(self, kind: str) -> None:
        return None


def test_a_prior_gives_an_estimate_before_any_step_and_the_run_overrides_it():
    tracker = sent(StageTracker(shape=RequestShape((PassShape(10),)), prior=_History()))
    tracker.fold(sample(0, 10), None, 0.5)  # the job is seen at 0.5 s
    assert tracker.eta(0.5) == pytest.approx(3.0 + 10 * 2.0 + 1.0)
    steps_at(tracker, [4.0, 4.5, 5.0])  # this server is four times faster today
    assert tracker.seconds_per_step == pytest.approx(0.5)
    assert tracker.eta(5.0) == pytest.approx(6 * 0.5 + 1.0)  # steps 4..9, then the prior's tail: none seen yet


# -- which pass is shown ----------------------------------------------------------------------


def test_the_hires_pass_is_named_and_the_main_one_not():
    shape = RequestShape.of("txt2img", {"steps": 10, "enable_hr": True, "hr_second_pass_steps": 6})
    tracker = sent(StageTracker(shape=shape))
    tracker.fold(sample(3, 10, job_count=2), None, 1.0)
    assert tracker.current_pass == (None, None)
    assert tracker.fold(sample(1, 6, job_no=1, job_count=2), None, 2.0)
    assert tracker.current_pass == ("hires", None)


@pytest.mark.parametrize("counted_late", [False, True], ids=["count seen rising", "first sample already counts the faces"])
def test_each_adetailer_face_is_numbered_of_the_faces_found(counted_late):
    shape = RequestShape.of("adetailer", {"steps": 10}, {"ad_denoising_strength": 0.4})
    tracker = sent(StageTracker(shape=shape))
    if not counted_late:
        tracker.fold(sample(0, 10, job_no=1, job_count=1), None, 1.0)  # the skipped img2img pass, then the detection
        assert tracker.current_pass == ("face", None)  # the faces are not counted yet
    tracker.fold(sample(1, 5, job_no=1, job_count=3), None, 2.0)  # two faces found
    assert tracker.current_pass == ("face", (1, 2))
    tracker.fold(sample(1, 5, job_no=2, job_count=3), None, 3.0)
    assert tracker.current_pass == ("face", (2, 2))
    tracker.request_returned(4.0)
    assert tracker.current_pass == (None, None)
