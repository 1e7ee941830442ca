"""Stopping sdjobs any way a user can, with real processes and real signals: Ctrl-C cancels,
SIGTERM hands the running job back to the queue, kill -9 loses nothing that a stage finished;
and two workers on one queue never run a job twice."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from process_helpers import Lines, start
from runner_helpers import GENERATION_PATHS, Background, requests_to
from sdjobs.client import WebUIClient
from sdjobs.queues import open_store
from sdjobs.sim import SimSettings
from sdjobs.spec import load_job
from sdjobs.sqlite_store import SQLiteStore
from sdjobs.status import JobState

STAGES = """
[[stages]]
type = "txt2img"

[[stages]]
type = "img2img"
denoising_strength = 0.5

[[stages]]
type = "adetailer"
ad_model = "face_yolov8n.pt"

[[stages]]
type = "upscale"
upscaler = "Lanczos"
scale = 2
"""


def job_file(folder: Path, name: str, stages: int = 1) -> Path:
    """A job of ``stages`` of the four stage types, 8 steps of 64x64."""
    path = folder / f"{name}.toml"
    kinds = STAGES.split("\n[[stages]]")[1 : stages + 1]
    path.write_text(
        f'name = "{name}"\nprompt = "a lighthouse"\nseed = 1234\n[settings]\nsteps = 8\nwidth = 64\nheight = 64\n'
        + "".join(f"\n[[stages]]{kind}" for kind in kinds)
    )
    return path


def until(condition: Callable[[], object], what: str, timeout: float = 30.0) -> object:
    """Poll a condition another process makes true, up to a deadline."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"not within {timeout:g} s: {what}")


def finish(process, timeout: float = 60.0) -> tuple[int, str]:
    """Its exit status and stderr, once it ended; it is killed if it outlives ``timeout``."""
    errors = Lines(process.stderr)
    try:
        return process.wait(timeout=timeout), errors.text()
    finally:
        process.kill()


@pytest.fixture
def sim_process():
    """`sdjobs sim` in a process of its own, on a free port; its URL."""
    sim = start("sim", "--port", "0", "--step-time", "0.05")
    try:
        line = sim.stdout.readline()
        assert line.startswith("Simulated WebUI at "), line
        yield line.split()[3]
    finally:
        sim.send_signal(signal.SIGINT)
        sim.wait(timeout=10)


# -- signals ---------------------------------------------------------------------------------


def run_two_jobs_and_signal_in_the_first(webui_sim, tmp_path: Path, signum: int, *, expect: int) -> Lines:
    """`sdjobs run` of one job file twice, sent ``signum`` once the first job shows step 1; its stderr."""
    job = job_file(tmp_path, "lighthouse")
    run = start("run", job, job, "--webui", webui_sim.url, "--frontend", "log", "--poll-interval", "0.25",
                "--out", tmp_path / "out")  # fmt: skip
    logged = Lines(run.stderr)
    try:
        webui_sim.release(2)
        assert logged.wait_for("txt2img · step 1/8 · 12%"), logged.text()
        run.send_signal(signum)
        assert run.wait(timeout=15) == expect, logged.text()
    finally:
        run.kill()
    return logged


@pytest.mark.parametrize("sim_settings", [SimSettings(stepping=True)])
def test_sigterm_hands_the_running_job_back_and_the_rest_stay_queued(
    webui_sim, tmp_path, queue_file
):
    logged = run_two_jobs_and_signal_in_the_first(webui_sim, tmp_path, signal.SIGTERM, expect=143)
    with SQLiteStore(queue_file) as store:
        first, second = store.list()
    assert (first.state, first.attempts, first.stages) == (JobState.QUEUED, 1, ())
    assert (second.state, second.attempts) == (JobState.QUEUED, 0)
    assert (
        f"sdjobs: interrupted: job {first.short_id} will resume at stage 1; 1 job stays queued\n"
        in logged.text()
    )
    assert "Traceback" not in logged.text()
    assert "lighthouse: handed back after " in logged.text() and "cancelled" not in logged.text()
    manifest = json.loads((first.folder / "manifest.json").read_text())
    assert (manifest["outcome"], manifest["stages"][0]["partial"]) == ("handed_back", True)
    assert (
        len(requests_to(webui_sim, ["/sdapi/v1/interrupt"])) == 1
    )  # our request, cut short
    assert len(requests_to(webui_sim, GENERATION_PATHS)) == 1


