"""Details of progress that the broader tests let slip: which job is ours when the other one
starts over or the server shows no stamps, a stall's edges, and the job's ETA and progress
at their limits."""

from __future__ import annotations

import math

import pytest

from progress_helpers import sent, steps_at
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
    assert ours_after(sample(5, stamp=OTHER), sample(5, stamp=OTHER)) == [False]  # still at the same step


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


def test_a_request_the_server_counts_fewer_passes_for_than_planned_is_shared_among_the_planned_ones():
    tracker = sent(StageTracker(passes_per_request=4))  # e.g. two passes and two faces expected
    tracker.fold(sample(5, 10, job_no=1, job_count=2), None, 1.0)  # pass 2 of the server's 2, half way
    assert tracker.progress == pytest.approx(1.5 / 4)


def test_when_the_server_adds_passes_the_rest_of_its_count_maps_onto_the_rest_of_the_bar():
    tracker = sent(StageTracker())
    tracker.fold(sample(5, 10), None, 1.0)
    assert tracker.progress == 0.5
    tracker.fold(sample(0, 10, job_no=1, job_count=3), None, 2.0)  # two passes added: the server says 1/3
    assert tracker.progress == 0.5  # not back
    tracker.fold(sample(0, 10, job_no=2, job_count=3), None, 3.0)  # the server: 2/3, half of what was left
    assert tracker.progress == pytest.approx(0.5 + (2 / 3 - 1 / 3) / (1 - 1 / 3) * (1 - 0.5))


def test_a_count_that_grows_in_a_sample_showing_every_pass_done_leaves_the_bar_where_it_was():
    tracker = sent(StageTracker())
    tracker.fold(sample(3, 10), None, 1.0)
    tracker.fold(sample(10, 10, job_no=1, job_count=2), None, 2.0)  # 2 of 2 done: nothing left to map
    assert tracker.progress == 0.3


# -- what a sample without detail, a task or a missing sample shows ------------------------------


def test_a_sample_without_a_step_or_without_steps_shows_no_step():
    tracker = sent(StageTracker())
    tracker.fold(ProgressInfo(0.3, 5.0, current_step=3, total_steps=0, job_count=1, job_timestamp=OURS), None, 1.0)
    assert (tracker.step, tracker.steps) == (None, None)
    assert tracker.progress == pytest.approx(0.3)  # the server's own figure
    tracker.fold(sample(4, 10), None, 2.0)
    tracker.fold(ProgressInfo(0.6, 5.0, current_step=None, total_steps=10, job_count=1, job_timestamp=OURS), None, 3.0)
    assert (tracker.step, tracker.steps) == (4, 10)  # the last step shown stays


def test_without_a_baseline_sample_the_first_busy_sample_is_ours():
    assert ours_after(None, sample(3, stamp=OTHER)) == [True]


def test_a_task_not_queued_shows_no_queue_position_whatever_its_text():
    tracker = sent(task_mode=True)
    done = TaskProgress(active=False, queued=False, completed=True, queue_position=(1, 2), textinfo="In queue: 1/2")
    tracker.fold(None, done, 1.0)
    assert tracker.queue_position is None


def test_in_task_mode_the_tasks_eta_replaces_the_global_samples():
    tracker = sent(StageTracker(), now=10.0, task_mode=True)
    stepless = ProgressInfo(0.5, 30.0, job_count=1, job_timestamp=OURS)  # no step detail (SD.Next)
    tracker.fold(stepless, active_task(0.5, eta=12.0), 11.0)
    assert tracker.eta(11.0) == 12.0


def test_the_servers_eta_counts_down_with_the_clock_to_zero_and_an_unusable_one_is_none():
    tracker = sent(StageTracker(), now=10.0, task_mode=True)
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
    tracker = sent(StageTracker(), now=50.0)
    tracker.fold(None, None, 80.0, silent=True)  # the sample timed out
    assert tracker.stalled_for(80.0) == 30.0
    tracker.fold(sample(2), None, 81.0)
    tracker.fold(None, None, 90.0, silent=True)
    assert tracker.stalled_for(90.0) == 9.0  # from the last movement


