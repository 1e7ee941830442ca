"""Stopping sdjobs any way a user can, with real processes and real signals: Ctrl-C cancels,
SIGTERM hands the running job back to the queue, kill -9 loses nothing that a stage finished;
and two workers on one queue never run a job twice."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from process_helpers import Lines, start
from runner_helpers import GENERATION_PATHS, requests_to
from sdjobs.sim import SimSettings
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


def test_a_worker_killed_in_stage_two_resumes_there_in_the_next_worker(
    sim_process, tmp_path, queue_file
):
    out = tmp_path / "out"
    added = start("queue", "add", job_file(tmp_path, "four", stages=4))
    assert added.wait(timeout=30) == 0
    job_id = added.stdout.read().split()[0]
    store = SQLiteStore(queue_file)
    worker = [
        "worker",
        "--until-empty",
        "--webui",
        sim_process,
        "--frontend",
        "log",
        "--out",
        out,
    ]

    first = start(*worker)
    try:
        record = until(
            lambda: (r := store.get(job_id)).stages and r, "stage 1 recorded"
        )
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=10)
    finally:
        first.kill()
    assert store.get(job_id).state is JobState.RUNNING  # as the dead worker left it
    [stage_one] = record.stages[0].images
    before = os.stat(stage_one)

    status, errors = finish(start(*worker))

    assert status == 0, errors
    record = store.get(job_id)
    assert (record.state, record.attempts) == (JobState.DONE, 2)
    assert [
        len(list(record.folder.glob(f"{i:02d}-*/*.png"))) for i in (1, 2, 3, 4)
    ] == [1, 1, 1, 1]
    after = os.stat(stage_one)
    assert (after.st_ino, after.st_mtime_ns) == (
        before.st_ino,
        before.st_mtime_ns,
    )  # stage 1 not run again
    manifest = json.loads((record.folder / "manifest.json").read_text())
    assert manifest["outcome"] == "done"
    assert [stage["images"] for stage in manifest["stages"]] == [
        [f"{i:02d}-{kind}/001.png"]
        for i, kind in enumerate(("txt2img", "img2img", "adetailer", "upscale"), 1)
    ]
    assert [path.name for path in out.iterdir()] == [record.folder.name]
    store.close()


def test_two_workers_on_one_queue_run_each_job_once(webui_sim, tmp_path, queue_file):
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
    with SQLiteStore(queue_file) as store:
        ended = store.history()
    assert (
        sorted((job.state, job.attempts) for job in ended) == [(JobState.DONE, 1)] * 4
    )
    assert len(requests_to(webui_sim, GENERATION_PATHS)) == 4
    assert len(list((tmp_path / "out").iterdir())) == 4
