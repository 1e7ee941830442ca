"""The queue in the user's hands: `sdjobs queue list|show|cancel|remove|move|retry|pause|resume` and
`sdjobs history`, run as a user runs them, and a worker in another process acting on them within
a second; the worker tells front ends of the queue's changes through the queue hooks."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
from process_helpers import Lines, sdjobs, start
from runner_helpers import Background, job_spec, make_runner
from sdjobs import hookimpl
from sdjobs.sim import SimSettings
from sdjobs.queues import open_store
from sdjobs.sqlite_store import SQLiteStore
from sdjobs.status import CancelMode, JobState
from sdjobs.worker import Worker
from test_kill import finish, job_file, until


def add(*files: Path) -> list[str]:
    added = sdjobs("queue", "add", *files)
    assert added.returncode == 0, added.stderr
    return [line.split()[0] for line in added.stdout.splitlines()]


def listed() -> list[dict]:
    shown = sdjobs("queue", "list", "--json")
    assert shown.returncode == 0, shown.stderr
    return json.loads(shown.stdout)["jobs"]


def test_queue_commands_change_the_queue_and_each_names_what_it_changed(queue, tmp_path):
    a, b, c = add(*(job_file(tmp_path, name, stages=2) for name in ("sea", "sky", "sun")))
    moved = sdjobs("queue", "move", c[:6], "--top")
    assert moved.stdout == f"moved job {c[:8]} (sun) to position 1\n"
    assert sdjobs("queue", "move", c, "--to", "3").stdout == f"moved job {c[:8]} (sun) to position 3\n"
    assert sdjobs("queue", "move", a, "--to", "99").stdout == f"moved job {a[:8]} (sea) to position 3\n"
    assert [(job["position"], job["id"], job["state"], job["stages_done"]) for job in listed()] == [
        (1, b, "queued", 0), (2, c, "queued", 0), (3, a, "queued", 0)
    ]  # fmt: skip
    assert sdjobs("queue", "cancel", b).stdout == f"cancelled job {b[:8]} (sky)\n"
    assert sdjobs("queue", "retry", b).stdout == f"queued job {b[:8]} (sky) again, last; it starts at stage 1 of 2\n"
    assert sdjobs("queue", "pause", a).stdout == f"paused job {a[:8]} (sea)\n"
    table = sdjobs("queue", "list").stdout.splitlines()
    assert table[0].split() == ["#", "id", "name", "stages", "state", "attempts", "expected", "start", "end"]
    assert [line.split()[1:6] for line in table[1:4]] == [
        [c[:8], "sun", "0/2", "queued", "0"], [a[:8], "sea", "0/2", "paused", "0"], [b[:8], "sky", "0/2", "queued", "0"]
    ]  # fmt: skip
    assert sdjobs("queue", "resume", a).stdout == f"resumed job {a[:8]} (sea)\n"
    assert sdjobs("queue", "pause").stdout.startswith("paused the queue: no job starts until `sdjobs queue resume`")
    assert sdjobs("queue", "list").stdout.startswith("The queue is paused")
    assert sdjobs("queue", "resume").stdout == "resumed the queue\n"
    assert sdjobs("queue", "remove", a).stdout == f"removed job {a[:8]} (sea)\n"
    assert [job["id"] for job in listed()] == [c, b]
    shown = sdjobs("queue", "show", c[:4]).stdout
    assert shown.startswith(f"job {c[:8]} (sun): queued, 0 attempts\nid:     {c}\nseed:   1234\nfolder: not made yet\n")
    assert "  1. txt2img   not run\n  2. img2img   not run\n" in shown
    assert json.loads(sdjobs("queue", "show", c, "--json").stdout)["spec"]["name"] == "sun"


@pytest.mark.parametrize(
    "command", [("queue", "show"), ("queue", "cancel"), ("queue", "remove"), ("queue", "retry"),
                ("queue", "move", "--top"), ("queue", "pause"), ("queue", "resume")],  # fmt: skip
)
def test_an_unknown_id_is_exit_2_with_one_line(command, queue):
    answer = sdjobs(*command, "feedface")
    assert answer.returncode == 2
    with open_store(queue) as store:
        assert answer.stderr == f"sdjobs: error: {store.location}: no job with id 'feedface'\n"


def test_a_job_in_the_wrong_state_is_exit_2_with_one_line(queue, tmp_path):
    [job] = add(job_file(tmp_path, "sea"))
    answer = sdjobs("queue", "retry", job)
    assert (answer.returncode, answer.stderr) == (2, f"sdjobs: error: job {job[:8]} is queued: only a failed or cancelled job is retried\n")


def test_history_lists_ended_jobs_latest_first_filtered_as_json_or_a_table(queue, tmp_path):
    with open_store(queue) as store:
        done, failed, other = store.add([job_spec(name="sea"), job_spec(name="sea"), job_spec(name="sky")])
        worker = store.register_worker()
        for job, outcome in ((done, JobState.DONE), (failed, JobState.FAILED)):
            store.claim(worker.id)
            store.set_folder(job.id, worker.id, tmp_path / job.short_id)
            store.finish(job.id, worker.id, outcome, "boom" if outcome is JobState.FAILED else None)
        store.request_cancel(other.id)
    everything = json.loads(sdjobs("history", "--json").stdout)
    assert [(job["id"], job["state"]) for job in everything] == [
        (other.id, "cancelled"), (failed.id, "failed"), (done.id, "done")
    ]  # fmt: skip
    assert everything[1]["folder"] == str(tmp_path / failed.short_id) and everything[1]["error"] == "boom"
    assert [job["id"] for job in json.loads(sdjobs("history", "--json", "--name", "sea", "--limit", "1").stdout)] == [failed.id]
    assert [job["id"] for job in json.loads(sdjobs("history", "--json", "--outcome", "done").stdout)] == [done.id]
    assert json.loads(sdjobs("history", "--json", "--until", "2000-01-01").stdout) == []
    table = sdjobs("history", "--since", "2000-01-01").stdout.splitlines()
    assert table[0].split() == ["ended", "id", "outcome", "name", "images", "time", "folder"]
    assert table[2].split()[2:5] == [failed.short_id, "failed", "sea"] and table[2].endswith(str(tmp_path / failed.short_id))
    assert sdjobs("history", "--outcome", "done", "--name", "sky").stdout == "No finished job matches.\n"
    assert sdjobs("history", "--since", "yesterday").returncode == 2


# -- a worker in another process acts on the commands -------------------------------------------


@pytest.fixture
def worker_process(webui_sim, tmp_path, queue):
    """`sdjobs worker` in a process of its own on the test's queue, against a stepping simulator; its JSON lines."""
    process = start("worker", "--webui", webui_sim.url, "--frontend", "jsonl", "--poll-interval", "0.25",
                    "--out", tmp_path / "out")  # fmt: skip
    lines = Lines(process.stdout)
    yield process, lines
    process.terminate()
    _, errors = finish(process, timeout=15)
    print(f"the worker's stderr:\n{errors}")  # pytest shows it when the test failed


