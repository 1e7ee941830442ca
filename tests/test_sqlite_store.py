"""The SQLite store's own promises: where it lives, its schema, a file it must refuse, other processes.

Everything here uses a real file and, where another process is the point, a
real process (`subprocess`), synchronised by lines on its pipes.
"""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import platformdirs
import pytest
from process_helpers import NOBODY, in_fork
from runner_helpers import Background

from sdjobs.spec import JobSpec
from sdjobs.sqlite_store import (
    APPLICATION_ID,
    MIGRATIONS,
    QUEUE_ENV,
    SCHEMA_VERSION,
    SQLiteStore,
    _command_line,
    default_path,
    migrate,
    queue_path,
)
from sdjobs.status import CancelMode, JobState, StageResult
from sdjobs.store import StoreLocked, StoreTooNew, StoreUnreadable

SPEC = JobSpec.from_mapping({"name": "cat", "seed": 7, "stages": [{"type": "txt2img"}, {"type": "img2img"}]})

# Child processes: each prints "ready" once set up, then waits for a line on stdin.
PRELUDE = """
import sys
from sdjobs.sqlite_store import SQLiteStore
from sdjobs.status import JobState, StageResult
"""


def child(code: str, *args: object) -> subprocess.Popen[str]:
    """A Python process running `code` after `PRELUDE`, started and already "ready"."""
    process = subprocess.Popen(
        [sys.executable, "-c", PRELUDE + textwrap.dedent(code), *map(str, args)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    line = process.stdout.readline()
    if line != "ready\n":
        process.kill()
        process.wait(timeout=30)
        pytest.fail(f"the child process did not get ready: {line!r}")
    return process


@pytest.fixture
def path(tmp_path) -> Path:
    return tmp_path / "data" / "queue.db"


# --------------------------------------------------------------------------
# Where the queue lives
# --------------------------------------------------------------------------


def test_the_queue_is_the_option_else_the_environment_else_the_data_folder(tmp_path):
    assert queue_path(tmp_path / "a.db", {QUEUE_ENV: "/env.db"}) == tmp_path / "a.db"
    assert queue_path(None, {QUEUE_ENV: str(tmp_path / "env.db")}) == tmp_path / "env.db"
    assert queue_path(None, {QUEUE_ENV: ""}) == default_path() == platformdirs.user_data_path("sdjobs", appauthor=False) / "queue.db"


def test_a_queues_folders_are_made_however_deep(tmp_path):
    path = tmp_path / "a" / "b" / "queue.db"
    SQLiteStore(path).close()
    assert path.is_file()


def test_a_queue_whose_folder_cannot_be_made_is_refused(tmp_path):
    (tmp_path / "notes").write_text("a file, not a folder")
    path = tmp_path / "notes" / "sdjobs" / "queue.db"
    with pytest.raises(StoreUnreadable) as error:
        SQLiteStore(path)
    assert str(error.value) == f"{path}: cannot make its folder (Not a directory)"


def test_a_new_queue_is_made_with_its_folder_marked_and_versioned(path):
    SQLiteStore(path).close()
    with sqlite3.connect(path) as connection:
        assert connection.execute("PRAGMA application_id").fetchone() == (APPLICATION_ID,)
        assert connection.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
        assert connection.execute("PRAGMA journal_mode").fetchone() == ("wal",)


def test_jobs_and_stages_outlive_the_store_that_wrote_them(path):
    with SQLiteStore(path) as store:
        worker = store.register_worker()
        [queued] = store.add([SPEC])
        job = store.claim(worker.id)
        first = StageResult("txt2img", 0, (path.parent / "01-txt2img" / "001.png",), ({"seed": 7},), (7,), 1.0, 2.0)
        store.record_stage(job.id, worker.id, first)
    with SQLiteStore(path) as store:
        job = store.get(queued.id)
        assert (job.spec, job.stages, job.state) == (SPEC, (first,), JobState.RUNNING)


# --------------------------------------------------------------------------
# The schema: forward only
# --------------------------------------------------------------------------


def test_an_older_schema_is_migrated_forward_keeping_its_jobs_and_a_newer_one_is_refused(path):
    with SQLiteStore(path) as store:
        [job] = store.add([SPEC])
    step = ("ALTER TABLE jobs ADD COLUMN note TEXT", "UPDATE jobs SET note = 'migrated'")
    with sqlite3.connect(path, isolation_level=None) as connection:
        assert migrate(connection, str(path), (*MIGRATIONS, step)) == SCHEMA_VERSION
        assert connection.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION + 1,)
        assert connection.execute("SELECT id, note FROM jobs").fetchall() == [(job.id, "migrated")]
        assert migrate(connection, str(path), (*MIGRATIONS, step)) == SCHEMA_VERSION + 1  # nothing left to do
    before = path.read_bytes()
    with pytest.raises(StoreTooNew) as refused:
        SQLiteStore(path)
    message = str(refused.value)
    assert message.startswith(f"{path}: made by a newer sdjobs") and f"schema {SCHEMA_VERSION + 1}" in message
    assert "\n" not in message
    assert path.read_bytes() == before


def test_a_failing_migration_leaves_the_file_as_it_was(path):
    SQLiteStore(path).close()
    steps = (*MIGRATIONS, ("CREATE TABLE notes (x)",), ("SELECT no_such_function()",))
    with sqlite3.connect(path, isolation_level=None) as connection:
        with pytest.raises(sqlite3.OperationalError, match="no_such_function"):
            migrate(connection, str(path), steps)
        assert connection.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
        assert connection.execute("SELECT name FROM sqlite_master WHERE name = 'notes'").fetchall() == []


# --------------------------------------------------------------------------
# Files that are refused, untouched
# --------------------------------------------------------------------------


def refused(path: Path) -> str:
    """The one-line message opening `path` fails with; the file must be byte for byte as it was."""
    before = path.read_bytes()
    with pytest.raises(StoreUnreadable) as error:
        SQLiteStore(path)
    assert path.read_bytes() == before
    message = str(error.value)
    assert message.startswith(f"{path}: ") and "\n" not in message
    return message


def test_a_file_that_is_not_a_database_is_refused_untouched(path):
    path.parent.mkdir(parents=True)
    path.write_text("name = 'cat'\n" * 200)
    assert "not a readable sdjobs queue" in refused(path)


@pytest.mark.parametrize(
    "statement",
    ["CREATE TABLE photos (name TEXT)", "PRAGMA application_id = 1"],
    ids=["another program's tables", "another program's mark"],
)
def test_another_programs_database_is_refused_untouched(path, statement):
    path.parent.mkdir(parents=True)
    with sqlite3.connect(path) as connection:
        connection.execute(statement)
    connection.close()
    assert "not an sdjobs queue" in refused(path)


def test_an_empty_file_becomes_a_queue(path):
    path.parent.mkdir(parents=True)
    path.touch()
    with SQLiteStore(path) as store:
        assert store.list() == []


def test_a_damaged_queue_is_refused_untouched_quoting_sqlites_report(path):
    with SQLiteStore(path) as store:
        store.add([SPEC] * 50)
    data = bytearray(path.read_bytes())
    page = 4096
    assert len(data) > 3 * page
    data[2 * page + 8 : 3 * page] = b"\xa5" * (page - 8)  # a table page's cells turned to noise
    path.write_bytes(bytes(data))
    with sqlite3.connect(path) as connection:  # SQLite's report: a heading, then the problem
        [(report,)] = connection.execute("PRAGMA quick_check(1)").fetchall()
    connection.close()
    heading, problem = report.splitlines()
    assert heading == "*** in database main ***"
    assert refused(path) == f"{path}: the queue is damaged ({problem}); it is left as it is"


def test_a_queue_whose_rows_break_its_schema_is_refused_untouched(path):
    """A row another tool wrote without the schema's constraints: SQLite's report is the problem alone."""
    with SQLiteStore(path) as store:
        store.add([SPEC])
    for step in (
        "UPDATE sqlite_master SET sql = replace(sql, 'name TEXT NOT NULL', 'name TEXT') WHERE name = 'jobs'",
        "UPDATE jobs SET name = NULL",
        "UPDATE sqlite_master SET sql = replace(sql, 'name TEXT,', 'name TEXT NOT NULL,') WHERE name = 'jobs'",
    ):
        connection = sqlite3.connect(path, isolation_level=None)  # each step on the schema as the last left it
        connection.execute("PRAGMA writable_schema = ON")
        connection.execute(step)
        connection.close()
    assert refused(path) == f"{path}: the queue is damaged (NULL value in jobs.name); it is left as it is"


def test_a_folder_in_the_queues_place_is_refused(path):
    path.mkdir(parents=True)
    with pytest.raises(StoreUnreadable, match="is a folder"):
        SQLiteStore(path)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="needs POSIX permissions that bind (not root)")
