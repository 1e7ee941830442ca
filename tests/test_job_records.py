"""What a job hands on, example by example on a fake clock and a fake WebUI port: the status
each hook gets, each stage's result, the images' PNG text and the manifest.
(tests/test_job_properties.py checks promises over random runs; here each value is pinned.)"""

from __future__ import annotations

import base64
import json
import logging
import shutil

import attrs
import pytest
from job_helpers import Started
from PIL import Image

from sdjobs import hookimpl
from sdjobs.client import GenerationResult
from sdjobs.history import CostModel, ServerHistory
from sdjobs.job import JobSettings
from sdjobs.outputs import MANIFEST, read_parameters, read_provenance
from sdjobs.progress import RequestShape
from sdjobs.status import CancelMode, JobState, TaskProgress
from sdjobs.testing import GRID_SIZE, Quirks, active_task, png, sample


def manifest(started: Started) -> dict:
    return json.loads((started.webui.folder.path / MANIFEST).read_text())


class AmendsPayloads:
    """A plugin that adds a key to each payload and notes the stage and status it was handed."""

    def __init__(self) -> None:
        self.seen: list[tuple[object, int]] = []

    @hookimpl
    def sdjobs_amend_payload(self, payload, stage, status):
        self.seen.append((stage, status.stage_index))
        payload["comment"] = "amended"


def test_a_request_goes_out_as_plugins_amended_it_with_a_poller_following_its_task(tmp_path):
    plugin = AmendsPayloads()
    started = Started(tmp_path, JobSettings(poll_interval=0.25), plugins=(plugin,))
    [(endpoint, payload, task)] = started.webui.sent
    assert (endpoint, payload["comment"], task) == ("txt2img", "amended", "sdjobs-job-1-1-1")
    assert plugin.seen == [(started.spec.stages[0], 0)]
    poll = started.webui.pollers[-1].request
    assert (poll.client, poll.interval, poll.report, poll.task_id) == (started.webui.client, 0.25, started.webui.report, task)
    assert started.job.deadline is None  # nothing is late while a generation runs: it takes what it takes


def test_a_resumed_job_goes_on_at_its_first_unfinished_stage_from_the_images_the_finished_one_wrote(tmp_path):
    earlier = Started(tmp_path / "earlier", stages=2)
    earlier.answer()
    [finished] = earlier.job.results
    started = Started(tmp_path / "again", stages=2, finished_before=(finished,))
    [(endpoint, payload, task)] = started.webui.sent
    assert (endpoint, task) == ("img2img", "sdjobs-job-1-2-1")
    assert payload["init_images"] == [base64.b64encode(finished.images[0].read_bytes()).decode()]
    started.answer()
    assert started.job.outcome is JobState.DONE and [result.stage for result in started.job.results] == ["txt2img", "img2img"]
    assert [status.stage_index for status in started.statuses("stage_started")] == [1]


def test_the_job_s_first_status_names_the_job_its_first_stage_and_its_server(tmp_path):
    started = Started(tmp_path, stages=3, server="gpu-1")
    [call] = started.calls("job_started")
    status = call["status"]
    assert call["spec"] is started.spec
    assert (status.job_id, status.name, status.seed, status.server) == ("job-1", "cat", 7, "gpu-1")
    assert (status.stage, status.stage_index, status.stage_count) == ("txt2img", 0, 3)
    assert (status.state, status.started_at) == (JobState.RUNNING, 1000.0)
    assert started.webui.prepared == ["job-1"]


def test_each_stage_s_result_says_what_it_made_when_where_and_how_fast(tmp_path):
    started = Started(tmp_path, stages=2, server="gpu-1")
    for step in (1, 2, 3):
        started.clock.advance(1.0)
        started.job.sample(info=sample(step, 10), task=active_task(step / 10))
    answer = started.answer()
    [result] = started.results()
    assert (result.stage, result.stage_index, result.partial, result.server) == ("txt2img", 0, False, "gpu-1")
    assert (result.started_at, result.elapsed) == (1000.0, 3.0)
    assert (result.seeds, result.infos, result.cut) == ((7,), (answer.info,), None)
    assert result.timing["rates"], "the steps timed are handed on for the server's history"
    assert [path.name for path in result.images] == ["001.png"]
    ended = started.statuses("stage_finished")[0]
    first, second = (plan.cost for plan in started.spec.plan())
    assert (ended.progress, ended.eta, ended.job_progress) == (1.0, 0.0, first / (first + second))
    assert ended.job_eta == second * 1.0  # the next stage's steps at this one's rate: a step a second
    started.clock.advance(2.0)
    started.answer()
    finished = started.calls("job_finished")[-1]
    assert finished["results"] == tuple(started.results()) == tuple(started.job.results)
    assert started.results()[1].started_at == 1003.0 and started.results()[1].elapsed == 2.0