def events(lines: Lines, name: str) -> list[dict]:
    return [event for event in map(json.loads, lines.lines) if event["event"] == name]


def a_job_running(webui_sim, worker_process, tmp_path: Path) -> tuple[Lines, str]:
    """Queue a 2-stage job and let the worker's first step show; its output lines and the job's id."""
    _, lines = worker_process
    [job] = add(job_file(tmp_path, "sea", stages=2))
    webui_sim.release(2)
    assert lines.wait_for('"event": "progress"'), lines.text(0)
    return lines, job


@pytest.mark.parametrize("sim_settings", [SimSettings(stepping=True)])
def test_a_cancel_from_another_process_ends_the_running_job_cancelled(webui_sim, worker_process, tmp_path, queue):
    lines, job = a_job_running(webui_sim, worker_process, tmp_path)

    def told() -> list[list[str]]:
        return [event["jobs"] for event in events(lines, "queue_changed")]

    # The worker looks at the queue every second (a dispatched one): the running job is told first,
    # before the cancel ends it (a job cancelled within the second between two looks would not be).
    until(lambda: [job] in told(), "the queue told of the running job", timeout=30)
    answer = sdjobs("queue", "cancel", job)
    assert answer.stdout == f"job {job[:8]} (sea) is running: its worker cancels it now\n"
    with open_store(queue) as store:  # no step is released: only the cancel can end the job
        ended = until(lambda: store.get(job).ended and store.get(job), "the job ended", timeout=30)
    assert (ended.state, ended.next_stage) == (JobState.CANCELLED, 0)
    assert lines.wait_for('"outcome": "cancelled"'), lines.text(0)
    until(lambda: told()[-1] == [], "the queue emptied after the cancel", timeout=30)


