"""One job through each of its rarer paths, step by step on a fake clock and a fake WebUI port:
the ends a stall, a frozen server, a wrong answer or a server that stays down lead to, and what
each says.  (tests/test_job_properties.py reaches them at random; here each is reached for sure.)"""

from __future__ import annotations

import logging

import pytest

from sdjobs.client import WebUIServerError, WebUITimeout, WebUIUnreachable
from sdjobs.clock import FakeClock
from sdjobs.hooks import Hooks, make_plugin_manager
from sdjobs.job import Job, JobSettings
from sdjobs.outputs import JobFolder
from sdjobs.spec import JobSpec
from sdjobs.status import CancelMode, JobState, TaskProgress
from sdjobs.testing import FakeWebUI, HookRecorder, Quirks, active_task, sample

URL = "http://webui/sdapi/v1/txt2img"


class Started:
    """A one- or two-stage job begun and prepared, its first request out (task ids followed)."""

    def __init__(
        self,
        tmp_path,
        settings: JobSettings = JobSettings(),
        stages: int = 1,
        *,
        prepared: bool = True,
        first: dict | None = None,
        later: list[dict] | None = None,
    ) -> None:
        later = [{"type": "img2img"}] * (stages - 1) if later is None else later
        self.spec = JobSpec.from_mapping({"name": "cat", "seed": 7, "stages": [first or {"type": "txt2img"}, *later]})
        self.clock = FakeClock()
        self.webui = FakeWebUI(task_tracking=True, folder=JobFolder.create(tmp_path, "job-1"))
        self.recorder = HookRecorder()
        manager = make_plugin_manager(load_entry_points=False, disabled=["sdjobs.plugins.progress_poller"])
        manager.register(self.recorder, name="recorder")
        manager.register(self.webui, name="fake-webui")
        self.job = Job(
            spec=self.spec, job_id="job-1", hooks=Hooks(manager), port=self.webui, settings=settings,
            clock=self.clock, wall_clock=self.clock,
        )  # fmt: skip
        self.job.begin()
        if prepared:
            self.job.prepared(folder=self.webui.folder, problems=[])

    def running(self) -> None:
        """A sample that says our request is the one the server runs."""
        self.clock.advance(1.0)
        self.job.sample(info=sample(1, 10), task=active_task(0.1))

    def answer(self, quirks: Quirks | None = None) -> None:
        self.job.returned(result=self.webui.answer(self.spec, quirks))


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
    assert started.job.state == "preparing" and started.webui.prepares == 2


def test_a_server_that_refuses_the_checks_fails_the_job(tmp_path):
    started = Started(tmp_path, prepared=False)
    started.job.failed(error=WebUIServerError(URL, 500, "boom"))
    assert started.job.outcome is JobState.FAILED and started.job.error == f"{URL} failed (500): boom"


def test_a_server_that_stays_down_is_pinged_with_backoff_then_given_up_on(tmp_path):
    started = Started(tmp_path, JobSettings(wait_for_webui=20.0))
    started.job.failed(error=WebUIUnreachable(URL, None, "connection refused"))
    assert started.job.state == "waiting_for_webui"
    waits = []
    while not started.job.finished:
        waits.append(started.job.deadline - started.clock.now)
        started.clock.advance(waits[-1])
        started.job.tick()
    assert waits == [1.0, 2.0, 4.0, 8.0, 5.0]  # doubling, and the last one ends when the wait does
    assert started.webui.pings == 4
    assert started.job.gave_up_on_webui
    assert started.job.error == f"stage 1/1 (txt2img): the WebUI stayed unreachable for 20 s: cannot reach {URL}: connection refused"


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


def test_a_detached_job_writes_and_records_nothing_more(tmp_path):
    recorded = []
    started = Started(tmp_path, stages=2)
    started.job.record = recorded.append
    started.answer()
    assert len(recorded) == 1
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
