"""The SQLite store: the embedded default, one file (WAL) in the user's data folder.

The file is found by `queue_path`: an explicit path (`--queue PATH`), else
`$SDJOBS_QUEUE`, else `queue.db` in the user's data folder (platformdirs).
Every call is one transaction; writes begin `IMMEDIATE`, so a claim reads and
takes its job under one lock and two processes never claim the same job.  A
lock held longer than the timeout ends in `StoreLocked` naming the process
that holds it (on Linux, read from `/proc/locks`), not in a hang.

The file says what it is: SQLite's `application_id` marks it as an sdjobs
queue and its `user_version` is the schema version.  A file of another
application, a damaged one or one a newer sdjobs wrote is refused
(`StoreUnreadable`, `StoreTooNew`) before anything is written to it.  An older
schema is migrated forward (`MIGRATIONS`) in one transaction.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import platformdirs

from sdjobs.outputs import SHORT_ID_LENGTH, random_job_id
from sdjobs.spec import JobSpec
from sdjobs.status import CancelMode, JobState, StageResult
from sdjobs.store import (
    DEFAULT_LEASE,
    FEED_BATCH,
    FEED_POLL,
    MIN_PREFIX,
    FeedEvent,
    InvalidState,
    JobRecord,
    NotHeld,
    Store,
    StoreLocked,
    StoreTooNew,
    StoreUnreadable,
    UnknownJob,
    WorkerInfo,
    stops_job,
)

#: The environment variable naming the queue file when no `--queue` is given.
QUEUE_ENV = "SDJOBS_QUEUE"

#: SQLite's `application_id` of an sdjobs queue: "sdjq".
APPLICATION_ID = 0x73646A71

#: Seconds a call waits for another process's lock before `StoreLocked`.
DEFAULT_TIMEOUT = 10.0

#: `MIGRATIONS[i]` takes the schema from version i to i + 1; each step is a list of statements.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE jobs (
            id TEXT PRIMARY KEY,
            name TEXT NOT NULL,
            spec TEXT NOT NULL,
            state TEXT NOT NULL,
            position INTEGER NOT NULL,
            priority INTEGER NOT NULL DEFAULT 0,
            paused INTEGER NOT NULL DEFAULT 0,
            owner TEXT,
            attempts INTEGER NOT NULL DEFAULT 0,
            worker TEXT,
            server TEXT,
            lost_server TEXT,
            folder TEXT,
            error TEXT,
            cancel TEXT,
            added_at REAL NOT NULL,
            started_at REAL,
            ended_at REAL
        )""",
        "CREATE INDEX jobs_in_queue ON jobs (priority DESC, position) WHERE ended_at IS NULL",
        "CREATE INDEX jobs_ended ON jobs (ended_at) WHERE ended_at IS NOT NULL",
        """CREATE TABLE stages (
            job_id TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
            stage_index INTEGER NOT NULL,
            partial INTEGER NOT NULL,
            result TEXT NOT NULL,
            PRIMARY KEY (job_id, stage_index)
        )""",
        """CREATE TABLE workers (
            id TEXT PRIMARY KEY,
            host TEXT NOT NULL,
            pid INTEGER NOT NULL,
            started_at REAL NOT NULL,
            heartbeat_at REAL NOT NULL
        )""",
        "CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    ),
    ("ALTER TABLE jobs ADD COLUMN recall INTEGER NOT NULL DEFAULT 0",),
    (
        """CREATE TABLE feed (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            job_id TEXT NOT NULL,
            worker TEXT NOT NULL,
            kind TEXT NOT NULL,
            at REAL NOT NULL,
            body TEXT NOT NULL
        )""",
        "CREATE INDEX feed_at ON feed (at)",
    ),
)

#: The schema version this sdjobs writes.
SCHEMA_VERSION = len(MIGRATIONS)

# SQLite's primary result codes, as `sqlite3.Error.sqlite_errorcode & 0xFF`.
_BUSY, _LOCKED, _CORRUPT, _NOTADB = 5, 6, 11, 26
_UNREADABLE = {3, 8, 10, 13, 14, 23}  # PERM, READONLY, IOERR, FULL, CANTOPEN, AUTH

_JOB_COLUMNS = (
    "id, spec, state, position, priority, paused, owner, attempts, worker, server, lost_server, folder, error, cancel,"
    " recall, added_at, started_at, ended_at"
)
_QUEUE_ORDER = "priority DESC, position"


