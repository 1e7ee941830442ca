"""How one progress sample is read: the share of the request it shows, by A1111's counting
(job_no of job_count passes, plus the step's share), and when it says nothing."""

from __future__ import annotations

import pytest

from sdjobs.progress import _Reading
from sdjobs.status import ProgressInfo
from sdjobs.testing import active_task


def info(step=0, steps=10, *, job_no=0, job_count=1, progress=0.37, eta=5.0) -> ProgressInfo:
    return ProgressInfo(progress, eta, step, steps, job_no, job_count)


@pytest.mark.parametrize(
    ("sample", "fraction", "job_count"),
    [
        (info(5, 10, job_no=1, job_count=2), 0.75, 2),  # pass 2 of 2, half way
        (info(12, 10, job_no=0, job_count=2), 0.5, 2),  # a step past the steps counts as the pass's end
        (info(1, 1, job_no=0, job_count=2, progress=0.99), 0.5, 2),  # a one-step pass is detail too
        (info(-1, 10), 0.37, 1),  # no usable step: the server's own figure
        (info(3, 0), 0.37, 1),  # no usable steps: likewise
        (info(0, 8, job_no=0, job_count=-1), 0.0, None),  # begin() has run, nothing else yet
        (info(2, 8, job_no=0, job_count=0, progress=0.4), 0.4, None),  # idle: the server's figure
        (info(2, 8, job_no=2, job_count=2, progress=1.0), None, 2),  # the false 1.0 between passes
    ],
)
def test_a_sample_reads_as_the_share_of_the_request_it_shows(sample, fraction, job_count):
    reading = _Reading.of_info(sample)
    assert reading.fraction == pytest.approx(fraction) if fraction is not None else reading.fraction is None
    assert reading.job_count == job_count


def test_a_given_eta_replaces_the_samples_and_an_unusable_one_is_none():
    assert _Reading.of_info(info(eta=5.0), eta=9.0).server_eta == 9.0
    assert _Reading.of_info(info(eta=5.0)).server_eta == 5.0
    assert _Reading.of_info(info(eta=0.5)).server_eta == 0.5
    assert _Reading.of_info(info(eta=0.0)).server_eta == 0.0  # nothing left: usable too
    assert _Reading.of_info(info(eta=-1.0)).server_eta is None


def test_a_task_at_one_says_nothing_about_the_share_and_below_it_says_its_own():
    assert _Reading.of_task(active_task(1.0)).fraction is None
    assert _Reading.of_task(active_task(0.25)).fraction == 0.25
    assert _Reading.of_task(active_task(None)).fraction is None  # no figure at all


@pytest.mark.parametrize(
    ("reading", "task", "agrees"),
    [
        (_Reading(0.5), active_task(None), True),  # the task says nothing: no contradiction
        (_Reading(0.5), active_task(0.5), True),
        (_Reading(0.5), active_task(0.6), False),
        (_Reading(0.0), active_task(1e-9), True),  # equal within a millionth, even near 0
        (_Reading(None), active_task(1.0), True),  # the false 1.0 is the task's 1.0
        (_Reading(None), active_task(2.0), True),  # which the task may overshoot
        (_Reading(None), active_task(0.5), False),
    ],
)
def test_a_task_agrees_with_a_sample_read_from_the_same_server_state(reading, task, agrees):
    assert reading.agrees_with(task) is agrees
