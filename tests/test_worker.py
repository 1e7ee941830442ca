"""The worker: it claims queued jobs from the store and runs them, picks up jobs added while it
waits, stops at once when asked, gives a job up quietly when the store gave it to another, and
claims nothing while the WebUI stays down."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator

import attrs
import pytest
from process_helpers import sdjobs
from runner_helpers import FAST, Background, Said, job_spec, make_runner
from sdjobs import worker as worker_module
from sdjobs.cli import exit_status
from sdjobs.client import WebUIClient
from sdjobs.sim import SimSettings, SimulatedWebUI
from sdjobs.sqlite_store import SQLiteStore
from sdjobs.status import CancelMode, JobState
from sdjobs.worker import Worker

JOB = """\
name = "{name}"
prompt = "a lighthouse at dusk"
seed = 1234

[settings]
steps = 4
width = 64
height = 64

[[stages]]
type = "txt2img"
"""


@pytest.fixture
def store(queue_file):
    with SQLiteStore(queue_file) as store:
        yield store


def test_a_job_added_while_the_worker_waits_is_run_and_a_stop_ends_the_wait_at_once(
    webui_client, store, tmp_path
):
    [first] = store.add([job_spec(name="first")])
    runner, log = make_runner(webui_client, [], tmp_path / "out")
    worker = Worker(store, runner, idle_poll=0.05)
    working = Background(worker.run)
    assert log.wait_for("job_finished", lambda call: call["status"].job_id == first.id)
    [second] = store.add([job_spec(name="second")])
    assert log.wait_for("job_finished", lambda call: call["status"].job_id == second.id)
    worker.idle_poll = (
        3600  # the next wait would outlast the join below, unless the stop ends it
    )
    worker.cancel(CancelMode.NOW, rest=True)
    working.join(timeout=10)
    assert worker.outcomes == {first.id: JobState.DONE, second.id: JobState.DONE}
    assert [call["job_id"] for name, call in log.calls if name == "job_queued"] == [
        first.id,
        second.id,
    ]
    assert log.names()[-1] == "queue_drained"
    assert store.workers() == []  # it left the store as it stopped


def test_until_empty_waits_for_a_job_another_worker_runs(webui_client, store, tmp_path):
    [job] = store.add([job_spec()])
    other = store.register_worker()
    store.claim(other.id)
    runner, _ = make_runner(webui_client, [], tmp_path / "out")
    worker = Worker(store, runner, until_empty=True, idle_poll=0.05)
    working = Background(worker.run)
    store.release(job.id, other.id)  # back in the queue: the waiting worker takes it
    working.join(timeout=30)
    assert worker.outcomes == {job.id: JobState.DONE}
    assert store.get(job.id).attempts == 2


def test_a_job_the_store_gave_to_another_worker_is_let_go_without_a_write(
    webui_sim, webui_client, store, tmp_path
):
    [job] = store.add([job_spec(("txt2img", "img2img"))])
    runner, log = make_runner(webui_client, [], tmp_path / "out")
    worker = Worker(store, runner, until_empty=True, idle_poll=0.05)
    taker: list[str] = []

    def taken_over(call):
        """At the end of stage 1: the store counts this worker gone and another takes the job."""
        [me] = store.workers()
        store.unregister_worker(me.id)
        taker.append(store.register_worker().id)
        store.claim(taker[0])
        return True

    working = Background(worker.run)
    assert log.wait_for("stage_finished", taken_over, timeout=30)
    assert log.wait_for("job_finished", timeout=30)
    worker.cancel(CancelMode.NOW, rest=True)
    working.join(timeout=10)
    record = store.get(job.id)
    assert record.state is JobState.RUNNING and record.worker == taker[0]
    assert [r.stage for r in record.stages] == [
        "txt2img"
    ]  # stage 2 was not recorded by the old worker
    manifest = json.loads((record.folder / "manifest.json").read_text())
    assert (manifest["outcome"], len(manifest["stages"])) == (
        "running",
        1,
    )  # nor written into its manifest
    assert job.id not in worker.outcomes
    assert (
        len(store.workers()) == 1
    )  # the taker; the old worker registered again, then left


# -- a WebUI that stays down ----------------------------------------------------------------

#: A job gives up on a WebUI that is down after half a second.
IMPATIENT = attrs.evolve(FAST, wait_for_webui=0.5)


@pytest.fixture
def worker_said() -> Iterator[Callable[[str], Said]]:
    """``worker_said(text)``: a `Said` on the worker's logger, DEBUG records included, while the test runs."""
    logger = logging.getLogger("sdjobs.worker")
    level, added = logger.level, []
    logger.setLevel(logging.DEBUG)

    def said(text: str) -> Said:
        added.append(Said(text))
        logger.addHandler(added[-1])
        return added[-1]

    yield said
    for handler in added:
        logger.removeHandler(handler)
    logger.setLevel(level)


