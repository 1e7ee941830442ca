"""One job through each of its rarer paths, step by step on a fake clock and a fake WebUI port:
the ends a stall, a frozen server, a wrong answer or a server that stays down lead to, and what
each says.  (tests/test_job_properties.py reaches them at random; here each is reached for sure.)"""

from __future__ import annotations

import base64
import logging
import multiprocessing
import os
import signal

import attrs
import pytest
from job_helpers import Started

from sdjobs import hookimpl
from sdjobs.client import WebUIServerError, WebUITimeout, WebUIUnreachable
from sdjobs.job import JobSettings
from sdjobs.status import CancelMode, JobState, TaskProgress
from sdjobs.testing import TIMESTAMPS, Quirks, active_task, sample

URL = "http://webui/sdapi/v1/txt2img"

STALLING = JobSettings(stall_after=30.0, stall_interrupt_after=90.0, cancel_grace=30.0)


def test_a_stall_interrupt_the_server_answers_fails_the_job_saying_so(tmp_path):
    started = Started(tmp_path, STALLING)
    started.running()
    started.clock.advance(95.0)
    started.job.tick()
    assert (started.job.state, started.webui.interrupts) == ("stall_interrupting", 1)
    assert started.recorder.names().count("job_stalled") == 1
    started.answer()
    assert started.job.outcome is JobState.FAILED
    assert started.job.error == "stage 1/1 (txt2img): stalled; interrupted"
    [result] = started.job.results  # the interrupt cut the request where the last sample showed it
    assert result.cut == {"pass": "main", "face": None, "step": 1, "steps": 10, "images": [str(result.images[0])]}


def test_a_stall_interrupt_whose_request_then_fails_tells_both(tmp_path):
    started = Started(tmp_path, STALLING)
    started.running()
    started.clock.advance(95.0)
    started.job.tick()
    started.job.failed(error=WebUIServerError(URL, 500, "boom"))
    assert started.job.error == f"stage 1/1 (txt2img): stalled; interrupted, and the request failed: {URL} failed (500): boom"


@pytest.mark.parametrize("unanswered", ["the interrupt times out", "the grace runs out"])
def test_a_stall_interrupt_that_goes_unanswered_says_the_webui_stopped_answering(tmp_path, unanswered):
    started = Started(tmp_path, STALLING)
    started.running()
    started.clock.advance(95.0)
    started.job.tick()
    if unanswered == "the interrupt times out":
        started.job.unanswered(error=WebUITimeout(URL, 1.0, "no answer: timed out"))
    else:
        started.clock.advance(30.0)
        started.job.tick()
    quiet = 95 if unanswered == "the interrupt times out" else 125
    assert started.job.outcome is JobState.FAILED
    assert started.job.error == f"stage 1/1 (txt2img): the WebUI stopped answering (no progress for {quiet} s, interrupt unanswered)"


def test_a_cancel_whose_interrupt_goes_unanswered_ends_at_once_with_a_warning(tmp_path, caplog):
    started = Started(tmp_path)
    started.running()
    started.job.cancel(mode=CancelMode.NOW)
    assert started.job.state == "interrupting"
    with caplog.at_level(logging.WARNING, logger="sdjobs.job"):
        started.job.unanswered(error=WebUITimeout(URL, 1.0, "no answer: timed out"))
    assert started.job.outcome is JobState.CANCELLED and started.job.error is None
    assert [record.getMessage() for record in caplog.records] == [
        f"cat: the WebUI did not answer the interrupt ({URL}: no answer: timed out after 1 s); it may go on rendering the request"
    ]


@pytest.mark.parametrize(
    ("quirks", "error"),
    [
        (Quirks(seed_shift=7), "seed"),
    ],
)
def test_an_answer_that_is_not_what_was_asked_fails_the_job_saying_why(tmp_path, quirks, error):
    started = Started(tmp_path)
    started.answer(quirks)
    assert started.job.outcome is JobState.FAILED
    assert started.job.error.startswith("stage 1/1 (txt2img): ") and error in started.job.error