def test_in_task_mode_an_active_task_that_does_not_move_is_stalled_and_a_missing_one_is_no_evidence():
    tracker = sent(StageTracker(), now=10.0, task_mode=True)
    tracker.fold(None, active_task(0.2), 11.0)
    tracker.fold(None, active_task(0.2), 40.0)
    assert tracker.stalled_for(41.0) == 30.0
    tracker.fold(sample(3), None, 42.0)  # the task's own sample got no answer
    assert tracker.stalled_for(42.0) is None


def test_between_requests_nothing_runs_and_nothing_is_stalled():
    tracker = sent(StageTracker(requests=2))
    tracker.fold(sample(3), None, 1.0)
    tracker.fold(None, None, 20.0, silent=True)
    tracker.request_returned(21.0)
    assert not tracker.running
    assert tracker.stalled_for(100.0) is None


def test_the_requests_still_to_send_take_the_mean_time_of_those_answered():
    tracker = sent(StageTracker(requests=4), now=100.0, task_mode=True)
    tracker.fold(None, active_task(0.5, eta=5.0), 102.0)
    assert tracker.eta(102.0) == 5.0 + 3 * (2.0 + 5.0)  # each as long as this one will have taken
    tracker.request_returned(110.0)  # 10 s
    sent(tracker, now=110.0, task_mode=True)
    tracker.request_returned(130.0)  # 20 s
    sent(tracker, now=130.0, task_mode=True)
    tracker.fold(None, active_task(0.5, eta=4.0), 132.0)
    assert tracker.eta(132.0) == 4.0 + 1 * (10.0 + 20.0) / 2


@pytest.mark.parametrize(
    "shape",
    [
        RequestShape((PassShape(10),)),
        RequestShape((PassShape(10),), iterations=2),
        RequestShape.of("txt2img", {"steps": 10, "enable_hr": True, "hr_second_pass_steps": 10}),
    ],
    ids=["one pass", "two images", "hires"],
)
def test_the_answers_decode_and_save_after_the_last_pass_is_no_stall_within_what_the_run_expects(shape):
    """A1111 counts the last pass done (`job_no == job_count`) while it decodes and saves: that
    quiet phase is expected as long as the stage's first answer took after its last step (not
    as a quick decode between passes, nor in proportion to another pass's size)."""
    passes = len(shape.sequence([]))
    tracker = StageTracker(requests=2, shape=shape)
    for start in (0.0, 100.0):
        sent(tracker, now=start)
        for job_no in range(passes):  # 1 s a step, each pass's first step 2 s after the last one's last
            steps_at(tracker, [start + 10.0 * job_no + s for s in range(1, 10)], job_no=job_no, job_count=passes)
        last_step = start + 10.0 * passes - 1
        tracker.fold(sample(0, 10, job_no=passes, job_count=passes), None, last_step + 0.5)  # every pass counted done
        if start == 0.0:
            tracker.request_returned(last_step + 20.0)
    assert tracker.stalled_for(last_step + 0.5 + 25.0) == 0.0  # within twice the 20 s the first one took
    assert tracker.stalled_for(last_step + 0.5 + 45.0) == 5.0


# -- the in-run model: which steps time a pass, what the server shows beyond the plan ---------------

BASE = 512 * 512
ONE_PASS = RequestShape((PassShape(10),))


def test_the_rate_is_that_of_the_last_4_steps_and_the_history_keeps_the_mean_of_the_pass():
    tracker = sent(StageTracker(shape=ONE_PASS))
    steps_at(tracker, [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 10.0])  # step 8 took 3 s
    assert tracker.seconds_per_step == pytest.approx((10.0 - 4.0) / 4)  # steps 5..8 (docs/benchmarks.md)
    tracker.fold(sample(9, 10), None, 11.0)
    tracker.request_returned(12.0)
    assert tracker.timing()["rates"] == [[BASE, 1, pytest.approx((11.0 - 1.0) / (9 - 1))]]  # steps 2..9


