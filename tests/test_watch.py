"""`sdjobs watch` on both backends, as real processes: a worker runs the queue, a watcher on the same
queue (another process, as on another host) shows every event of its jobs through the jsonl front end
and its plugins, in order, progress never going back, each job ending with its end."""

from __future__ import annotations

import json
import signal
import socket
from pathlib import Path

import attrs
import psycopg
import pytest
from plugin_helpers import install_distribution
from process_helpers import Lines, start
from runner_helpers import job_spec
from sdjobs.feed import Publisher
from sdjobs.postgres_server import fresh_url
from sdjobs.postgres_store import PostgresStore, migrate
from sdjobs.queues import open_store
from sdjobs.sim import SimSettings
from sdjobs.sqlite_store import SQLiteStore
from sdjobs.status import JobState, RuntimeStatus, StageResult
from test_kill import finish, job_file, sim_process, until, worker_args  # noqa: F401  (sim_process: a fixture)

RECORDER = """
    import json, os
    from sdjobs import hookimpl

    def _write(hook, status=None, **more):
        with open(os.environ["WATCH_RECORD"], "a") as out:
            out.write(json.dumps({"hook": hook, "job": status and status.job_id, "worker": status and status.worker,
                                  **more}) + "\\n")

    @hookimpl
    def sdjobs_job_started(status, spec):
        _write("job_started", status, stages=len(spec.stages))

    @hookimpl
    def sdjobs_stage_started(status, stage):
        _write("stage_started", status, stage=stage.type)

    @hookimpl
    def sdjobs_progress(status):
        _write("progress", status, progress=status.job_progress)

    @hookimpl
    def sdjobs_stage_finished(status, result):
        _write("stage_finished", status, images=len(result.images))

    @hookimpl
    def sdjobs_job_finished(status, outcome, results):
        _write("job_finished", status, outcome=str(outcome), results=len(results))

    @hookimpl
    def sdjobs_queue_drained(outcomes):
        _write("queue_drained", outcomes={job: str(outcome) for job, outcome in outcomes.items()})
"""


def watcher(tmp_path: Path, *more: str):
    """`sdjobs watch` with the jsonl front end and a recording plugin installed (in its environment only)."""
    site = install_distribution(tmp_path / "site", "watch-recorder", {"recorder": "watch_recorder"},
                                {"watch_recorder": RECORDER})  # fmt: skip
    record = tmp_path / "hooks.jsonl"
    process = start("watch", "--frontend", "jsonl", *more, env={"PYTHONPATH": str(site), "WATCH_RECORD": str(record)})
    return process, Lines(process.stdout), record


def read_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines()]


