"""`StageTracker` replaying the recorded A1111 traces, each sample at its recorded time.

The replay is the one `bench/eta_accuracy.py` measures with, so the benchmark
cannot drift from what is tested.
"""

from __future__ import annotations

import importlib.util
import io
from contextlib import redirect_stdout
from pathlib import Path

import pytest
from sdjobs.progress import UNFINISHED_CAP

_BENCH = Path(__file__).resolve().parents[1] / "bench" / "eta_accuracy.py"
_spec = importlib.util.spec_from_file_location("eta_accuracy", _BENCH)
eta_accuracy = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(eta_accuracy)

TRACES = eta_accuracy.TRACES
RUNS = eta_accuracy.all_runs()


def run_of(trace: str, *, task_mode: bool = False, index: int = 0):
    return eta_accuracy.read_runs(TRACES / trace, task_mode=task_mode)[index]


def shown(run) -> list[tuple[float, float, float | None]]:
    """`(t, progress, eta at t)` after every sample folded."""
    return [(sample.t, tracker.progress, tracker.eta(sample.t)) for sample, tracker in eta_accuracy.replay(run)]


@pytest.mark.parametrize("run", RUNS, ids=lambda run: f"{run.trace}-{run.request.get('force_task_id') or run.sent}")
def test_progress_is_monotonic_within_bounds_and_etas_are_sensible(run):
    previous = 0.0
    for sample, tracker in eta_accuracy.replay(run):
        assert previous <= tracker.progress <= UNFINISHED_CAP
        previous = tracker.progress
        if tracker.step is not None and tracker.steps is not None:
            assert 0 <= tracker.step <= tracker.steps
        eta = tracker.eta(sample.t)
        assert eta is None or eta >= 0.0
    assert previous > 0.0, "the run's own samples moved its progress"


def test_trace_01_stale_idle_polls_before_the_post_count_for_nothing():
    run = run_of("01_txt2img_64_8steps_seed1234.jsonl")
    replayed = [(sample, tracker.progress, tracker.step) for sample, tracker in eta_accuracy.replay(run)]
    before = [(progress, step) for sample, progress, step in replayed if sample.t < run.sent]
    assert before and all(value == (0.0, None) for value in before)
    stale_after_post = [row for row in replayed if run.sent <= row[0].t and row[0].info.idle]
    assert stale_after_post and all(progress == 0.0 for _, progress, _ in stale_after_post)
    assert replayed[-1][1] == pytest.approx(7 / 8)


def test_trace_01_eta_is_calculating_until_the_second_step_then_close_to_the_truth():
    run = run_of("01_txt2img_64_8steps_seed1234.jsonl")
    first = next((sample, tracker) for sample, tracker in eta_accuracy.replay(run) if tracker.eta(sample.t) is not None)
    assert first[1].step == 2  # steps 0 and 1 give none: the first hides the warm-up
    (ours, theirs), = eta_accuracy.etas_at(run, (0.5,))
    truth = run.returned - run.at(0.5)
    assert abs(ours - truth) < 0.5 * truth  # its steps took 1.5 to 2.4 s: a rate can be that far off
    assert abs(ours - truth) < abs(theirs - truth)


def test_trace_16_adetailer_drop_keeps_the_display_moving_forward():
    run = run_of("16_txt2img_64_8steps_adetailer_2masks.jsonl")
    rows = [(sample.info, tracker.progress) for sample, tracker in eta_accuracy.replay(run)]
    false_one = next(i for i, (info, _) in enumerate(rows) if info and info.job_count == 1 and info.job_no == 1)
    at_false_one = rows[false_one][1]
    assert at_false_one < 0.5  # not completion: the plan keeps room for the face it expects
    faces = [progress for info, progress in rows[false_one:] if info and info.job_count == 3]
    distinct = sorted(set(faces))
    assert faces == sorted(faces) and len(distinct) >= 4  # the drop to 0.343 moved nothing back
    assert at_false_one < distinct[1] < distinct[-1] < UNFINISHED_CAP


def test_trace_08_task_mode_queued_behind_another_task_then_ours():
    first = run_of("08_force_task_id_internal_progress_two_requests.jsonl", task_mode=True, index=0)
    second = run_of("08_force_task_id_internal_progress_two_requests.jsonl", task_mode=True, index=1)
    assert first.request["force_task_id"] == "task(test-1)" and second.request["force_task_id"] == "task(test-2)"
    queued, running = [], []
    for sample, tracker in eta_accuracy.replay(second):
        if sample.t >= second.sent:
            (queued if sample.task.queued else running).append((tracker.queue_position, tracker.progress))
    assert queued and all(row == ((1, 1), 0.0) for row in queued)
    assert running[-1][0] is None and running[-1][1] == pytest.approx(3 / 4)


def test_trace_08_global_mode_the_job_running_when_we_sent_is_not_ours():
    second = run_of("08_force_task_id_internal_progress_two_requests.jsonl", index=1)
    assert not second.baseline.idle
    other = second.baseline.job_timestamp
    progress = []
    for sample, tracker in eta_accuracy.replay(second):
        if sample.info is not None and sample.info.job_timestamp == other:
            assert tracker.progress == 0.0 and not tracker.running
        progress.append(tracker.progress)
    assert progress[-1] == pytest.approx(3 / 4)


def test_trace_14_task_and_global_mode_agree():
    task = shown(run_of("14_txt2img_12steps_progress_with_current_image.jsonl", task_mode=True))
    global_ = shown(run_of("14_txt2img_12steps_progress_with_current_image.jsonl"))
    assert task[-1][1] == global_[-1][1] == pytest.approx(11 / 12)


def test_bench_prints_its_table_and_beats_a1111_on_the_same_points():
    out = io.StringIO()
    with redirect_stdout(out):
        eta_accuracy.main(simulated=False)
    rows = {
        tuple(cell.strip() for cell in line.split("|")[1:3]): line
        for line in out.getvalue().splitlines()
        if line.startswith("| traces |")
    }
    median = lambda row: float(row.split("|")[6].split("/")[0])
    assert median(rows["traces", "sdjobs"]) < median(rows["traces", "A1111, same points"])
    assert rows["traces", "sdjobs"].rstrip(" |").endswith("| 0")  # an estimate wherever two steps were timed