@pytest.mark.parametrize("sim_settings", [SimSettings(stepping=True)])
def test_ctrl_c_records_the_jobs_run_never_started_as_cancelled(
    webui_sim, tmp_path, queue_file
):
    run_two_jobs_and_signal_in_the_first(webui_sim, tmp_path, signal.SIGINT, expect=130)
    with SQLiteStore(queue_file) as store:
        assert store.list() == []
        outcomes = [(job.state, job.attempts) for job in reversed(store.history())]
    assert outcomes == [(JobState.CANCELLED, 1), (JobState.CANCELLED, 0)]


# -- kill -9 -------------------------------------------------------------------------------------

FOUR_STAGES = [f"{i:02d}-{kind}" for i, kind in enumerate(("txt2img", "img2img", "adetailer", "upscale"), 1)]


def worker_args(url: str, out: Path, *, until_empty: bool = True) -> list[str | Path]:
    return ["worker", *["--until-empty"] * until_empty, "--webui", url, "--frontend", "log", "--poll-interval", "0.25",
            "--out", out]  # fmt: skip


def images_of(record) -> dict[Path, tuple[int, int]]:
    """Each image of the job's stages recorded finished, with its inode and mtime (a stage run again changes them)."""
    return {
        image: (os.stat(image).st_ino, os.stat(image).st_mtime_ns)
        for stage in record.stages if not stage.partial for image in stage.images
    }  # fmt: skip


def assert_done_once(record, kept: dict[Path, tuple[int, int]]) -> None:
    """The 4-stage job ended done in one folder: every stage's one image once, on disk, in the store and in a
    valid manifest; the images ``kept`` from before a kill untouched; no scratch file left."""
    assert record.state is JobState.DONE, record.error
    assert [len(stage.images) for stage in record.stages] == [1, 1, 1, 1]
    assert sorted(path.relative_to(record.folder).as_posix() for path in record.folder.rglob("*")) == sorted(
        [*FOUR_STAGES, *(f"{stage}/001.png" for stage in FOUR_STAGES), "manifest.json"]
    )
    manifest = json.loads((record.folder / "manifest.json").read_text())
    assert (manifest["job_id"], manifest["outcome"]) == (record.id, "done")
    assert [stage["images"] for stage in manifest["stages"]] == [[f"{stage}/001.png"] for stage in FOUR_STAGES]
    assert {image: images_of(record)[image] for image in kept} == kept  # no finished stage ran again


def test_a_worker_killed_in_stage_two_resumes_there_in_the_next_worker(sim_process, tmp_path, queue):
    out = tmp_path / "out"
    added = start("queue", "add", job_file(tmp_path, "four", stages=4))
    assert added.wait(timeout=30) == 0
    job_id = added.stdout.read().split()[0]
    store = open_store(queue)

    first = start(*worker_args(sim_process, out))
    try:
        record = until(lambda: (r := store.get(job_id)).stages and r, "stage 1 recorded")
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=10)
    finally:
        first.kill()
    assert store.get(job_id).state is JobState.RUNNING  # as the dead worker left it
    kept = images_of(record)

    status, errors = finish(start(*worker_args(sim_process, out)))

    assert status == 0, errors
    record = store.get(job_id)
    assert record.attempts == 2
    assert_done_once(record, kept)
    assert [path.name for path in out.iterdir()] == [record.folder.name]
    store.close()


#: Where a process dies (`sdjobs.die_at`), which command it is, and how many stages it recorded first.
KILL_POINTS = [
    ("sample", "run", 0),  # during stage 1's generation request
    ("rename-001.png", "worker", 0),  # stage 1's image written to scratch, not renamed
    ("stage-written@2", "run", 1),  # stage 2's image renamed, its store row not written
    ("rename-manifest.json@2", "worker", 2),  # the manifest after stage 2: written to scratch, not renamed
    ("between-stages@2", "run", 2),  # stage 2 recorded and its manifest written, stage 3 not started
    ("rename-manifest.json@5", "worker", 4),  # the manifest of the job's end
]