def test_a_watcher_shows_every_event_of_another_processs_jobs_in_order(queue, sim_process, tmp_path):
    jobs = [job_file(tmp_path, name, stages=2) for name in ("sea", "sky")]
    added = start("queue", "add", *jobs)
    assert added.wait(timeout=30) == 0
    ids = [line.split()[0] for line in added.stdout.read().splitlines()]

    watch, shown, record = watcher(tmp_path, "--until-empty")
    assert shown.wait_for('"event": "queue_changed"'), "the watcher looked at the queue"
    status, errors = finish(start(*worker_args(sim_process, tmp_path / "out")))
    assert status == 0, errors
    assert finish(watch, timeout=30)[0] == 0, "--until-empty: it stopped once the queue was empty"

    events = [event for event in read_lines(shown.text()) if "job" in event]
    with open_store(queue) as store:
        workers = {event["worker"] for event in events if event["event"] != "job_queued"}
        assert len(workers) == 1 and workers.pop().endswith(f" on {socket.gethostname()}")
        for job_id in ids:
            mine = [event for event in events if event["job"] == job_id]
            kinds = [event["event"] for event in mine]
            assert kinds[:2] == ["job_queued", "job_started"] and kinds[-1] == "job_finished", kinds
            assert [event["stage_index"] for event in mine if event["event"] == "stage_started"] == [0, 1]
            assert [event["stage_index"] for event in mine if event["event"] == "stage_finished"] == [0, 1]
            assert "progress" in kinds[kinds.index("stage_started") : kinds.index("stage_finished")]
            job_progress = [event["job_progress"] for event in mine[1:]]
            assert job_progress == sorted(job_progress), "progress never goes back"
            finished = mine[-1]
            assert (finished["outcome"], finished["job_progress"]) == ("done", 1.0)
            assert finished["seed"] == store.get(job_id).spec.seed == 1234
            assert finished["server"] == store.get(job_id).server == sim_process
    drained = read_lines(shown.text())[-1]
    assert drained == {**drained, "event": "queue_drained", "outcomes": dict.fromkeys(ids, "done")}

    hooks = read_lines(record.read_text())
    assert hooks[-1]["hook"] == "queue_drained" and hooks[-1]["outcomes"] == dict.fromkeys(ids, "done")
    for job_id in ids:
        mine = [hook for hook in hooks if hook["job"] == job_id]
        assert [hook["hook"] for hook in mine if hook["hook"] != "progress"] == [
            "job_started", "stage_started", "stage_finished", "stage_started", "stage_finished", "job_finished"
        ]  # fmt: skip
        assert mine[0]["stages"] == 2 and [hook["stage"] for hook in mine if "stage" in hook] == ["txt2img", "img2img"]
        assert mine[-1]["outcome"] == "done" and mine[-1]["results"] == 2
        assert all(hook["worker"] for hook in mine), "the plugin sees which worker runs the job"


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_watcher_stops_with_status_0_on_ctrl_c_or_sigterm_and_the_queue_is_untouched(queue, tmp_path, signum):
    with open_store(queue) as store:
        [job] = store.add([job_spec(("txt2img",), name="sea")])
        watch, shown, _ = watcher(tmp_path)
        assert shown.wait_for('"event": "queue_changed"'), "it watches"
        watch.send_signal(signum)
        status, errors = finish(watch, timeout=30)
        assert status == 0, errors
        assert read_lines(shown.text())[-1]["event"] == "queue_drained"
        assert "Traceback" not in errors
        assert store.get(job.id) == job, "a watcher's Ctrl-C cancels no job"


# -- what a worker publishes --------------------------------------------------------------------


def status(job_id: str, progress: float, **more) -> RuntimeStatus:
    return RuntimeStatus(job_id, "sea", "txt2img", 0, 2, progress=progress, job_progress=progress / 2, **more)


def test_a_status_read_back_from_the_feed_equals_the_one_published_but_its_preview():
    full = status("a" * 32, 0.5, image=2, images=3, step=4, steps=8, pass_kind="hires", face=(1, 2), server="desk",
                  eta=1.5, job_eta=9.0, seed=7, started_at=1.0, state=JobState.RUNNING, queue_position=(1, 3),
                  preview="data:...", folder=Path("/out/sea"), worker="3fa2b1c0 on gpu1")  # fmt: skip
    read = RuntimeStatus.from_dict(json.loads(json.dumps(full.to_dict())))
    assert read == attrs.evolve(full, preview=None)
    assert RuntimeStatus.from_dict({**full.to_dict(), "from_a_newer_sdjobs": 1}) == read