def default_path() -> Path:
    """`queue.db` in the user's data folder (`~/.local/share/sdjobs` on Linux)."""
    return platformdirs.user_data_path("sdjobs", appauthor=False) / "queue.db"


def queue_path(option: str | os.PathLike[str] | None = None, environ: Mapping[str, str] = os.environ) -> Path:
    """The queue file: `option` (`--queue`), else `$SDJOBS_QUEUE`, else `default_path()`."""
    if option is not None:
        return Path(option)
    if environ.get(QUEUE_ENV):
        return Path(environ[QUEUE_ENV])
    return default_path()


def migrate(connection: sqlite3.Connection, location: str, migrations: Sequence[Sequence[str]] = MIGRATIONS) -> int:
    """Bring the schema up to version `len(migrations)`, all steps in one transaction.

    Returns the version the file had.  Raises `StoreTooNew` for a newer one;
    a failing step leaves the file as it was.
    """
    with _immediate(connection):
        (found,) = connection.execute("PRAGMA user_version").fetchone()
        if found > len(migrations):
            raise StoreTooNew(
                f"{location}: made by a newer sdjobs (queue schema {found}; this one knows up to"
                f" {len(migrations)}); upgrade sdjobs to use it"
            )
        for version in range(found, len(migrations)):
            for statement in migrations[version]:
                connection.execute(statement)
        connection.execute(f"PRAGMA application_id = {APPLICATION_ID}")
        connection.execute(f"PRAGMA user_version = {len(migrations)}")
    return found