#: What a stage has not shown yet when it starts.
FRESH = ("image", "images", "step", "steps", "pass_kind", "face", "eta", "queue_position", "preview")


def test_a_stage_starts_afresh_what_the_last_one_showed_is_not_shown_in_the_next(tmp_path):
    """Queue place, image k/n, step, pass, face, ETA and preview belong to the stage that showed them."""
    faces = {"type": "adetailer", "ad_model": "face_yolov8n.pt", "ad_denoising_strength": 0.4}
    started = Started(tmp_path, JobSettings(preview=True), first={"type": "txt2img", "n_iter": 2},
                      later=[faces, {"type": "img2img"}])  # fmt: skip
    started.job.sample(info=None, task=TaskProgress(active=False, queued=True, completed=False, queue_position=(1, 2)))
    started.answer()
    for _ in range(2):  # the face stage: a sample of face 1 of 2 of its first image, then the answer
        started.clock.advance(1.0)
        task = TaskProgress(active=True, queued=False, completed=False, progress=(1 + 2 / 9) / 3,
                            live_preview="data:image/png;base64,QUJD", id_live_preview=1)  # fmt: skip
        started.job.sample(info=sample(2, 9, job_no=1, job_count=3), task=task)
        started.answer()
    first_end, faces_end = started.statuses("stage_finished")
    assert (first_end.queue_position, first_end.image, first_end.images) == ((1, 2), 1, 2)
    shown = started.statuses("progress")[-1]
    assert (shown.pass_kind, shown.face, shown.step, shown.steps, shown.preview) == ("face", (1, 2), 2, 9, "QUJD")
    assert (faces_end.pass_kind, faces_end.face, faces_end.image, faces_end.preview) == ("face", (1, 2), 2, "QUJD")
    calls = started.calls("stage_started")
    assert [call["stage"] for call in calls] == list(started.spec.stages)
    for index, call in enumerate(calls):
        status = call["status"]
        assert (status.stage, status.stage_index, status.progress) == (call["stage"].type, index, 0.0)
        assert attrs.asdict(status, filter=lambda field, _: field.name in FRESH) == dict.fromkeys(FRESH)


def test_a_failed_job_s_manifest_says_why_and_its_status_where(tmp_path):
    started = Started(tmp_path, prepared=False)
    started.job.prepared(folder=started.webui.folder, problems=["unknown sampler 'Euler z'", "unknown upscaler 'x'"])
    error = "unknown sampler 'Euler z'; unknown upscaler 'x'"
    assert (started.job.outcome, started.job.error) == (JobState.FAILED, error)
    assert started.statuses("job_finished")[-1].folder == started.webui.folder.path
    assert (manifest(started)["outcome"], manifest(started)["error"]) == ("failed", error)


def test_a_manifest_the_disk_refuses_is_logged_and_the_job_still_ends(tmp_path, caplog):
    started = Started(tmp_path, prepared=False)
    folder = started.webui.folder
    shutil.rmtree(folder.path)  # the disk (a removed mount, a full one) takes nothing more
    with caplog.at_level(logging.ERROR, logger="sdjobs.job"):
        started.job.prepared(folder=folder, problems=["unknown sampler 'Euler z'"])
    assert started.job.outcome is JobState.FAILED and started.calls("job_finished")
    [message] = [record.getMessage() for record in caplog.records]
    assert message.startswith(f"job-1: cannot write the manifest in {folder.path}: [Errno 2] No such file or directory")


def test_a_job_whose_stages_all_finished_before_ends_done_at_100_percent(tmp_path):
    earlier = Started(tmp_path / "earlier")
    earlier.answer()
    started = Started(tmp_path / "again", finished_before=tuple(earlier.job.results))
    assert started.job.outcome is JobState.DONE and started.webui.sent == []
    status = started.statuses("job_finished")[-1]
    assert (status.progress, status.job_progress, status.eta, status.job_eta) == (1.0, 1.0, 0.0, 0.0)
    assert status.folder == started.webui.folder.path


def test_a_grid_the_server_puts_first_is_not_saved_as_a_picture(tmp_path):
    started = Started(tmp_path, first={"type": "txt2img", "n_iter": 2})
    started.answer(Quirks(grids=1))
    [result] = started.results()
    assert len(result.images) == 2
    for path, seed in zip(result.images, (7, 8)):
        with Image.open(path) as image:
            assert image.size != GRID_SIZE
        assert read_provenance(path.read_bytes())["seed"] == seed