def test_a_server_that_never_answers_the_checks_fails_the_job_after_the_prepare_timeout(tmp_path):
    started = Started(tmp_path, JobSettings(prepare_timeout=60.0), prepared=False)
    started.clock.advance(59.0)
    started.job.tick()
    assert started.job.state == "preparing"
    started.clock.advance(1.0)
    started.job.tick()
    assert started.job.outcome is JobState.FAILED
    assert started.job.error == "the WebUI did not answer sdjobs' checks within 60 s"


@pytest.mark.parametrize(
    "error", [WebUITimeout(URL, 5.0, "no answer: timed out"), WebUIUnreachable(URL, None, "connection refused")]
)
def test_a_server_hung_or_down_at_the_checks_is_waited_for(tmp_path, error):
    started = Started(tmp_path, prepared=False)
    started.job.failed(error=error)
    assert started.job.state == "waiting_to_prepare"
    started.clock.advance(1.0)
    started.job.tick()
    started.job.reached()
    assert started.job.state == "preparing" and started.webui.prepared == ["job-1", "job-1"]


def test_a_server_that_refuses_the_checks_fails_the_job(tmp_path):
    started = Started(tmp_path, prepared=False)
    started.job.failed(error=WebUIServerError(URL, 500, "boom"))
    assert started.job.outcome is JobState.FAILED and started.job.error == f"{URL} failed (500): boom"


@pytest.mark.parametrize(
    ("wait", "waits"),
    [
        (20.0, [1.0, 2.0, 4.0, 8.0, 5.0]),  # doubling, and the last one ends when the wait does
        (3.5, [1.0, 2.0, 0.5]),  # however little is left
    ],
)
def test_a_server_that_stays_down_is_pinged_with_backoff_then_given_up_on(tmp_path, wait, waits):
    started = Started(tmp_path, JobSettings(wait_for_webui=wait))
    started.job.failed(error=WebUIUnreachable(URL, None, "connection refused"))
    assert started.job.state == "waiting_for_webui"
    waited = []
    while not started.job.finished and len(waited) < 10:
        waited.append(started.job.deadline - started.clock.now)
        started.clock.advance(waited[-1])
        started.job.tick()
    assert waited == waits
    assert started.webui.pings == len(waits) - 1
    assert started.job.gave_up_on_webui
    assert started.job.error == f"stage 1/1 (txt2img): the WebUI stayed unreachable for {wait:g} s: cannot reach {URL}: connection refused"


def test_a_server_that_drops_every_request_is_given_up_on_once_the_wait_from_its_first_drop_is_spent(tmp_path):
    started = Started(tmp_path, JobSettings(wait_for_webui=5.0))
    for _ in range(10):
        started.job.failed(error=WebUIUnreachable(URL, None, "connection refused"))
        started.clock.advance(started.job.deadline - started.clock.now)
        started.job.tick()
        if started.job.finished:
            break
        started.job.reached()  # back, and the request sent again, which it drops again
    assert started.job.gave_up_on_webui and started.clock.now == 1005.0
    assert len(started.webui.sent) == 5


def test_a_request_lost_to_a_down_server_is_sent_again_with_its_own_image_before_the_next(tmp_path):
    started = Started(tmp_path, stages=2, first={"type": "txt2img", "n_iter": 2})
    made = started.answer().images  # two images: the img2img stage sends one request for each
    for _ in range(2):
        started.job.failed(error=WebUIServerError(URL, 502, "Bad Gateway"))
        started.clock.advance(1.0)
        started.job.tick()
        started.job.reached()
    started.answer()
    started.answer()
    assert started.job.outcome is JobState.DONE
    sent = started.webui.sent[1:]
    first, second = (base64.b64encode(image).decode() for image in made)
    assert [payload["init_images"] for _, payload, _ in sent] == [[first], [first], [first], [second]]
    assert [task for _, _, task in sent] == ["sdjobs-job-1-2-1", "sdjobs-job-1-2-1-r1", "sdjobs-job-1-2-1-r2", "sdjobs-job-1-2-2-r2"]
    assert len(started.job.results[1].images) == 2