def test_a_queue_that_cannot_be_read_is_refused(path):
    SQLiteStore(path).close()
    path.chmod(0)
    try:
        with pytest.raises(StoreUnreadable, match="permission denied"):
            SQLiteStore(path)
    finally:
        path.chmod(0o600)


#: The tests run as root here, whom no file permission binds: a real refusal needs another user.
needs_root = pytest.mark.skipif(os.name != "posix" or os.geteuid() != 0, reason="drops to another user: needs root")


@pytest.fixture
def shared_folder() -> Iterator[Path]:
    """A folder every user may use (pytest's own are root's alone)."""
    folder = Path(tempfile.mkdtemp(prefix="sdjobs-test-"))
    folder.chmod(0o777)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@needs_root
def test_a_queue_another_user_may_read_but_not_write_is_refused(shared_folder):
    path = shared_folder / "queue.db"
    SQLiteStore(path).close()
    path.chmod(0o644)
    refused = f"StoreUnreadable: {path}: cannot read and write the queue (permission denied)"
    assert in_fork(lambda: SQLiteStore(path), user=NOBODY) == (refused, 0)


@needs_root
def test_a_worker_of_another_user_on_this_machine_is_not_counted_gone(shared_folder):
    """Its pid cannot be signalled by this user (PermissionError): the process is there all the same."""
    path = shared_folder / "queue.db"
    with SQLiteStore(path, lease=3600) as store:
        worker = store.register_worker()  # root's: this very process
        assert store.recover() == [] and store.workers() == [worker]
    path.chmod(0o666)

    def recover_as_another_user() -> list[str]:
        with SQLiteStore(path, lease=3600) as theirs:
            theirs.recover()
            return [registered.id for registered in theirs.workers()]

    assert in_fork(recover_as_another_user, user=NOBODY) == (str([worker.id]), 0)