@pytest.mark.parametrize(("point", "command", "recorded"), KILL_POINTS)
@pytest.mark.parametrize("sim_settings", [SimSettings(step_time=0.04, first_step_time=0.04)])
def test_killed_at_a_chosen_point_the_job_resumes_and_nothing_is_lost(
    webui_sim, tmp_path, queue_file, point, command, recorded
):
    out, four, one = tmp_path / "out", job_file(tmp_path, "four", stages=4), job_file(tmp_path, "one")
    if command == "run":
        dying = start("run", four, one, "--webui", webui_sim.url, "--poll-interval", "0.25", "--out", out,
                      env={"SDJOBS_TEST_DIE_AT": point})  # fmt: skip
    else:
        with SQLiteStore(queue_file) as store:
            store.add([load_job(four), load_job(one)])
        dying = start(*worker_args(webui_sim.url, out), env={"SDJOBS_TEST_DIE_AT": point})
    status, errors = finish(dying)
    assert status == -signal.SIGKILL, errors
    with SQLiteStore(queue_file) as store:
        job, waiting = store.list()
        assert (job.state, len(job.stages), waiting.state) == (JobState.RUNNING, recorded, JobState.QUEUED)
        if recorded:
            manifest = json.loads((job.folder / "manifest.json").read_text())  # the last one renamed: whole
            assert manifest["outcome"] == "running"
        kept = images_of(job)

        status, errors = finish(start(*worker_args(webui_sim.url, out)))

        assert status == 0, errors
        assert [(record.state, record.attempts) for record in store.history()] == [(JobState.DONE, 1), (JobState.DONE, 2)]
        resumed = store.get(job.id)
    assert resumed.folder == job.folder  # recorded before the first request, however early the kill
    assert_done_once(resumed, kept)
    assert len(list(out.iterdir())) == 2


@pytest.mark.parametrize("sim_settings", [SimSettings(step_time=0.04, first_step_time=0.04)])
def test_kill_9_at_twenty_random_moments_loses_nothing(webui_sim, tmp_path, queue_file):
    seed = random.randrange(2**32)
    moments = random.Random(seed)
    out, spec = tmp_path / "out", load_job(job_file(tmp_path, "four", stages=4))
    kept: dict[Path, tuple[int, int]] = {}
    with SQLiteStore(queue_file) as store:
        for _ in range(20):
            if not store.list():
                store.add([spec])
            worker = start(*worker_args(webui_sim.url, out, until_empty=False))
            errors = Lines(worker.stderr)
            with contextlib.suppress(subprocess.TimeoutExpired):
                worker.wait(timeout=moments.uniform(0.2, 1.5))  # a random moment; it never ends by itself
            worker.send_signal(signal.SIGKILL)
            assert worker.wait(timeout=10) == -signal.SIGKILL, (seed, errors.text())
            for record in [*store.list(), *store.history()]:
                for image, stat in images_of(record).items():
                    assert kept.setdefault(image, stat) == stat, f"seed {seed}: {image} written again"

        status, errors = finish(start(*worker_args(webui_sim.url, out)))

        assert status == 0, errors
        assert store.list() == []
        ended = store.history()
    assert len(list(out.iterdir())) == len(ended)
    for record in ended:
        assert_done_once(record, {image: kept[image] for image in images_of(record) if image in kept})


def test_two_workers_on_one_queue_run_each_job_once(webui_sim, tmp_path, queue):
    added = start("queue", "add", *(job_file(tmp_path, f"job{i}") for i in range(4)))
    assert added.wait(timeout=30) == 0
    worker = [
        "worker",
        "--until-empty",
        "--webui",
        webui_sim.url,
        "--frontend",
        "log",
        "--out",
        tmp_path / "out",
    ]
    workers = [start(*worker), start(*worker)]
    results = [finish(process) for process in workers]
    assert [status for status, _ in results] == [0, 0], results
    with open_store(queue) as store:
        ended = store.history()
    assert (
        sorted((job.state, job.attempts) for job in ended) == [(JobState.DONE, 1)] * 4
    )
    assert len(requests_to(webui_sim, GENERATION_PATHS)) == 4
    assert len(list((tmp_path / "out").iterdir())) == 4


# -- the request a killed worker left on the WebUI ---------------------------------------------