@contextlib.contextmanager
def _immediate(connection: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """A write transaction: the write lock is taken at the start, so reads in it are not stale."""
    connection.execute("BEGIN IMMEDIATE")
    try:
        yield connection
    except BaseException:
        if connection.in_transaction:
            connection.execute("ROLLBACK")
        raise
    connection.execute("COMMIT")


def lock_holders(path: Path) -> list[int]:
    """Other processes holding a write lock on the queue file or its WAL files (Linux; else none known)."""
    files = set()
    for name in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
        with contextlib.suppress(OSError):
            info = os.stat(name)
            files.add(f"{os.major(info.st_dev):02x}:{os.minor(info.st_dev):02x}:{info.st_ino}")
    try:
        table = Path("/proc/locks").read_text()
    except OSError:
        return []
    pids: list[int] = []
    for line in table.splitlines():
        # "1: POSIX  ADVISORY  WRITE 9192 fe:00:2146913 120 120"; a waiter's line has "->" after "1:".
        fields = line.split()
        if len(fields) >= 6 and fields[1:4] == ["POSIX", "ADVISORY", "WRITE"] and fields[5] in files:
            pid = int(fields[4])
            if pid != os.getpid() and pid not in pids:
                pids.append(pid)
    return pids


def _command_line(pid: int) -> str | None:
    with contextlib.suppress(OSError):
        words = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        text = " ".join(word.decode(errors="replace") for word in words if word)
        return text if len(text) <= 60 else text[:57] + "..."
    return None


def _without_credentials(url: str | None) -> str | None:
    if url is None:
        return None
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


def _json(data: Any) -> str:
    # `default=str`: a TOML date passed through to the WebUI is kept as the text it is sent as.
    return json.dumps(data, sort_keys=True, default=str)


class SQLiteStore(Store):
    """The queue in one SQLite file; see `Store` for what each call does.

    Safe to share between threads (calls are serialised); each process opens
    its own.  Opening checks the file (`StoreUnreadable`, `StoreTooNew`) and
    migrates an older schema.

    Args:
        path: The queue file; made, with its folder, when missing.
        lease: Seconds without a heartbeat after which a worker counts as gone.
        timeout: Seconds a call waits for another process's lock.
        clock: Unix time (shared by every process using the file).
        host: This machine's name, to tell whether a worker's pid can be checked here.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        lease: float = DEFAULT_LEASE,
        timeout: float = DEFAULT_TIMEOUT,
        clock: Callable[[], float] = time.time,
        host: str | None = None,
    ) -> None:
        self.path = Path(path)
        self.lease = lease
        self.timeout = timeout
        self.host = socket.gethostname() if host is None else host
        self._clock = clock
        self._lock = threading.RLock()
        self._connection = self._open()

    def __repr__(self) -> str:
        return f"SQLiteStore({str(self.path)!r})"

    @property
    def location(self) -> str:
        return str(self.path)

    def __enter__(self) -> SQLiteStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            self._connection.close()

    # -- opening ------------------------------------------------------------

    def _open(self) -> sqlite3.Connection:
        if self.path.is_dir():
            raise StoreUnreadable(f"{self.location}: is a folder, not a queue file")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise StoreUnreadable(f"{self.location}: cannot make its folder ({error.strerror or error})") from None
        if self.path.exists() and not os.access(self.path, os.R_OK | os.W_OK):
            raise StoreUnreadable(f"{self.location}: cannot read and write the queue (permission denied)")
        connection = sqlite3.connect(
            self.path, timeout=self.timeout, isolation_level=None, check_same_thread=False
        )
        connection.row_factory = sqlite3.Row
        try:
            with self._errors(connection):
                self._check(connection)
                connection.execute("PRAGMA journal_mode = WAL")
                connection.execute("PRAGMA synchronous = FULL")
                connection.execute("PRAGMA foreign_keys = ON")
                migrate(connection, self.location)
        except BaseException:
            connection.close()
            raise
        return connection

    def _check(self, connection: sqlite3.Connection) -> None:
        """Refuse a file that is not an sdjobs queue, or is damaged, before anything is written to it."""
        (application,) = connection.execute("PRAGMA application_id").fetchone()
        (tables,) = connection.execute("SELECT count(*) FROM sqlite_master").fetchone()
        if application != APPLICATION_ID and (application != 0 or tables):  # unmarked and empty: a new queue
            raise StoreUnreadable(f"{self.location}: an SQLite file of another program, not an sdjobs queue")
        [(problem,)] = connection.execute("PRAGMA quick_check(1)").fetchall()
        if problem != "ok":
            first = problem.splitlines()[-1]  # past the "*** in database main ***" heading
            raise StoreUnreadable(f"{self.location}: the queue is damaged ({first}); it is left as it is")

    # -- transactions and errors -----------------------------------------------

    @contextlib.contextmanager
    def _errors(self, connection: sqlite3.Connection) -> Iterator[None]:
        """SQLite's errors as `StoreError`s that say what is wrong with the file, or who holds it."""
        try:
            yield
        except sqlite3.Error as error:
            code = (getattr(error, "sqlite_errorcode", None) or 0) & 0xFF
            if code in (_BUSY, _LOCKED):
                raise StoreLocked(self._locked_message(connection)) from None
            if code in (_CORRUPT, _NOTADB):
                raise StoreUnreadable(f"{self.location}: not a readable sdjobs queue ({error}); it is left as it is") from None
            if code in _UNREADABLE:
                raise StoreUnreadable(f"{self.location}: cannot use the queue file ({error})") from None
            raise

    def _locked_message(self, connection: sqlite3.Connection) -> str:
        workers = {(worker.host, worker.pid): worker for worker in self._workers_now(connection)}
        holders = []
        for pid in lock_holders(self.path):
            worker = workers.get((self.host, pid))
            command = _command_line(pid)
            holders.append(worker.describe() if worker else f"pid {pid}" + (f" ({command})" if command else ""))
        if holders:
            who = "held by " + ", ".join(holders)
        else:
            who = "the holder cannot be named here"
            if workers:
                who += "; sdjobs workers using it: " + ", ".join(worker.describe() for worker in workers.values())
        return f"{self.location}: the queue stayed locked by another process for {self.timeout:g} s ({who})"

    def _workers_now(self, connection: sqlite3.Connection) -> list[WorkerInfo]:
        """The registered workers, if they can be read without waiting (for a message); else none."""
        connection.execute("PRAGMA busy_timeout = 0")
        try:
            return [_worker(row) for row in connection.execute("SELECT * FROM workers")]
        except sqlite3.Error:
            return []
        finally:
            connection.execute(f"PRAGMA busy_timeout = {int(self.timeout * 1000)}")

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        with self._lock, self._errors(self._connection), _immediate(self._connection) as connection:
            yield connection

    @contextlib.contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """A read transaction: one consistent snapshot, and no write lock taken."""
        with self._lock, self._errors(self._connection):
            connection = self._connection
            connection.execute("BEGIN")
            try:
                yield connection
            finally:
                if connection.in_transaction:
                    connection.execute("COMMIT")

    # -- reading jobs -----------------------------------------------------------

    def _row(self, connection: sqlite3.Connection, job_id: str) -> sqlite3.Row:
        """The job with this id, or the one job whose id starts with it."""
        row = connection.execute(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is not None:
            return row
        rows = []
        if len(job_id) >= MIN_PREFIX:
            rows = connection.execute(
                f"SELECT {_JOB_COLUMNS} FROM jobs WHERE substr(id, 1, ?) = ? LIMIT 2", (len(job_id), job_id)
            ).fetchall()
        if len(rows) != 1:
            which = "no job" if not rows else "more than one job"
            raise UnknownJob(f"{self.location}: {which} with id {job_id!r}")
        return rows[0]

    def _record(self, connection: sqlite3.Connection, row: sqlite3.Row) -> JobRecord:
        try:
            results = connection.execute(
                "SELECT result FROM stages WHERE job_id = ? ORDER BY stage_index", (row["id"],)
            ).fetchall()
            return JobRecord(
                id=row["id"],
                spec=JobSpec.from_dict(json.loads(row["spec"])),
                state=JobState(row["state"]),
                position=row["position"],
                priority=row["priority"],
                paused=bool(row["paused"]),
                owner=row["owner"],
                attempts=row["attempts"],
                worker=row["worker"],
                server=row["server"],
                lost_server=row["lost_server"],
                folder=None if row["folder"] is None else Path(row["folder"]),
                stages=tuple(StageResult.from_dict(json.loads(result)) for (result,) in results),
                error=row["error"],
                cancel=None if row["cancel"] is None else CancelMode(row["cancel"]),
                recall=bool(row["recall"]),
                added_at=row["added_at"],
                started_at=row["started_at"],
                ended_at=row["ended_at"],
            )
        except (ValueError, TypeError, KeyError) as error:
            raise StoreUnreadable(f"{self.location}: job {row['id']} cannot be read ({error})") from None

    def _job(self, connection: sqlite3.Connection, job_id: str) -> JobRecord:
        return self._record(connection, self._row(connection, job_id))

    def _open_job(self, connection: sqlite3.Connection, job_id: str, doing: str) -> JobRecord:
        """A job that has not ended; `InvalidState` naming what could not be done otherwise."""
        job = self._job(connection, job_id)
        if job.ended:
            raise InvalidState(f"job {job.short_id} has ended ({job.state}): cannot {doing} it")
        return job

    def _held(self, connection: sqlite3.Connection, job_id: str, worker_id: str) -> JobRecord:
        job = self._job(connection, job_id)
        if job.state is not JobState.RUNNING or job.worker != worker_id:
            raise NotHeld(
                f"job {job.short_id} is not held by worker {worker_id[:SHORT_ID_LENGTH]} ({job.state}"
                + (f", held by {job.worker[:SHORT_ID_LENGTH]})" if job.worker else ")")
            )
        return job

    # -- the queue --------------------------------------------------------------

    def add(
        self, specs: Iterable[JobSpec], *, priority: int = 0, paused: bool = False, owner: str | None = None
    ) -> list[JobRecord]:
        rows = [(random_job_id(), spec.name, _json(spec.to_dict())) for spec in specs]
        now = self._clock()
        with self._write() as connection:
            (last,) = connection.execute("SELECT coalesce(max(position), 0) FROM jobs").fetchone()
            connection.executemany(
                "INSERT INTO jobs (id, name, spec, state, position, priority, paused, owner, added_at)"
                " VALUES (?, ?, ?, 'queued', ?, ?, ?, ?, ?)",
                [(*row, last + number, priority, paused, owner, now) for number, row in enumerate(rows, 1)],
            )
            return [self._job(connection, job_id) for job_id, _, _ in rows]

    def get(self, job_id: str) -> JobRecord:
        with self._read() as connection:
            return self._job(connection, job_id)

    def list(self) -> list[JobRecord]:
        with self._read() as connection:
            rows = connection.execute(
                f"SELECT {_JOB_COLUMNS} FROM jobs WHERE ended_at IS NULL ORDER BY {_QUEUE_ORDER}"
            ).fetchall()
            return [self._record(connection, row) for row in rows]

    def history(
        self,
        *,
        name: str | None = None,
        outcome: JobState | None = None,
        since: float | None = None,
        until: float | None = None,
        limit: int | None = None,
        server: str | None = None,
    ) -> list[JobRecord]:
        with self._read() as connection:
            rows = connection.execute(
                f"SELECT {_JOB_COLUMNS} FROM jobs WHERE ended_at IS NOT NULL"
                " AND (:name IS NULL OR name = :name) AND (:outcome IS NULL OR state = :outcome)"
                " AND (:since IS NULL OR ended_at >= :since) AND (:until IS NULL OR ended_at < :until)"
                " AND (:server IS NULL OR server = :server)"
                " ORDER BY ended_at DESC, position DESC LIMIT :limit",
                {
                    "name": name,
                    "outcome": None if outcome is None else str(outcome),
                    "since": since,
                    "until": until,
                    "server": server,
                    "limit": -1 if limit is None else limit,
                },
            ).fetchall()
            return [self._record(connection, row) for row in rows]

    def move(self, job_id: str, *, before: str | None = None, after: str | None = None) -> JobRecord:
        if (before is None) == (after is None):
            raise ValueError("move a job either before or after another one")
        with self._write() as connection:
            job = self._open_job(connection, job_id, "move")
            anchor = self._open_job(connection, before if after is None else after, "move a job next to")
            if anchor.id == job.id:
                return job
            order = [
                row[0]
                for row in connection.execute(f"SELECT id FROM jobs WHERE ended_at IS NULL ORDER BY {_QUEUE_ORDER}")
                if row[0] != job.id
            ]
            order.insert(order.index(anchor.id) + (after is not None), job.id)
            connection.executemany(
                "UPDATE jobs SET position = ? WHERE id = ?", [(number, job_id) for number, job_id in enumerate(order, 1)]
            )
            connection.execute("UPDATE jobs SET priority = ? WHERE id = ?", (anchor.priority, job.id))
            return self._job(connection, job.id)

    def set_priority(self, job_id: str, priority: int) -> JobRecord:
        with self._write() as connection:
            job = self._open_job(connection, job_id, "change the priority of")
            connection.execute("UPDATE jobs SET priority = ? WHERE id = ?", (priority, job.id))
            return self._job(connection, job.id)

    def pause(self, job_id: str | None = None, *, now: bool = False) -> None:
        self._set_paused(job_id, True, recall=now)

    def resume(self, job_id: str | None = None) -> None:
        self._set_paused(job_id, False)

    def _set_paused(self, job_id: str | None, paused: bool, *, recall: bool = False) -> None:
        with self._write() as connection:
            if job_id is None:
                connection.execute(
                    "INSERT OR REPLACE INTO settings (key, value) VALUES ('queue_paused', ?)", (json.dumps(paused),)
                )
                recalled, ids = "owner IS NULL", ()
            else:
                job = self._open_job(connection, job_id, "pause or resume")
                connection.execute("UPDATE jobs SET paused = ? WHERE id = ?", (paused, job.id))
                recalled, ids = "id = ?", (job.id,)
            if recall:
                connection.execute(f"UPDATE jobs SET recall = 1 WHERE state = 'running' AND {recalled}", ids)

    def queue_paused(self) -> bool:
        with self._read() as connection:
            return self._queue_paused(connection)

    @staticmethod
    def _queue_paused(connection: sqlite3.Connection) -> bool:
        row = connection.execute("SELECT value FROM settings WHERE key = 'queue_paused'").fetchone()
        return row is not None and json.loads(row[0])

    def request_cancel(self, job_id: str, mode: CancelMode = CancelMode.NOW) -> JobRecord:
        mode = CancelMode(mode)
        with self._write() as connection:
            job = self._open_job(connection, job_id, "cancel")
            if job.state is JobState.QUEUED:
                self._end(connection, job.id, JobState.CANCELLED, None, cancel=mode)
            elif job.cancel is None or mode.urgency > job.cancel.urgency:
                connection.execute("UPDATE jobs SET cancel = ? WHERE id = ?", (str(mode), job.id))
            return self._job(connection, job.id)

    def cancel_requested(self, job_id: str) -> CancelMode | None:
        with self._read() as connection:
            return self._job(connection, job_id).cancel

    def remove(self, job_id: str) -> None:
        with self._write() as connection:
            job = self._job(connection, job_id)
            if job.state is JobState.RUNNING:
                raise InvalidState(f"job {job.short_id} is running: cancel it before removing it")
            connection.execute("DELETE FROM jobs WHERE id = ?", (job.id,))

    def retry(self, job_id: str) -> JobRecord:
        with self._write() as connection:
            job = self._job(connection, job_id)
            if job.state not in (JobState.FAILED, JobState.CANCELLED):
                raise InvalidState(f"job {job.short_id} is {job.state}: only a failed or cancelled job is retried")
            connection.execute(
                "UPDATE jobs SET state = 'queued', error = NULL, cancel = NULL, ended_at = NULL,"
                " position = (SELECT max(position) FROM jobs) + 1 WHERE id = ?",
                (job.id,),
            )
            return self._job(connection, job.id)

    # -- workers ------------------------------------------------------------------

    def register_worker(self) -> WorkerInfo:
        now = self._clock()
        worker = WorkerInfo(uuid.uuid4().hex, self.host, os.getpid(), now, now)
        with self._write() as connection:
            connection.execute(
                "INSERT INTO workers (id, host, pid, started_at, heartbeat_at) VALUES (?, ?, ?, ?, ?)",
                (worker.id, worker.host, worker.pid, worker.started_at, worker.heartbeat_at),
            )
        return worker

    def heartbeat(self, worker_id: str) -> None:
        with self._write() as connection:
            changed = connection.execute(
                "UPDATE workers SET heartbeat_at = ? WHERE id = ?", (self._clock(), worker_id)
            ).rowcount
            if not changed:
                raise NotHeld(self._gone_message(worker_id))

    def _gone_message(self, worker_id: str) -> str:
        return (
            f"{self.location}: worker {worker_id[:SHORT_ID_LENGTH]} is not registered"
            " (it was counted gone and its jobs went back to the queue)"
        )

    def unregister_worker(self, worker_id: str) -> None:
        with self._write() as connection:
            connection.execute("DELETE FROM workers WHERE id = ?", (worker_id,))
            self._take_back_orphans(connection)

    def workers(self) -> list[WorkerInfo]:
        with self._read() as connection:
            return [_worker(row) for row in connection.execute("SELECT * FROM workers ORDER BY started_at")]

    def recover(self) -> list[JobRecord]:
        with self._write() as connection:
            return self._recover(connection)

    def _recover(self, connection: sqlite3.Connection) -> list[JobRecord]:
        now = self._clock()
        for row in connection.execute("SELECT * FROM workers").fetchall():
            if _worker(row).gone(now=now, lease=self.lease, host=self.host):
                connection.execute("DELETE FROM workers WHERE id = ?", (row["id"],))
        return self._take_back_orphans(connection)

    def _take_back_orphans(self, connection: sqlite3.Connection) -> list[JobRecord]:
        """Running jobs whose worker is no longer registered: back to the queue (or cancelled)."""
        orphans = [
            row[0]
            for row in connection.execute(
                "SELECT id FROM jobs WHERE state = 'running' AND (worker IS NULL OR worker NOT IN (SELECT id FROM workers))"
            )
        ]
        return [self._take_back(connection, job_id, lost=True) for job_id in orphans]

    def _take_back(self, connection: sqlite3.Connection, job_id: str, *, lost: bool) -> JobRecord:
        """A running job back to the queue (or cancelled); `lost`: its worker died, mid-request maybe."""
        job = self._job(connection, job_id)
        if stops_job(job.cancel):
            self._end(connection, job.id, JobState.CANCELLED, None)
        else:
            connection.execute(
                "UPDATE jobs SET state = 'queued', worker = NULL, recall = 0, lost_server = ? WHERE id = ?",
                (job.server if lost else None, job.id),
            )
        return self._job(connection, job.id)

    def _end(
        self, connection: sqlite3.Connection, job_id: str, outcome: JobState, error: str | None, cancel: CancelMode | None = None
    ) -> None:
        connection.execute(
            "UPDATE jobs SET state = ?, error = ?, ended_at = ?, worker = NULL, lost_server = NULL, recall = 0,"
            " cancel = coalesce(?, cancel) WHERE id = ?",
            (str(outcome), error, self._clock(), None if cancel is None else str(cancel), job_id),
        )

    # -- a worker's job -----------------------------------------------------------

    def claim(self, worker_id: str, *, server: str | None = None, ids: Sequence[str] | None = None) -> JobRecord | None:
        with self._write() as connection:
            self._recover(connection)
            if connection.execute("SELECT 1 FROM workers WHERE id = ?", (worker_id,)).fetchone() is None:
                raise NotHeld(self._gone_message(worker_id))
            if ids is not None:
                row = connection.execute(
                    "SELECT id FROM jobs WHERE state = 'queued' AND NOT paused"
                    f" AND id IN (SELECT value FROM json_each(?)) ORDER BY {_QUEUE_ORDER} LIMIT 1",
                    (json.dumps(list(ids)),),
                ).fetchone()
            elif self._queue_paused(connection):
                row = None
            else:
                row = connection.execute(
                    "SELECT id FROM jobs WHERE state = 'queued' AND NOT paused"
                    " AND (owner IS NULL OR owner = ? OR owner NOT IN (SELECT id FROM workers))"
                    f" ORDER BY {_QUEUE_ORDER} LIMIT 1",
                    (worker_id,),
                ).fetchone()
            if row is None:
                return None
            connection.execute(
                "UPDATE jobs SET state = 'running', worker = ?, server = ?, attempts = attempts + 1,"
                " started_at = coalesce(started_at, ?) WHERE id = ?",
                (worker_id, _without_credentials(server), self._clock(), row[0]),
            )
            return self._job(connection, row[0])

    def set_folder(self, job_id: str, worker_id: str, folder: Path) -> JobRecord:
        with self._write() as connection:
            job = self._held(connection, job_id, worker_id)
            if job.folder is not None and job.folder != Path(folder):
                raise InvalidState(f"job {job.short_id} already writes into {job.folder}")
            connection.execute("UPDATE jobs SET folder = ? WHERE id = ?", (str(folder), job.id))
            return self._job(connection, job.id)

    def record_stage(self, job_id: str, worker_id: str, result: StageResult) -> JobRecord:
        with self._write() as connection:
            job = self._held(connection, job_id, worker_id)
            job.check_stage(result)
            connection.execute(
                "INSERT OR REPLACE INTO stages (job_id, stage_index, partial, result) VALUES (?, ?, ?, ?)",
                (job.id, result.stage_index, result.partial, _json(result.to_dict())),
            )
            connection.execute("UPDATE jobs SET lost_server = NULL WHERE id = ?", (job.id,))
            return self._job(connection, job.id)

    def finish(self, job_id: str, worker_id: str, outcome: JobState, error: str | None = None) -> JobRecord:
        outcome = JobState(outcome)
        if not outcome.terminal:
            raise ValueError(f"a job finishes done, failed or cancelled, not {outcome}")
        with self._write() as connection:
            job = self._held(connection, job_id, worker_id)
            self._end(connection, job.id, outcome, error)
            return self._job(connection, job.id)

    def release(self, job_id: str, worker_id: str) -> JobRecord:
        with self._write() as connection:
            job = self._held(connection, job_id, worker_id)
            return self._take_back(connection, job.id, lost=False)


    # -- the progress feed ---------------------------------------------------------

    def publish(self, worker: str, events: Sequence[tuple[str, str, Mapping[str, Any]]]) -> None:
        if not events:
            return
        now = self._clock()
        with self._write() as connection:
            connection.executemany(
                "INSERT INTO feed (job_id, worker, kind, at, body) VALUES (?, ?, ?, ?, ?)",
                [(job_id, worker, kind, now, _json(body)) for job_id, kind, body in events],
            )

    def feed(self, after: int = 0, *, limit: int = FEED_BATCH) -> list[FeedEvent]:
        with self._read() as connection:
            rows = connection.execute(
                "SELECT seq, job_id, worker, kind, body, at FROM feed WHERE seq > ? ORDER BY seq LIMIT ?", (after, limit)
            ).fetchall()
        return [FeedEvent(row["seq"], row["job_id"], row["worker"], row["kind"], json.loads(row["body"]), row["at"]) for row in rows]

    def wait_feed(self, after: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            with self._read() as connection:
                (last,) = connection.execute("SELECT coalesce(max(seq), 0) FROM feed").fetchone()
            left = deadline - time.monotonic()
            if last > after or left <= 0:
                return last > after
            time.sleep(min(FEED_POLL, left))

    def prune_feed(self, keep: float) -> int:
        with self._write() as connection:
            return connection.execute(
                "DELETE FROM feed WHERE at < ? AND (kind = 'progress' OR job_id NOT IN (SELECT id FROM jobs WHERE state = 'running'))",
                (self._clock() - keep,),
            ).rowcount


def _worker(row: sqlite3.Row) -> WorkerInfo:
    return WorkerInfo(row["id"], row["host"], row["pid"], row["started_at"], row["heartbeat_at"])