# --------------------------------------------------------------------------
# Other processes
# --------------------------------------------------------------------------


HOLD_THE_LOCK = """
import sqlite3
store = SQLiteStore(sys.argv[1])
worker = store.register_worker() if sys.argv[2] == "worker" else None
connection = sqlite3.connect(sys.argv[1], isolation_level=None)
connection.execute("BEGIN IMMEDIATE")
print("ready", flush=True)
sys.stdin.readline()
"""


def test_even_the_first_wait_for_a_lock_gives_up_after_the_stores_timeout(path):
    """Not after sqlite3's own default (5 s): a lock let go after the store's timeout is too late."""
    SQLiteStore(path).close()
    store = SQLiteStore(path, timeout=0.3)
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    ended = threading.Event()

    def add() -> None:
        try:
            store.add([SPEC])
        finally:
            ended.set()

    adding = Background(add)
    ended.wait(timeout=4)
    holder.execute("ROLLBACK")
    holder.close()
    with pytest.raises(StoreLocked):
        adding.join()
    store.close()


@pytest.mark.parametrize("holder", ["plain", "worker"])
def test_a_lock_held_by_another_process_is_waited_for_then_named(path, holder):
    SQLiteStore(path).close()
    store = SQLiteStore(path, timeout=0.3)
    process = child(HOLD_THE_LOCK, path, holder)
    try:
        started = time.monotonic()
        with pytest.raises(StoreLocked) as locked:
            store.add([SPEC])
        assert time.monotonic() - started >= 0.3
        message = str(locked.value)
        assert message.startswith(f"{path}: the queue stayed locked by another process for 0.3 s")
        if sys.platform == "linux" and holder == "plain":  # named with its command line, cut to 60 characters
            command = " ".join(process.args)
            assert message.endswith(f"(held by pid {process.pid} ({command[:57]}...))")
        if sys.platform == "linux":
            assert f"pid {process.pid} " in message
        if holder == "worker":
            [worker] = store.workers()
            assert worker.pid == process.pid and f"sdjobs worker {worker.id[:8]} (pid {process.pid} on" in message
        assert store.list() == [], "reading never waits for a writer"
    finally:
        process.stdin.close()
        process.wait(timeout=30)
    assert len(store.add([SPEC])) == 1, "the lock is free again once the holder is gone"
    store.close()