def test_a_later_pass_is_timed_by_its_first_step_from_its_start():
    tracker = sent(StageTracker(steps_per_request=20, passes_per_request=2))
    steps_at(tracker, [1.0 * s for s in range(1, 10)], job_count=2)  # 1 s a step
    tracker.fold(sample(0, 10, job_no=1, job_count=2), None, 10.0)  # the second pass begins
    tracker.fold(sample(1, 10, job_no=1, job_count=2), None, 13.0)
    assert tracker.seconds_per_step == pytest.approx(3.0 / 2)  # steps 0 and 1 in 3 s


def test_two_steps_seen_time_the_pass_for_the_history():
    tracker = sent(StageTracker(), now=2.0)
    tracker.fold(sample(1, 10), None, 3.0)
    tracker.fold(sample(3, 10), None, 5.0)
    tracker.request_returned(14.0)
    assert [rate for *_, rate in tracker.timing()["rates"]] == [pytest.approx((5.0 - 3.0) / (3 - 1))]


def test_finishing_a_stage_with_a_request_still_out_counts_it_answered_then():
    tracker = sent(StageTracker(), now=2.0)
    tracker.fold(sample(1, 10), None, 3.0)
    tracker.fold(sample(3, 10), None, 5.0)
    tracker.finish(6.0)
    assert (tracker.progress, tracker.eta(6.0), tracker.running) == (1.0, 0.0, False)
    assert not tracker.fold(sample(6, 10), None, 7.0)  # a late sample: the stage is over
    assert tracker.timing()["requests"] == [6.0 - 2.0]


def test_steps_seen_at_the_same_instant_give_no_rate():
    tracker = sent(StageTracker(), now=2.0)
    tracker.fold(sample(1, 10), None, 5.0)
    tracker.fold(sample(2, 10), None, 5.0)
    assert tracker.seconds_per_step is None and tracker.eta(5.0) is None
    tracker.request_returned(8.0)
    assert [rate for *_, rate in tracker.timing()["rates"]] == [pytest.approx((8.0 - 2.0) / 10)]  # the request, per step


def test_a_pass_the_server_samples_more_steps_in_than_planned_goes_by_the_servers_steps():
    tracker = sent(StageTracker(shape=ONE_PASS))
    steps_at(tracker, [1.0 * s for s in range(1, 13)], 16)  # 1 s a step, 16 steps where the plan said 10
    assert tracker.eta(12.0) == pytest.approx((15 - 12) * 1.0 + 0.5)  # steps 13..15, then half a step's decode
    tracker.fold(sample(13, 16), None, 13.0)
    tracker.fold(sample(14, 16), None, 14.0)
    tracker.fold(sample(15, 16), None, 15.0)
    tracker.request_returned(17.0)
    assert tracker.timing()["tails"] == [[BASE, 1, pytest.approx(2.0), 1]]  # from its last step, at 15 s


def test_steps_too_quick_to_time_are_kept_per_step_the_server_showed():
    tracker = sent(StageTracker(shape=RequestShape((PassShape(6),))), now=2.0)
    tracker.fold(sample(3, 12), None, 3.0)  # one step seen, of 12 where the plan said 6
    tracker.request_returned(8.0)
    assert tracker.timing()["rates"] == [[BASE, 1, pytest.approx((8.0 - 2.0) / 12)]]


def test_a_pass_sampled_past_the_servers_own_count_is_not_timed_as_one_of_the_plan():
    tracker = sent(StageTracker(shape=ONE_PASS))
    steps_at(tracker, [1.0 * s for s in range(1, 10)])
    steps_at(tracker, [11.0, 13.0], 5, job_no=1, job_count=1)  # a pass nobody counted, 2 s a step
    tracker.request_returned(14.0)
    assert tracker.timing()["rates"] == [[BASE, 1, pytest.approx(1.0)]]