def kill_during_the_request(webui_sim, tmp_path: Path, out: Path) -> None:
    """`sdjobs run` of a one-stage job, killed as the stepping simulator renders its request: still running there."""
    dying = start("run", job_file(tmp_path, "one"), "--webui", webui_sim.url, "--poll-interval", "0.25", "--out", out,
                  env={"SDJOBS_TEST_DIE_AT": "sample"})  # fmt: skip
    status, errors = finish(dying)
    assert status == -signal.SIGKILL, errors
    assert webui_sim.snapshot().current_task is not None


@pytest.mark.parametrize("sim_settings", [SimSettings(stepping=True)])
def test_the_request_of_a_killed_worker_is_interrupted_before_the_job_runs_again(webui_sim, tmp_path, queue_file):
    out = tmp_path / "out"
    kill_during_the_request(webui_sim, tmp_path, out)
    resuming = start(*worker_args(webui_sim.url, out))
    try:
        until(lambda: requests_to(webui_sim, ["/sdapi/v1/interrupt"]), "the lost request interrupted")
        webui_sim.release(1000)  # the job's new request may run
        status, errors = finish(resuming)
    finally:
        webui_sim.release(1000)
    assert status == 0, errors
    assert "the WebUI still runs the request of a worker that died (sdjobs-" in errors
    [interrupt] = requests_to(webui_sim, ["/sdapi/v1/interrupt"])
    lost, again = requests_to(webui_sim, GENERATION_PATHS)
    assert lost[0] < interrupt[0] < again[0]
    with SQLiteStore(queue_file) as store:
        assert [(job.state, job.attempts) for job in store.history()] == [(JobState.DONE, 2)]


@pytest.mark.parametrize("sim_settings", [SimSettings(stepping=True)])
def test_another_clients_job_is_never_taken_for_the_request_of_a_killed_worker(webui_sim, tmp_path, queue_file):
    out = tmp_path / "out"
    kill_during_the_request(webui_sim, tmp_path, out)
    webui_sim.release(8)  # the lost request's 8 steps: it ends; another client's job starts
    assert webui_sim.wait_for(lambda state: state.current_task is None)
    with WebUIClient(webui_sim.url) as other:
        theirs = Background(other.txt2img, {"prompt": "theirs", "steps": 8, "width": 64, "height": 64},
                            force_task_id="task(theirs)")  # fmt: skip
        assert webui_sim.wait_for(lambda state: state.current_task == "task(theirs)")
        resuming = start(*worker_args(webui_sim.url, out))
        try:
            until(lambda: len(requests_to(webui_sim, GENERATION_PATHS)) == 3, "the job's request sent, behind theirs")
        finally:
            webui_sim.release(1000)
        status, errors = finish(resuming)
        assert len(theirs.join().images) == 1
    assert status == 0, errors
    assert requests_to(webui_sim, ["/sdapi/v1/interrupt"]) == []


@pytest.mark.parametrize("sim_settings", [SimSettings(step_time=0.05, first_step_time=0.05)])
def test_a_worker_started_with_pause_after_crash_pauses_the_queue_a_dead_worker_left(webui_sim, tmp_path, queue_file):
    out = tmp_path / "out"
    with SQLiteStore(queue_file) as store:
        [job] = store.add([load_job(job_file(tmp_path, "one"))])
    status, errors = finish(start(*worker_args(webui_sim.url, out), env={"SDJOBS_TEST_DIE_AT": "sample"}))
    assert status == -signal.SIGKILL, errors

    status, errors = finish(start(*worker_args(webui_sim.url, out), "--pause-after-crash"))

    assert status == 0, errors
    assert f"a worker died with jobs running ({job.short_id} (one)): the queue is paused" in errors
    with SQLiteStore(queue_file) as store:
        assert store.queue_paused()
        assert (store.get(job.id).state, store.get(job.id).attempts) == (JobState.QUEUED, 1)
        store.resume()
    status, errors = finish(start(*worker_args(webui_sim.url, out), "--pause-after-crash"))  # nothing died since
    assert status == 0, errors
    with SQLiteStore(queue_file) as store:
        assert (store.get(job.id).state, store.get(job.id).attempts) == (JobState.DONE, 2)