# A process using the queue, its command line then set to argv[3] (hex), as setproctitle does: with
# "open" it only has the queue open (holding the read locks every connection takes), with "write" it
# holds SQLite's write lock, with a number that byte of the file (as another program might).
HOLD_AS = """
import ctypes, fcntl, sqlite3
from pathlib import Path
if sys.argv[2] == "open":
    store = SQLiteStore(sys.argv[1])
elif sys.argv[2] == "write":
    connection = sqlite3.connect(sys.argv[1], isolation_level=None)
    connection.execute("BEGIN IMMEDIATE")
elif sys.argv[2] != "open":
    file = open(sys.argv[1], "r+b")
    fcntl.lockf(file, fcntl.LOCK_EX, 1, int(sys.argv[2]))
title = bytes.fromhex(sys.argv[3])
fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
start, end = int(fields[45]), int(fields[46])  # where this process's command line lies in its memory
ctypes.memmove(start, title.ljust(end - start, b"\\0"), end - start)
print("ready", flush=True)
sys.stdin.readline()
"""


def release(processes: list[subprocess.Popen[str]]) -> None:
    for process in processes:
        process.stdin.close()
    for process in processes:
        process.wait(timeout=30)


@pytest.mark.skipif(sys.platform != "linux", reason="the lock holders are read from Linux's /proc")
def test_a_lock_with_several_holders_names_each_of_them_and_only_them(path):
    SQLiteStore(path).close()
    store = SQLiteStore(path, timeout=0.3)
    processes = []
    try:
        processes.append(idle := child(HOLD_AS, path, "open", b"idle".hex()))
        processes.append(writer := child(HOLD_AS, path, "write", (b"holder \xff" + b"a" * 52).hex()))  # 60 bytes
        processes.append(long := child(HOLD_AS, path, "0", (b"b" * 61).hex()))
        processes.append(untitled := child(HOLD_AS, path, "1", b"".hex()))
        holders = {
            f"pid {writer.pid} (holder \ufffd{'a' * 52})",  # 60 characters: whole, a byte not UTF-8 replaced
            f"pid {long.pid} ({'b' * 57}...)",  # 61: cut to 60
            f"pid {untitled.pid}",  # no command line to show
        }
        for call in (lambda: store.add([SPEC]), lambda: SQLiteStore(path, timeout=0.3)):  # a call, and opening
            with pytest.raises(StoreLocked) as locked:
                call()
            message = str(locked.value)
            start = f"{path}: the queue stayed locked by another process for 0.3 s (held by "
            assert message.startswith(start) and message.endswith(")")
            assert set(message[len(start) : -1].split(", ")) == holders, f"pid {idle.pid} holds no lock"
    finally:
        release(processes)
    store.close()


@pytest.mark.skipif(sys.platform != "linux", reason="the lock holders are read from Linux's /proc")
def test_a_lock_on_a_queue_whose_shared_memory_file_was_removed_is_still_reported(path):
    SQLiteStore(path).close()
    store = SQLiteStore(path, timeout=0.3)
    process = child(HOLD_THE_LOCK, path, "plain")
    try:
        Path(f"{path}-shm").unlink()  # by hand, say, taken for a stale lock file
        with pytest.raises(StoreLocked) as locked:
            store.add([SPEC])
    finally:
        release([process])
    assert str(locked.value) == f"{path}: the queue stayed locked by another process for 0.3 s (the holder cannot be named here)"
    store.close()