@pytest.mark.parametrize("sim_settings", [SimSettings(stepping=True)])
def test_pause_now_hands_the_running_job_back_and_resume_runs_it_on(webui_sim, worker_process, tmp_path, queue):
    lines, job = a_job_running(webui_sim, worker_process, tmp_path)
    assert sdjobs("queue", "pause", "--now").returncode == 0
    with open_store(queue) as store:
        back = until(lambda: store.get(job).state is JobState.QUEUED and store.get(job), "the job is back", timeout=10)
        assert (back.attempts, back.recall, back.next_stage) == (1, False, 0)
        assert lines.wait_for('"event": "queue_paused"'), lines.text(0)
        finished = [json.loads(line) for line in lines.lines if '"event": "job_finished"' in line]
        assert [event["outcome"] for event in finished] == ["handed_back"]  # not "cancelled": it went back
        assert sdjobs("queue", "resume").returncode == 0
        webui_sim.release(1000)
        ended = until(lambda: store.get(job).ended and store.get(job), "the job ended", timeout=20)
    assert (ended.state, ended.attempts) == (JobState.DONE, 2)
    assert lines.wait_for('"event": "queue_resumed"'), lines.text(0)


# -- the queue hooks, in process ------------------------------------------------------------------


class QueueHooks:
    """Records the queue hooks; a test waits on ``changed`` for the next one."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, object]] = []
        self.changed = threading.Condition()

    def _record(self, name: str, value: object = None) -> None:
        with self.changed:
            self.calls.append((name, value))
            self.changed.notify_all()

    def wait_for(self, call: tuple[str, object]) -> bool:
        with self.changed:
            return self.changed.wait_for(lambda: call in self.calls, timeout=5)

    @hookimpl
    def sdjobs_queue_changed(self, jobs):
        self._record("queue_changed", [job.spec.name for job in jobs])

    @hookimpl
    def sdjobs_history_changed(self, jobs):
        self._record("history_changed", [(job.spec.name, job.state) for job in jobs])

    @hookimpl
    def sdjobs_queue_paused(self):
        self._record("queue_paused")

    @hookimpl
    def sdjobs_queue_resumed(self):
        self._record("queue_resumed")


def test_the_worker_tells_the_front_ends_of_queue_changes_once_each(webui_client, queue_file, tmp_path):
    hooks = QueueHooks()
    with SQLiteStore(queue_file) as store:
        store.pause()
        [sea] = store.add([job_spec(name="sea")])
        runner, _ = make_runner(webui_client, [], tmp_path / "out", plugins=[hooks])
        worker = Worker(store, runner, watch_interval=0.02)
        working = Background(worker.run)
        assert hooks.wait_for(("queue_paused", None))
        assert hooks.wait_for(("queue_changed", ["sea"]))
        store.add([job_spec(name="sky")])
        assert hooks.wait_for(("queue_changed", ["sea", "sky"]))
        worker.resume_queue()
        assert hooks.wait_for(("history_changed", [("sea", JobState.DONE), ("sky", JobState.DONE)][::-1]))
        worker.cancel(CancelMode.NOW, rest=True)
        working.join(timeout=10)
    names = [name for name, _ in hooks.calls]
    assert names[:3] == ["queue_changed", "history_changed", "queue_paused"]  # as the worker starts
    assert names.count("queue_paused") == 1 and names.count("queue_resumed") == 1
    assert [jobs for name, jobs in hooks.calls if name == "queue_changed"][-1] == []  # told as the worker left
    assert worker.outcomes[sea.id] is JobState.DONE