def test_passes_the_server_adds_are_priced_as_the_last_one_and_kept_as_extra():
    tracker = sent(StageTracker(shape=ONE_PASS))
    steps_at(tracker, [1.0 * s for s in range(1, 10)], job_count=2)  # the server counts one pass more
    # at the last step: half a step's decode (none seen yet), then the added pass's 10 steps and its decode
    assert tracker.eta(9.0) == pytest.approx(0.5 + 10 * 1.0 + 0.5)
    tracker.fold(sample(0, 10, job_no=1, job_count=2), None, 10.0)
    steps_at(tracker, [11.0 + s for s in range(1, 10)], job_no=1, job_count=2)
    assert tracker.current_pass == (None, None)
    tracker.request_returned(21.0)
    timing = tracker.timing()
    assert [kind for kind, _ in timing["leads"]] == ["extra"]
    assert (timing["betweens"], timing["tails"], timing["handoffs"]) == ([[BASE, 1, 1.0]], [[BASE, 1, 1.0, 1]], [])


def test_from_counts_alone_the_passes_to_come_share_the_steps_the_passes_seen_left():
    tracker = sent(StageTracker(steps_per_request=12, passes_per_request=3))
    steps_at(tracker, [1.0 * s for s in range(1, 6)], job_count=3)  # the first pass samples 10 of the 12
    # steps 6..9 and a hand-over; then two passes of one step each (1 s), each with half a step's decode
    assert tracker.eta(5.0) == pytest.approx(4.0 + 0.5 + 2 * (1.0 + 0.5))


def test_a_pass_that_has_not_shown_its_steps_counts_one_when_no_plan_says_how_many():
    tracker = sent(StageTracker(passes_per_request=2))
    steps_at(tracker, [1.0 * s for s in range(1, 10)], job_count=2)
    tracker.fold(sample(0, 10, job_no=1, job_count=2), None, 10.0)  # the second pass begins; its steps unknown
    assert tracker.eta(10.0) == pytest.approx(1.0 + 0.5)  # one step, then half a step's decode


def test_with_no_step_timed_a_decode_or_a_detection_is_expected_to_take_nothing():
    tracker = sent(StageTracker(), now=10.0)
    tracker.fold(sample(9, 10), None, 20.0)  # the first sample of ours is the last step
    assert tracker.stalled_for(23.0) == 3.0
    adetailer = sent(StageTracker(shape=RequestShape.of("adetailer", {"steps": 10}, {})), now=10.0)
    adetailer.fold(sample(0, 1, job_no=0, job_count=1), None, 11.0)  # the skipped img2img pass
    adetailer.fold(sample(0, 1, job_no=1, job_count=1), None, 12.0)  # the detection
    assert adetailer.stalled_for(15.0) == 3.0


def test_before_one_is_seen_a_detection_is_expected_to_take_one_step_of_the_main_pass():
    shape = RequestShape.of("txt2img", {"steps": 10, "width": 512, "height": 768}, {})
    tracker = sent(StageTracker(shape=shape), now=10.0)
    steps_at(tracker, [10.0 + s for s in range(1, 10)])  # 1 s a step at 512 x 768
    tracker.fold(sample(0, 10, job_no=1, job_count=1), None, 20.0)  # the detection begins
    assert tracker.stalled_for(22.8) == pytest.approx(2.8 - 2 * 1.0)  # stalled past twice its length


def test_the_last_passes_decode_goes_from_its_last_step_and_from_now_when_that_was_not_seen():
    past = sent(StageTracker(shape=ONE_PASS))
    steps_at(past, [1.0 * s for s in range(1, 10)])
    past.fold(sample(10, 10), None, 10.0)  # the counter past the last step (seen at 9 s)
    assert past.eta(10.0) == pytest.approx(0.5 / 4)  # half a step's decode from 9 s: late, so a quarter of it left
    missed = sent(StageTracker(shape=ONE_PASS))
    steps_at(missed, [1.0 * s for s in range(1, 6)])
    missed.fold(sample(0, 10, job_no=1, job_count=1), None, 8.0)  # every pass done; the last steps not seen
    assert missed.eta(8.0) == pytest.approx(0.5)
    first = sent(StageTracker(shape=ONE_PASS))
    first.fold(sample(0, 10, job_no=1, job_count=1), None, 1.0)  # every pass done before one was timed
    assert first.eta(1.0) is None