def test_a_server_back_gets_the_lost_request_again_under_a_task_id_of_its_own(tmp_path):
    started = Started(tmp_path)
    started.job.failed(error=WebUIServerError(URL, 502, "Bad Gateway"))
    started.clock.advance(1.0)
    started.job.tick()
    started.job.reached()
    assert [task for _, _, task in started.webui.sent] == ["sdjobs-job-1-1-1", "sdjobs-job-1-1-1-r1"]
    started.answer()
    assert started.job.outcome is JobState.DONE


def test_a_cancel_after_this_job_changes_nothing(tmp_path):
    started = Started(tmp_path, stages=2)
    started.job.cancel(mode=CancelMode.AFTER_JOB)
    started.answer()
    started.answer()
    assert started.job.outcome is JobState.DONE and len(started.webui.sent) == 2


def test_a_cancel_after_this_job_before_its_first_request_changes_nothing(tmp_path):
    started = Started(tmp_path, prepared=False)
    started.job.cancel(mode=CancelMode.AFTER_JOB)
    assert started.job.state == "preparing"
    started.job.prepared(folder=started.webui.folder, problems=[])
    started.answer()
    assert started.job.outcome is JobState.DONE


def test_a_job_whose_next_stage_runs_elsewhere_is_handed_back_after_the_stage_before(tmp_path):
    started = Started(tmp_path, stages=3, stop=1)
    started.answer()
    assert started.job.outcome is JobState.HANDED_BACK
    assert len(started.webui.sent) == 1 and [result.stage for result in started.job.results] == ["txt2img"]


@pytest.mark.parametrize(("silent", "state"), [(True, "cancelled"), (False, "interrupting")])
def test_a_cancel_after_a_sample_that_timed_out_ends_at_once(tmp_path, silent, state):
    """A server that answers no sample in time will not answer the interrupt either; a sample that
    failed otherwise (an error) leaves the interrupted request its grace time."""
    started = Started(tmp_path)
    started.running()
    started.clock.advance(5.0)
    started.job.sample(info=None, task=None, **({"silent": True} if silent else {}))
    started.job.cancel(mode=CancelMode.NOW)
    assert started.job.state == state and started.webui.interrupts == 1


@pytest.mark.parametrize("task_tracking", [True, False])
def test_a_cancel_before_any_sample_asks_whose_job_runs_and_interrupts_ours(tmp_path, task_tracking):
    started = Started(tmp_path, task_tracking=task_tracking)
    if not task_tracking:
        started.job.probed(info=None, task=None)  # the baseline: the server was idle
    started.job.cancel(mode=CancelMode.NOW)
    assert started.job.state == "asking"
    asked = started.webui.probes[-1]
    assert asked == ("sdjobs-job-1-1-1" if task_tracking else None)
    started.clock.advance(0.5)
    started.job.probed(info=None if task_tracking else sample(1, 10), task=active_task(0.1) if task_tracking else None)
    assert started.job.state == "interrupting" and started.webui.interrupts == 1
    started.answer()
    [result] = started.job.results  # cut where the probe's sample showed it
    assert started.job.outcome is JobState.CANCELLED and result.cut["step"] == (None if task_tracking else 1)


def test_a_cancel_once_our_job_is_no_longer_seen_running_asks_again_and_cuts_where_the_probe_says(tmp_path):
    started = Started(tmp_path)
    for step in (1, 2, 3):
        started.clock.advance(1.0)
        started.job.sample(info=sample(step, 10), task=active_task(step / 10))
    started.clock.advance(1.0)
    started.job.sample(info=None, task=TaskProgress(active=False, queued=False, completed=False, textinfo="Waiting..."))
    started.job.cancel(mode=CancelMode.NOW)
    assert started.job.state == "asking"
    started.clock.advance(1.0)
    started.job.probed(info=sample(4, 10), task=active_task(0.4))
    assert started.job.state == "interrupting"
    started.answer()
    [result] = started.job.results
    assert started.job.outcome is JobState.CANCELLED and result.cut["step"] == 4