def test_an_image_the_server_sends_without_its_text_keeps_the_one_of_the_image_it_came_from(tmp_path):
    started = Started(tmp_path, later=[{"type": "upscale", "upscaler": "Lanczos", "scale": 2}])
    started.answer()
    started.job.returned(result=GenerationResult(images=(png(1),), info={}))  # extras: no infotext
    first, upscaled = (result.images[0].read_bytes() for result in started.results())
    assert read_parameters(upscaled) == read_parameters(first) == "\nSteps: 1, Seed: 7, ADetailer model: face_yolov8n.pt"


@pytest.mark.parametrize("batch", [1, 2])
def test_a_request_cut_short_marks_each_image_of_the_batch_it_cut(tmp_path, batch):
    """Two batches in one request, cut in the second: its images are the ones cut."""
    stage = {"type": "txt2img", "n_iter": 2, **({"batch_size": batch} if batch > 1 else {})}  # A1111's default: 1
    started = Started(tmp_path, first=stage)
    started.job.sample(info=sample(3, 10, job_no=1, job_count=2), task=active_task(0.65))
    started.job.cancel(mode=CancelMode.NOW)
    started.answer()
    [result] = started.results()
    where = {"pass": "main", "face": None, "step": 3, "steps": 10}
    assert result.partial and result.cut == {**where, "images": [str(path) for path in result.images[batch:]]}
    assert [read_provenance(path.read_bytes()).get("cut") for path in result.images] == [None] * batch + [where] * batch
    assert manifest(started)["stages"][0]["cut"]["images"] == [f"01-txt2img/00{n}.png" for n in range(batch + 1, 2 * batch + 1)]


def test_an_answer_no_interrupt_cut_records_no_cut(tmp_path):
    started = Started(tmp_path)
    started.running()
    started.answer()
    [result] = started.results()
    assert result.cut is None and "cut" not in read_provenance(result.images[0].read_bytes())


def learned_history(tmp_path, **model: float) -> ServerHistory:
    """What a server's history says after three stages like `Started`'s, sampled at a step a
    second; ``model`` overrides what it learned (faces found per image, detection seconds)."""
    learning = Started(tmp_path / "learning")
    for step in (1, 2, 3):
        learning.clock.advance(1.0)
        learning.job.sample(info=sample(step, 10), task=active_task(step / 10))
    learning.answer()
    learned = CostModel.fit([learning.job.results[0].timing] * 3)
    return ServerHistory("gpu-1", {None: attrs.evolve(learned, **model)}, stages=3)


def test_the_server_s_history_prices_a_stage_before_its_steps_are_timed_and_the_stages_after_it(tmp_path):
    history = learned_history(tmp_path)
    started = Started(tmp_path, stages=2, history=history)
    started.clock.advance(1.0)
    started.job.sample(info=sample(1, 10), task=active_task(0.1))  # one step seen: none timed yet
    shown = started.statuses("progress")[-1]
    assert 8.0 <= shown.eta <= 10.0  # about the nine steps left, at the history's step a second
    started.answer()
    assert started.statuses("stage_finished")[-1].job_eta == history.stage_seconds(started.spec, 1)


def test_an_adetailer_stage_s_eta_counts_the_faces_the_history_usually_found(tmp_path):
    """Before the server has counted an image's faces, each one the history expects is priced."""
    faces = {"type": "adetailer", "ad_model": "face_yolov8n.pt", "ad_denoising_strength": 0.4}
    etas = []
    for usual in (1.0, 3.0):
        history = learned_history(tmp_path / str(usual), faces=usual, detection_s=0.5)
        started = Started(tmp_path / f"job-{usual}", later=[faces], history=history, task_tracking=False)
        started.job.probed(info=None, task=None)  # the baselines: the server was idle
        started.answer()
        started.job.probed(info=None, task=None)
        started.clock.advance(1.0)
        started.job.sample(info=sample(1, 9, job_no=0, job_count=1), task=None)
        etas.append(started.statuses("progress")[-1].eta)
    face = RequestShape.for_stage(started.spec.stages[1], started.spec.plan()[1]).face
    assert etas[1] - etas[0] >= 2 * face.steps * 1.0  # two more faces' steps, at a step a second


def test_a_hires_pass_is_shown_as_part_of_the_image_it_refines(tmp_path):
    started = Started(tmp_path, first={"type": "txt2img", "n_iter": 2, "enable_hr": True, "hr_second_pass_steps": 6})
    started.job.sample(info=sample(3, 6, job_no=1, job_count=4), task=active_task(1.5 / 4))  # image 1's hires pass
    shown = started.statuses("progress")[-1]
    assert (shown.image, shown.images, shown.pass_kind, shown.step, shown.steps) == (1, 2, "hires", 3, 6)
