"""The worker: it claims queued jobs from the store and runs them, picks up jobs added while it
waits, stops at once when asked, and gives a job up quietly when the store gave it to another."""

from __future__ import annotations

import json

import pytest
from process_helpers import sdjobs
from runner_helpers import Background, job_spec, make_runner
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