def test_without_task_ids_the_job_the_server_ran_before_ours_is_not_taken_for_ours(tmp_path):
    started = Started(tmp_path, task_tracking=False)
    assert started.job.state == "baseline"
    started.job.probed(info=sample(3, 20, stamp=TIMESTAMPS[1]), task=None)  # another job runs
    started.clock.advance(1.0)
    started.job.sample(info=sample(4, 20, stamp=TIMESTAMPS[1]), task=None)
    assert started.calls("progress") == []
    started.clock.advance(1.0)
    started.job.sample(info=sample(1, 10, stamp=TIMESTAMPS[0]), task=None)  # ours
    assert [(status.step, status.steps) for status in started.statuses("progress")] == [(1, 10)]


class RefusesPayloads:
    @hookimpl
    def sdjobs_amend_payload(self, payload, stage, status):
        raise ValueError("no payload today")


class RefusesPolling:
    @hookimpl
    def sdjobs_start_polling(self, request):
        raise ValueError("no poller today")


@pytest.mark.parametrize(
    ("plugin", "hook", "error"),
    [(RefusesPayloads(), "sdjobs_amend_payload", "no payload today"), (RefusesPolling(), "sdjobs_start_polling", "no poller today")],
)
def test_a_plugin_that_raises_for_a_request_fails_the_job_naming_it(tmp_path, plugin, hook, error):
    started = Started(tmp_path, plugins=(plugin,))
    assert started.job.outcome is JobState.FAILED
    assert started.job.error == f"stage 1/1 (txt2img): plugin '{type(plugin).__name__}' failed in {hook}: {error}"


def test_an_adetailer_stage_whose_answer_lacks_its_settings_fails_saying_adetailer_did_not_run(tmp_path):
    started = Started(tmp_path, later=[{"type": "adetailer", "ad_model": "face_yolov8n.pt"}])
    started.answer()
    started.answer(Quirks(adetailer_mark=False))
    assert started.job.outcome is JobState.FAILED
    assert started.job.error == ("stage 2/2 (adetailer): ADetailer did not run: its settings are not in the infotext "
                                 "(is the extension installed and enabled?)")  # fmt: skip


def test_a_stall_without_a_stall_interrupt_is_reported_once_and_interrupts_nothing(tmp_path):
    started = Started(tmp_path, JobSettings(stall_after=30.0))
    started.running()
    for _ in range(3):
        started.clock.advance(20.0)
        started.job.tick()
    [stalled] = started.calls("job_stalled")
    assert stalled["seconds"] >= 30.0 and stalled["status"].step == 1
    assert started.job.state == "generating" and started.webui.interrupts == 0


@pytest.mark.parametrize("preview", [True, False])
def test_previews_are_asked_for_and_shown_only_when_the_settings_say(tmp_path, preview):
    started = Started(tmp_path, JobSettings(preview=preview))
    assert started.webui.pollers[-1].request.preview is preview
    for shown in ("QUJD", "QUJD", "REVG"):  # the second sample changes nothing shown
        task = TaskProgress(active=True, queued=False, completed=False, progress=0.1,
                            live_preview=f"data:image/png;base64,{shown}", id_live_preview=1)  # fmt: skip
        started.job.sample(info=sample(1, 10), task=task)
    previews = [status.preview for status in started.statuses("progress")]
    assert previews == (["QUJD", "REVG"] if preview else [None])


def test_without_task_ids_the_preview_comes_from_the_progress_sample(tmp_path):
    started = Started(tmp_path, JobSettings(preview=True), task_tracking=False)
    started.job.probed(info=None, task=None)  # the baseline: the server was idle
    started.job.sample(info=attrs.evolve(sample(1, 10), current_image="QUJD"), task=None)  # plain base64
    assert started.statuses("progress")[-1].preview == "QUJD"


def test_a_detached_job_writes_and_records_nothing_more(tmp_path):
    recorded = []
    started = Started(tmp_path, stages=2)
    started.job.record = recorded.append
    started.answer()
    assert recorded == started.job.results  # stage 1's result, once its image is written
    started.job.detach()
    started.answer()
    assert started.job.outcome is JobState.DONE and len(recorded) == 1
    assert sorted(path.name for path in (tmp_path / "job-1").rglob("*.png")) == ["001.png"]  # stage 1's only
    assert started.job.folder is None and started.job.detached