def test_after_a_job_failed_on_a_webui_that_stayed_down_nothing_is_claimed_until_it_answers(
    closed_port_url, store, tmp_path, worker_said, caplog
):
    first, second = store.add([job_spec(name="first"), job_spec(name="second")])
    waits, pinged = worker_said("the queue waits until it answers"), worker_said("still unreachable")
    with WebUIClient(closed_port_url, retries=0) as client:
        runner, log = make_runner(client, [], tmp_path / "out", settings=IMPATIENT)
        worker = Worker(store, runner, idle_poll=0.05)
        working = Background(worker.run)
        assert waits.seen.wait(15)
        assert pinged.seen.wait(15)  # a ping of the worker's own went unanswered
        assert (store.get(second.id).state, store.get(second.id).attempts) == (JobState.QUEUED, 0)
        port = int(closed_port_url.rsplit(":", 1)[1])
        with SimulatedWebUI(SimSettings(step_time=0.002, first_step_time=0.002), port=port):
            assert log.wait_for("job_finished", lambda call: call["status"].job_id == second.id, timeout=30)
            worker.cancel(CancelMode.NOW, rest=True)
            working.join(timeout=10)
    assert worker.outcomes == {first.id: JobState.FAILED, second.id: JobState.DONE}
    warned = [r.getMessage() for r in caplog.records if r.name == "sdjobs.worker" and r.levelno == logging.WARNING]
    assert warned == ["WebUI unreachable for 0.5 s: the queue waits until it answers"]  # said once


def test_a_stop_ends_the_wait_for_the_webui_at_once(closed_port_url, store, tmp_path, worker_said, monkeypatch):
    monkeypatch.setattr(worker_module, "PING_BACKOFF", (3600.0, 3600.0))  # no ping would come in time
    store.add([job_spec(name="first"), job_spec(name="second")])
    waits = worker_said("the queue waits until it answers")
    with WebUIClient(closed_port_url, retries=0) as client:
        runner, _ = make_runner(client, [], tmp_path / "out", settings=IMPATIENT)
        worker = Worker(store, runner, idle_poll=0.05)
        working = Background(worker.run)
        assert waits.seen.wait(15)
        worker.hand_back()
        working.join(timeout=2)
    assert store.workers() == []


def test_until_empty_a_webui_that_stayed_down_stops_the_worker_leaving_the_rest_queued(
    closed_port_url, store, tmp_path, worker_said
):
    first, second = store.add([job_spec(name="first"), job_spec(name="second")])
    stops = worker_said("WebUI unreachable for 0.5 s: the worker stops; the jobs not run stay queued")
    with WebUIClient(closed_port_url, retries=0) as client:
        runner, _ = make_runner(client, [], tmp_path / "out", settings=IMPATIENT)
        worker = Worker(store, runner, until_empty=True, idle_poll=0.05)
        Background(worker.run).join(timeout=15)
    assert stops.seen.is_set()
    assert worker.outcomes == {first.id: JobState.FAILED} and exit_status(worker) == 1
    assert (store.get(second.id).state, store.get(second.id).attempts) == (JobState.QUEUED, 0)


# -- the commands ---------------------------------------------------------------------------


def test_queue_add_prints_each_id_and_a_worker_runs_them_until_empty(
    webui_sim, tmp_path, queue_file
):
    files = []
    for name in ("dawn", "dusk"):
        files.append(tmp_path / f"{name}.toml")
        files[-1].write_text(JOB.format(name=name))
    added = sdjobs("queue", "add", *files, "--priority", "3")
    assert added.returncode == 0, added.stderr
    ids = [line.split()[0] for line in added.stdout.splitlines()]
    assert [line.split()[1] for line in added.stdout.splitlines()] == ["dawn", "dusk"]

    out = tmp_path / "out"
    ran = sdjobs(
        "worker",
        "--until-empty",
        "--webui",
        webui_sim.url,
        "--frontend",
        "jsonl",
        "--out",
        out,
    )

    assert ran.returncode == 0, ran.stderr
    events = [json.loads(line) for line in ran.stdout.splitlines()]
    assert [e["job"] for e in events if e["event"] == "job_queued"] == ids
    assert events[-1] == {
        **events[-1],
        "event": "queue_drained",
        "outcomes": dict.fromkeys(ids, "done"),
    }
    with SQLiteStore(queue_file) as store:
        assert [store.get(job_id).state for job_id in ids] == [
            JobState.DONE,
            JobState.DONE,
        ]
        assert {store.get(job_id).priority for job_id in ids} == {3}
    assert sorted(path.name.rsplit("-", 1)[1] for path in out.iterdir()) == sorted(
        job_id[:8] for job_id in ids
    )


@pytest.mark.parametrize(
    "command",
    [
        ["worker", "--until-empty", "--frontend", "log"],
        ["queue", "add"],
        ["run", "--frontend", "log"],
    ],
)
def test_a_file_that_is_no_queue_is_one_line_naming_it(command, tmp_path):
    bad = tmp_path / "notes.db"
    bad.write_bytes(b"these are my notes, not a queue" * 200)
    job = tmp_path / "job.toml"
    job.write_text(JOB.format(name="x"))
    files = [job] if command[0] in ("queue", "run") else []
    refused = sdjobs(*command, *files, "--queue", bad)
    assert refused.returncode == 2
    assert (
        refused.stderr.startswith(f"sdjobs: error: {bad}: ")
        and refused.stderr.count("\n") == 1
    ), refused.stderr
    assert bad.read_bytes() == b"these are my notes, not a queue" * 200


def test_the_queue_file_comes_from_the_environment_when_no_option_names_it(tmp_path):
    job = tmp_path / "job.toml"
    job.write_text(JOB.format(name="x"))
    queue = tmp_path / "elsewhere.db"
    assert sdjobs("queue", "add", job, env={"SDJOBS_QUEUE": str(queue)}).returncode == 0
    with SQLiteStore(queue) as store:
        assert [record.spec.name for record in store.list()] == ["x"]