class PartialHistory:
    """A prior that knows 2 s a step at 512 x 512 (no other size), 1 s an image after the last
    step, and nothing else."""

    def seconds_per_step(self, pixels: int, batch: int) -> float | None:
        return 2.0 if pixels == BASE else None

    def warmup(self) -> None:
        return None

    def tail(self, pixels: int, batch: int, images: int) -> float:
        return 1.0 * images

    def detection(self) -> None:
        return None

    def lead(self, kind: str) -> None:
        return None


def test_a_prior_without_a_warm_up_adds_none_and_its_tail_counts_the_images():
    tracker = sent(StageTracker(shape=RequestShape((PassShape(10, BASE, 2),)), prior=PartialHistory()))
    tracker.fold(sample(0, 10), None, 0.5)
    assert tracker.eta(0.5) == pytest.approx(10 * 2.0 + 2 * 1.0)  # a batch of 2: two images saved


def test_a_size_the_prior_does_not_know_is_scaled_from_the_run_by_the_square_root_of_its_work():
    shape = RequestShape.of("txt2img", {"steps": 10, "enable_hr": True, "hr_second_pass_steps": 10})
    main, hires = shape.passes
    tracker = sent(StageTracker(shape=shape, prior=PartialHistory()))
    steps_at(tracker, [1.0, 2.0, 3.0], job_count=2)  # 1 s a step today
    hires_rate = 1.0 * (hires.work / main.work) ** 0.5
    # main: steps 4..9, half a step's hand-over; hires: 10 steps, then the prior's tail for its one image
    assert tracker.eta(3.0) == pytest.approx(6 * 1.0 + 0.5 + 10 * hires_rate + 1.0)


def test_the_next_requests_first_pass_is_priced_by_the_rate_timed_before_and_no_warm_up_none_was_seen():
    tracker = sent(StageTracker(requests=2, steps_per_request=20, passes_per_request=2))
    tracker.fold(sample(5, 10, job_count=2), None, 5.0)  # one step of the first pass: no rate, no warm-up
    tracker.fold(sample(0, 10, job_no=1, job_count=2), None, 11.0)
    tracker.fold(sample(1, 10, job_no=1, job_count=2), None, 13.0)  # the second pass: 1 s a step
    tracker.request_returned(25.0)
    sent(tracker, now=25.0)
    tracker.fold(sample(0, 10, job_count=2), None, 26.0)
    # 10 steps and half a step's hand-over, then 10 steps and half a step's decode
    assert tracker.eta(26.0) == pytest.approx(2 * (10 * 1.0 + 0.5))


# -- ADetailer's faces as the server counts them ------------------------------------------------

FACES = {"ad_steps": 10, "ad_use_steps": True, "ad_denoising_strength": 0.4}  # 5 steps a face


@pytest.mark.parametrize("first_faces", [0, 1], ids=["no face in the first image", "one face in the first image"])
def test_the_second_images_faces_counted_in_its_first_face_sample_are_numbered_and_kept(first_faces):
    tracker = sent(StageTracker(shape=RequestShape.of("txt2img", {"steps": 10, "n_iter": 2}, FACES)))
    steps_at(tracker, [1.0 * s for s in range(1, 10)], job_count=2)
    tracker.fold(sample(0, 10, job_no=1, job_count=2), None, 10.0)  # the first image's detection
    if first_faces:
        tracker.fold(sample(0, 10, job_no=1, job_count=3), None, 11.0)  # found one
        steps_at(tracker, [11.0 + s for s in range(1, 5)], 5, job_no=1, job_count=3)
    count = 2 + first_faces
    steps_at(tracker, [20.0 + s for s in range(1, 10)], job_no=1 + first_faces, job_count=count)  # the second image
    assert tracker.current_pass == (None, None)
    tracker.fold(sample(1, 5, job_no=2 + first_faces, job_count=count + 2), None, 30.0)  # two faces, counted late
    assert tracker.current_pass == ("face", (1, 2))
    tracker.request_returned(35.0)
    assert tracker.timing()["faces"] == [first_faces, 2]
    assert tracker.timing()["detections"] == ([1.0] if first_faces else [])  # only a detection seen ending