def test_a_process_that_ended_has_no_command_line_to_show():
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait(timeout=30)
    assert _command_line(process.pid) is None


CLAIM_ALL = """
store = SQLiteStore(sys.argv[1], timeout=60)
worker = store.register_worker()
print("ready", flush=True)
sys.stdin.readline()
while (job := store.claim(worker.id)) is not None:
    store.finish(job.id, worker.id, JobState.DONE)
    print(job.id, flush=True)
"""


def test_workers_in_several_processes_never_claim_the_same_job(path):
    with SQLiteStore(path) as store:
        added = {job.id for job in store.add([SPEC] * 60)}
    processes = [child(CLAIM_ALL, path) for _ in range(3)]
    for process in processes:
        process.stdin.write("go\n")
        process.stdin.flush()
    claimed = []
    for process in processes:
        out, _ = process.communicate(timeout=120)
        assert process.returncode == 0
        claimed += out.split()
    assert sorted(claimed) == sorted(added), "every job claimed exactly once"
    with SQLiteStore(path) as store:
        assert {(job.state, job.attempts) for job in store.history()} == {(JobState.DONE, 1)}


HOLD_A_JOB = """
store = SQLiteStore(sys.argv[1])
worker = store.register_worker()
job = store.claim(worker.id, server="http://studio:7860")
store.record_stage(job.id, worker.id, StageResult("txt2img", 0, (), (), (7,), 1.0, 2.0))
print("ready", flush=True)
sys.stdin.readline()
"""


def test_a_job_held_by_a_killed_worker_is_claimed_again_at_its_unfinished_stage(path):
    store = SQLiteStore(path, lease=3600)  # the dead pid tells, not the heartbeat
    [queued] = store.add([SPEC])
    rescuer = store.register_worker()
    process = child(HOLD_A_JOB, path)
    assert store.claim(rescuer.id) is None, "a living worker keeps its job"
    process.send_signal(signal.SIGKILL)
    assert process.wait(timeout=30) == -signal.SIGKILL
    job = store.claim(rescuer.id, server="http://attic:7860")
    assert (job.id, job.attempts, job.next_stage) == (queued.id, 2, 1)
    assert (job.server, job.lost_server) == ("http://attic:7860", "http://studio:7860")
    assert [worker.id for worker in store.workers()] == [rescuer.id]
    store.close()


# -- what the store says when a call cannot be done ------------------------------------------------


def test_a_lock_held_in_this_process_names_the_workers_using_the_queue(path):
    """The lock's holder is this very process (another connection): it cannot be named as another
    process, so the message names the sdjobs workers registered instead."""
    with SQLiteStore(path, host="attic") as elsewhere:  # a worker on another machine sharing the queue
        workers = [elsewhere.register_worker()]
    with SQLiteStore(path, timeout=0.1) as store:
        workers.append(store.register_worker())
        holder = sqlite3.connect(path)
        holder.execute("BEGIN IMMEDIATE")
        try:
            with pytest.raises(StoreLocked) as locked:
                store.add([SPEC])
        finally:
            holder.rollback()
            holder.close()
    start = f"{path}: the queue stayed locked by another process for 0.1 s (the holder cannot be named here; sdjobs workers using it: "
    message = str(locked.value)
    assert message.startswith(start) and message.endswith(")")
    assert sorted(message[len(start) : -1].split(", ")) == sorted(worker.describe() for worker in workers)


