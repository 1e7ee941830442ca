"""A job held from the store: each finished stage recorded before the next, and a resumed job
going on at its first unfinished stage from the images the finished ones wrote."""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

import attrs
import pytest
from runner_helpers import GENERATION_PATHS, Background, job_spec, make_runner, requests_to

from sdjobs import hookimpl
from sdjobs.outputs import MANIFEST
from sdjobs.sim import SimSettings
from sdjobs.sqlite_store import SQLiteStore
from sdjobs.status import JobState

SPEC = job_spec(("txt2img", "img2img", "upscale"))


@pytest.fixture
def store(tmp_path):
    with SQLiteStore(tmp_path / "queue.db") as store:
        yield store


class StageWatch:
    """At each stage's start: what the store and the manifest said then; and every payload sent."""

    def __init__(self, store: SQLiteStore, job_id: str) -> None:
        self.store, self.job_id = store, job_id
        self.seen: list[tuple[int, int, str, int]] = []  # stage, stages stored, manifest outcome, stages in it
        self.payloads: list[dict] = []

    @hookimpl
    def sdjobs_stage_started(self, status, stage):
        record = self.store.get(self.job_id)
        manifest = json.loads((record.folder / MANIFEST).read_text()) if (record.folder / MANIFEST).exists() else None
        self.seen.append((status.stage_index, len(record.stages), manifest and manifest["outcome"],
                          manifest and len(manifest["stages"])))  # fmt: skip

    @hookimpl
    def sdjobs_amend_payload(self, payload, stage, status):
        self.payloads.append(dict(payload))


def run_held(client, store, out_dir, job_id):
    """Claim ``job_id`` as a new worker and run it to its end; the runner, its log and the watch."""
    worker = store.register_worker()
    record = store.claim(worker.id, ids=[job_id])
    watch = StageWatch(store, job_id)
    runner, log = make_runner(client, [], out_dir, plugins=[watch])
    assert runner.run_held(store, worker.id, record) is JobState.DONE
    return runner, log, watch


def left_by_a_dead_worker(store, finished, out_dir: Path, stages: int) -> str:
    """A job of SPEC whose first ``stages`` stages an attempt finished before its worker went away;
    their images are copied from ``finished`` (the record of a finished run of SPEC)."""
    [job] = store.add([SPEC])
    worker = store.register_worker()
    store.claim(worker.id, ids=[job.id])
    folder = out_dir / "left-behind"
    folder.mkdir()
    store.set_folder(job.id, worker.id, folder)
    for result in finished.stages[:stages]:
        images = tuple(folder / image.relative_to(finished.folder) for image in result.images)
        shutil.copytree(result.images[0].parent, images[0].parent)
        store.record_stage(job.id, worker.id, attrs.evolve(result, images=images))
    store.unregister_worker(worker.id)
    return job.id


def test_each_finished_stage_is_recorded_and_in_the_manifest_before_the_next_starts(webui_client, store, tmp_path):
    [job] = store.add([SPEC])
    _, _, watch = run_held(webui_client, store, tmp_path / "out", job.id)
    assert watch.seen == [(0, 0, None, None), (1, 1, "running", 1), (2, 2, "running", 2)]
    record = store.get(job.id)
    assert record.state is JobState.DONE and record.attempts == 1
    assert [(r.stage, r.partial) for r in record.stages] == [("txt2img", False), ("img2img", False), ("upscale", False)]
    assert all(image.is_absolute() and image.is_file() for r in record.stages for image in r.images)
    assert record.folder.parent == (tmp_path / "out").absolute() and record.folder.name.endswith(record.short_id)
    manifest = json.loads((record.folder / MANIFEST).read_text())
    assert manifest["outcome"] == "done" and len(manifest["stages"]) == 3


def test_a_resumed_job_starts_at_its_first_unfinished_stage_from_the_images_written(
    webui_sim, webui_client, store, tmp_path
):
    [first] = store.add([SPEC])
    run_held(webui_client, store, tmp_path / "out", first.id)
    finished = store.get(first.id)
    job_id = left_by_a_dead_worker(store, finished, tmp_path, stages=1)
    before = store.get(job_id)
    (before.folder / "02-img2img").mkdir()
    (before.folder / "02-img2img" / "001.png").write_bytes(b"half an image")  # what the attempt left of stage 2
    since = webui_sim.requests[-1][0]

    _, log, watch = run_held(webui_client, store, tmp_path / "out", job_id)

    assert [path for _, _, path in requests_to(webui_sim, GENERATION_PATHS, after=since)] == [
        "/sdapi/v1/img2img", "/sdapi/v1/extra-single-image"
    ]  # fmt: skip
    assert watch.seen == [(1, 1, None, None), (2, 2, "running", 2)]
    stage_one = before.stages[0].images[0]
    assert watch.payloads[0]["init_images"] == [base64.b64encode(stage_one.read_bytes()).decode()]
    assert log.names()[0] == "job_started" and log.one("job_started")["status"].seed == SPEC.seed
    assert [s.stage_index for s in log.statuses("stage_finished")] == [1, 2]
    record = store.get(job_id)
    assert record.state is JobState.DONE and record.attempts == 2
    assert record.stages[0] == before.stages[0]
    assert [len(list(record.folder.glob(f"{i:02d}-*/*.png"))) for i in (1, 2, 3)] == [1, 1, 1]
    assert (record.folder / "02-img2img" / "001.png").read_bytes() != b"half an image"
    manifest = json.loads((record.folder / MANIFEST).read_text())
    assert manifest["outcome"] == "done"
    assert [s["images"] for s in manifest["stages"]] == [
        ["01-txt2img/001.png"], ["02-img2img/001.png"], ["03-upscale/001.png"]
    ]  # fmt: skip


def test_a_job_whose_stages_all_finished_ends_done_without_a_request(webui_sim, webui_client, store, tmp_path):
    [first] = store.add([SPEC])
    run_held(webui_client, store, tmp_path / "out", first.id)
    job_id = left_by_a_dead_worker(store, store.get(first.id), tmp_path, stages=3)
    since = webui_sim.requests[-1][0]

    _, log, _ = run_held(webui_client, store, tmp_path / "out", job_id)

    assert requests_to(webui_sim, GENERATION_PATHS, after=since) == []
    assert log.names() == ["job_started", "job_finished"]
    assert log.one("job_finished")["status"].job_progress == 1.0
    assert store.get(job_id).state is JobState.DONE


class LetGoAgain:
    """Asks the runner to let its job go once more as the attempt ends: what a worker's look at the store
    does when it reads the recall just then."""

    runner = None

    @hookimpl
    def sdjobs_job_finished(self, status, outcome):
        if outcome is JobState.HANDED_BACK:
            self.runner.let_go()


@pytest.mark.parametrize("sim_settings", [SimSettings(step_time=0.05)])
def test_a_let_go_asked_as_an_attempt_ends_does_not_stop_the_next_attempt_on_the_same_runner(webui_sim, webui_client,
                                                                                             store, tmp_path):  # fmt: skip
    [job] = store.add([job_spec()])
    worker = store.register_worker()
    again = LetGoAgain()
    runner, log = make_runner(webui_client, [], tmp_path / "out", plugins=[again])
    again.runner = runner
    first = Background(runner.run_held, store, worker.id, store.claim(worker.id, ids=[job.id]))
    assert log.wait_for("stage_started")
    runner.let_go()
    assert first.join(timeout=10) is None  # let go: the worker hands it back
    store.release(job.id, worker.id)
    assert runner.run_held(store, worker.id, store.claim(worker.id, ids=[job.id])) is JobState.DONE