def test_a_count_rising_after_the_faces_of_the_last_image_adds_no_faces():
    tracker = sent(StageTracker(shape=RequestShape.of("txt2img", {"steps": 10}, FACES)))
    steps_at(tracker, [1.0 * s for s in range(1, 10)])
    tracker.fold(sample(0, 10, job_no=1, job_count=1), None, 10.0)
    tracker.fold(sample(1, 5, job_no=1, job_count=3), None, 11.0)  # two faces
    tracker.fold(sample(1, 5, job_no=3, job_count=4), None, 20.0)  # a script adds a pass after them
    tracker.request_returned(25.0)
    assert tracker.timing()["faces"] == [2]


def test_without_adetailer_a_count_rising_mid_pass_keeps_the_pass_as_timed():
    tracker = sent(StageTracker(shape=ONE_PASS))
    tracker.fold(sample(0, 10), None, 1.0)
    steps_at(tracker, [4.0, 5.0, 6.0, 7.0])  # a warm-up of 1 s beyond steps 0 and 1 (1 s each)
    tracker.fold(sample(5, 10, job_count=2), None, 8.0)  # a script adds a pass
    for step, now in zip(range(6, 10), (9.0, 10.0, 11.0, 12.0)):
        tracker.fold(sample(step, 10, job_count=2), None, now)
    tracker.request_returned(13.0)
    assert tracker.timing()["warmups"] == [pytest.approx(4.0 - 1.0 - 2 * 1.0)]


# -- a decode not seen yet, priced as another one seen ---------------------------------------------


def eta_after_a_first_request_missing_a_decode(shape: RequestShape, answer_after: float) -> float:
    """The ETA at step 5 of the second request, after a first whose first pass's last step was
    never sampled (so the decode after it was not seen) and whose answer came `answer_after` s
    after its last step; 1 s a step throughout."""
    tracker = sent(StageTracker(requests=2, shape=shape))
    steps_at(tracker, [1.0 * s for s in range(1, 7)], job_count=2)
    for step in range(2, 10):  # the next pass, first sampled at its step 2
        tracker.fold(sample(step, 10, job_no=1, job_count=2), None, 8.0 + step)
    end = 17.0 + answer_after
    tracker.request_returned(end)
    sent(tracker, now=end)
    steps_at(tracker, [end + s for s in range(1, 6)], job_count=2)
    return tracker.eta(end + 5)


def test_a_decode_between_images_not_seen_yet_is_priced_as_the_answers_decode_seen():
    shape = RequestShape((PassShape(10),), iterations=2)
    slower = eta_after_a_first_request_missing_a_decode(shape, 6.0) - eta_after_a_first_request_missing_a_decode(shape, 0.5)
    assert slower == pytest.approx(2 * (6.0 - 0.5))  # the decode between the images, and the answer's


def test_a_hand_over_to_hires_not_seen_yet_is_not_priced_as_the_answers_decode():
    shape = RequestShape.of("txt2img", {"steps": 10, "enable_hr": True, "hr_second_pass_steps": 10})
    slower = eta_after_a_first_request_missing_a_decode(shape, 6.0) - eta_after_a_first_request_missing_a_decode(shape, 0.5)
    assert slower == pytest.approx(6.0 - 0.5)  # the answer's decode only