def test_each_progress_shown_carries_what_the_samples_said(tmp_path):
    started = Started(tmp_path, JobSettings(preview=True), stages=2, first={"type": "txt2img", "steps": 10, "n_iter": 2})
    started.job.sample(info=None, task=TaskProgress(active=False, queued=True, completed=False, queue_position=(1, 2)))
    queued = started.recorder.calls[-1][1]["status"]
    assert queued.queue_position == (1, 2) and queued.step is None
    for step in (1, 2):
        started.clock.advance(1.0)
        task = TaskProgress(active=True, queued=False, completed=False, progress=step / 20,
                            live_preview="data:image/png;base64,QUJD", id_live_preview=step)  # fmt: skip
        started.job.sample(info=sample(step, 10, job_count=2), task=task)
    status = started.recorder.calls[-1][1]["status"]
    assert (status.step, status.steps, status.image, status.images) == (2, 10, 1, 2)
    assert (status.pass_kind, status.face, status.queue_position, status.preview) == (None, None, None, "QUJD")
    assert 0 < status.job_progress < status.progress < 1
    assert 0 < status.eta < status.job_eta  # the next stage's steps are priced at this stage's rate


def test_a_request_cut_short_by_a_cancel_records_where(tmp_path):
    started = Started(tmp_path, first={"type": "txt2img", "steps": 10, "enable_hr": True, "hr_second_pass_steps": 6})
    started.job.sample(info=sample(3, 6, job_no=1, job_count=2), task=active_task(0.75))
    started.job.cancel(mode=CancelMode.NOW)
    started.answer()
    [result] = started.job.results
    assert result.partial and result.cut == {"pass": "hires", "face": None, "step": 3, "steps": 6, "images": [str(result.images[0])]}


def test_a_cut_during_a_face_names_the_face(tmp_path):
    started = Started(tmp_path, later=[{"type": "adetailer", "ad_model": "face_yolov8n.pt", "ad_denoising_strength": 0.4}])
    started.answer()
    assert started.job.stage.spec.type == "adetailer"
    started.job.sample(info=sample(2, 9, job_no=1, job_count=3), task=active_task((1 + 2 / 9) / 3))  # face 1 of 2
    started.job.cancel(mode=CancelMode.NOW)
    started.answer()
    assert started.job.results[-1].cut["pass"] == "face" and started.job.results[-1].cut["face"] == [1, 2]


def _run_two_stages(tmp_path, die_at: str | None = None) -> list[str]:
    """A two-stage job run to its end (or killed at `die_at`); the files it wrote."""
    if die_at is not None:
        os.environ["SDJOBS_TEST_DIE_AT"] = die_at
    started = Started(tmp_path, stages=2)
    for _ in range(2):
        started.running()
        started.answer()
    return written(tmp_path)


def written(tmp_path) -> list[str]:
    folder = tmp_path / "job-1"
    return sorted(path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file())


@pytest.mark.parametrize(
    ("point", "left"),
    [
        ("sample", []),  # a sample came: nothing is written yet
        ("stage-written", ["01-txt2img/001.png"]),  # the stage's image, not yet the manifest
        ("between-stages", ["01-txt2img/001.png", "manifest.json"]),  # the next stage not begun
    ],
)
def test_a_process_told_to_die_at_a_point_of_a_job_dies_there(tmp_path, point, left):
    """tests/test_kill.py kills real workers at these points (`SDJOBS_TEST_DIE_AT`); here a forked
    copy of this process runs a two-stage job and must be killed where sdjobs/die_at.py says,
    having written less than the same job writes in this process, where nothing kills it."""
    assert _run_two_stages(tmp_path / "whole") == ["01-txt2img/001.png", "02-img2img/001.png", "manifest.json"]
    child = multiprocessing.get_context("fork").Process(target=_run_two_stages, args=(tmp_path, point))
    child.start()
    child.join(10.0)
    assert child.exitcode == -signal.SIGKILL
    assert written(tmp_path) == left