def test_a_publisher_writes_the_latest_progress_of_each_job_between_its_other_events(queue_file):
    """Progress queued while the last write is under way is coalesced: only the latest of each run of a job's
    progress is written, in place, so the feed keeps every other event and the order of each job's events."""
    with SQLiteStore(queue_file) as store:
        publisher = Publisher(store, lambda: "3fa2b1c0 on gpu1")  # not started: `stop` writes what is queued
        for progress in (0.1, 0.2, 0.3):
            publisher.sdjobs_progress(status("a", progress))
        publisher.sdjobs_progress(status("b", 0.5))
        publisher.sdjobs_progress(status("a", 0.4))
        publisher.sdjobs_stage_finished(status("a", 1.0), StageResult("txt2img", 0))
        publisher.sdjobs_progress(status("a", 0.1))
        publisher.stop()
        read = [(event.job_id, event.kind, event.body["status"]["progress"]) for event in store.feed()]
        assert read == [("a", "progress", 0.4), ("b", "progress", 0.5), ("a", "stage_finished", 1.0), ("a", "progress", 0.1)]
        assert {event.worker for event in store.feed()} == {"3fa2b1c0 on gpu1"}


def test_a_publisher_writes_a_jobs_end_at_once_with_what_was_queued_before_it(queue_file):
    with SQLiteStore(queue_file) as store:
        publisher = Publisher(store, lambda: "w")  # not started: only the end writes
        publisher.sdjobs_job_started(status("a", 0.0))
        publisher.sdjobs_job_finished(status("a", 1.0), JobState.DONE, None, (StageResult("txt2img", 0),))
        [started, finished] = store.feed()
        assert (started.kind, finished.kind, finished.body["outcome"]) == ("job_started", "job_finished", "done")
        assert [StageResult.from_dict(result) for result in finished.body["results"]] == [StageResult("txt2img", 0)]


def test_a_queue_a_watcher_cannot_use_is_one_line_and_status_2(tmp_path, postgres_url):
    """A folder, and a PostgreSQL queue made by an sdjobs without the feed (schema 1): named, with what to do."""
    status, errors = finish(start("watch", "--queue", tmp_path, "--frontend", "jsonl"))
    assert (status, errors) == (2, f"sdjobs: error: {tmp_path}: is a folder, not a queue file\n")
    url = fresh_url(postgres_url)
    migrate(url)
    with psycopg.connect(url, autocommit=True) as connection:
        connection.execute("DROP TABLE sdjobs_feed")
        connection.execute("UPDATE sdjobs_settings SET value = '1' WHERE key = 'schema_version'")
    status, errors = finish(start("watch", "--queue", url, "--frontend", "jsonl"))
    assert status == 2 and errors.endswith("has an older sdjobs queue (schema 1); run: sdjobs queue migrate --queue URL\n"), errors
    assert migrate(url) == 1
    with PostgresStore(url) as store:
        assert store.feed() == []


@pytest.mark.parametrize("sim_settings", [SimSettings(stepping=True)])
def test_a_watcher_shows_each_workers_job_under_its_own_worker(queue, webui_sim, tmp_path):
    """Two worker processes, one job each (the simulator holds both until released): the watcher shows both."""
    with open_store(queue) as store:
        first, second = store.add([job_spec(("txt2img",), name="sea"), job_spec(("txt2img",), name="sky")])
        watch, shown, _ = watcher(tmp_path, "--until-empty")
        workers = [start(*worker_args(webui_sim.url, tmp_path / "out"))]
        until(lambda: store.get(first.id).state is JobState.RUNNING, "the first worker took the first job")
        workers.append(start(*worker_args(webui_sim.url, tmp_path / "out")))
        until(lambda: store.get(second.id).state is JobState.RUNNING, "the second worker took the second job")
        webui_sim.release(1000)
        for process in workers:
            status, errors = finish(process)
            assert status == 0, errors
        assert finish(watch, timeout=30)[0] == 0
        events = [event for event in read_lines(shown.text()) if event.get("worker")]
        by_job = {job.id: {event["worker"] for event in events if event["job"] == job.id} for job in (first, second)}
        assert all(len(names) == 1 for names in by_job.values()), by_job
        assert by_job[first.id] != by_job[second.id], "each job under the worker that ran it"
        finished = [event["job"] for event in events if event["event"] == "job_finished" and event["outcome"] == "done"]
        assert sorted(finished) == sorted([first.id, second.id])