def test_what_cannot_be_done_to_a_job_is_said_with_its_id(path):
    with SQLiteStore(path) as store:
        first, second, third = store.add([SPEC] * 3)
        worker = store.register_worker()
        ended = store.claim(worker.id)
        store.finish(ended.id, worker.id, JobState.DONE)
        calls = {
            "move": lambda: store.move(ended.id, before=second.id),
            "move a job next to": lambda: store.move(second.id, before=ended.id),
            "change the priority of": lambda: store.set_priority(ended.id, 3),
            "pause or resume": lambda: store.pause(ended.id),
            "cancel": lambda: store.request_cancel(ended.id, CancelMode.NOW),
        }
        for doing, call in calls.items():
            with pytest.raises(Exception) as error:
                call()
            assert str(error.value) == f"job {ended.short_id} has ended (done): cannot {doing} it"
        with pytest.raises(Exception) as error:
            store.get("0" * 31 + "x")
        assert str(error.value) == f"{path}: no job with id '{'0' * 31}x'"
        with pytest.raises(Exception) as error:
            store.finish(second.id, worker.id, JobState.DONE)
        assert str(error.value) == f"job {second.short_id} is not held by worker {worker.id[:8]} (queued)"
        held = store.claim(worker.id)
        with pytest.raises(Exception) as error:
            store.finish(held.id, "someone-else", JobState.DONE)
        assert str(error.value) == f"job {held.short_id} is not held by worker someone- (running, held by {worker.id[:8]})"


def test_a_prefix_of_several_ids_names_none(path):
    with SQLiteStore(path) as store:
        ids = sorted(job.id for job in store.add([SPEC] * 2000))  # two of them share their first 4 digits
        common = next(a[:4] for a, b in zip(ids, ids[1:]) if a[:4] == b[:4])  # prefixes of 4 or more name a job
        with pytest.raises(Exception) as error:
            store.get(common)
        assert str(error.value) == f"{path}: more than one job with id {common!r}"


def test_a_worker_is_listed_as_registered(path):
    now = [100.0]
    with SQLiteStore(path, clock=lambda: now[0]) as store:
        worker = store.register_worker()
        now[0] = 105.0
        store.heartbeat(worker.id)
        [listed] = store.workers()
    assert (listed.id, listed.host, listed.pid, listed.started_at) == (worker.id, worker.host, os.getpid(), 100.0)
    assert listed.heartbeat_at == 105.0
    with SQLiteStore(path, host="attic") as elsewhere:
        assert elsewhere.register_worker().host == "attic"


def test_a_date_in_a_spec_is_queued_as_the_text_it_is_sent_as(path):
    import datetime

    spec = JobSpec.from_mapping({"name": "cat", "seed": 1, "stages": [{"type": "txt2img", "extra": {"when": datetime.date(2026, 1, 2)}}]})
    with SQLiteStore(path) as store:
        [job] = store.add([spec])
        assert store.get(job.id).spec.stages[0].extra == {"when": "2026-01-02"}


def test_a_worker_counted_gone_is_told_so(path):
    with SQLiteStore(path) as store:
        with pytest.raises(Exception) as error:
            store.heartbeat("f00dfeed" * 4)
    assert str(error.value) == (
        f"{path}: worker f00dfeed is not registered (it was counted gone and its jobs went back to the queue)"
    )


def test_a_job_that_cannot_be_read_back_is_named(path):
    with SQLiteStore(path) as store:
        [job] = store.add([SPEC])
    with sqlite3.connect(path) as connection:
        connection.execute("UPDATE jobs SET spec = '{\"name\": 1}' WHERE id = ?", (job.id,))
    with SQLiteStore(path) as store:
        with pytest.raises(StoreUnreadable) as error:
            store.get(job.id)
    assert str(error.value).startswith(f"{path}: job {job.id} cannot be read (")


def test_pausing_or_resuming_a_running_job_does_not_call_it_back(path):
    with SQLiteStore(path) as store:
        [job] = store.add([SPEC])
        worker = store.register_worker()
        store.claim(worker.id)
        store.pause(job.id)
        store.resume(job.id)
        assert not store.get(job.id).recall
        store.pause(job.id, now=True)
        assert store.get(job.id).recall


def test_a_store_shows_its_file(path):
    with SQLiteStore(path) as store:
        assert repr(store) == f"SQLiteStore({str(path)!r})"
