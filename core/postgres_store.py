"""The PostgreSQL store: one queue shared by workers on many machines (the `sdjobs[postgres]` extra).

Chosen by a `postgresql://` (or `postgres://`) URL as `--queue` or
`$SDJOBS_QUEUE`.  It keeps the same rules as the SQLite store (`sdjobs.store`)
and passes the same contract tests; what differs is how:

- Every write takes one transaction-level advisory lock first, so writes are
  serialised as SQLite's `BEGIN IMMEDIATE` serialises them: a claim reads and
  takes its job under that lock and two workers never hold the same job.  A
  lock held longer than the timeout ends in `StoreLocked` naming who holds it.
  Reads run in a read-only snapshot (`REPEATABLE READ`) and take no lock.
- Times are the database server's clock by default, so hosts whose clocks
  drift still agree on heartbeats and leases.
- The schema is not made on first use: `sdjobs queue migrate` makes it (with
  Procrastinate's, `sdjobs.farm`); a database without it, or with an older
  one, is refused with that command in the message.
- A URL's user name and password never appear in `location`, a repr or a
  message (`redact`).
- Procrastinate dispatches the jobs (`sdjobs.dispatch`): every write that
  changes which jobs a worker may claim, or their order, makes Procrastinate's
  waiting jobs match in the same transaction (`_dispatch`): one `TASK` job on
  the `QUEUE` queue for each job a worker may claim, its priority its place in
  the queue.  A cancel or a recall of a running job asks Procrastinate to abort
  the job running it, which reaches its worker over LISTEN/NOTIFY.

Without the extra installed, opening one is one line naming it (`needs_extra`).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlsplit

from sdjobs.outputs import SHORT_ID_LENGTH, random_job_id
from sdjobs.spec import JobSpec
from sdjobs.sql_store import _json
from sdjobs.status import CancelMode, JobState, StageResult
from sdjobs.store import (
    FEED_BATCH,
    MIN_PREFIX,
    FeedEvent,
    InvalidState,
    JobRecord,
    NotHeld,
    Store,
    StoreError,
    StoreLocked,
    StoreTooNew,
    StoreUnreadable,
    UnknownJob,
    WorkerInfo,
    stops_job,
)

if TYPE_CHECKING:
    import psycopg

#: The URL schemes that name a PostgreSQL queue.
SCHEMES = ("postgresql", "postgres")

#: What to install for a PostgreSQL queue.
EXTRA = "sdjobs[postgres]"

#: Seconds without a heartbeat after which a worker counts as gone: shorter than a queue file's,
#: as on a farm most workers run on other hosts, whose pids cannot be checked from here.
DEFAULT_LEASE = 30.0

#: Seconds a call waits for another process's lock (or for the server to answer a connect).
DEFAULT_TIMEOUT = 10.0

#: The advisory lock every write takes: "sdjq" as a number.
WRITE_LOCK = 0x73646A71

#: The advisory lock `publish` takes (not the write lock: the queue never waits for the feed).
#: Held to the commit, so events become visible in the order of their numbers.
FEED_LOCK = WRITE_LOCK + 1

#: The channel `publish` notifies and `wait_feed` listens on.
FEED_CHANNEL = "sdjobs_feed"

#: The Procrastinate task that runs one sdjobs job (its argument ``job_id``), and its queue.
TASK = "sdjobs.run_job"
QUEUE = "sdjobs"

#: Makes Procrastinate's waiting `TASK` jobs match the jobs a worker may claim (as `claim` without ids
#: takes them): one each, none for any other, each one's priority minus its place in the queue, as
#: Procrastinate fetches the highest priority first.  One statement: its parts see the same snapshot.
_DISPATCH = """
WITH wanted AS MATERIALIZED (
    SELECT id, -row_number() OVER (ORDER BY priority DESC, position)::int AS priority FROM sdjobs_jobs
    WHERE state = 'queued' AND NOT paused AND (owner IS NULL OR owner NOT IN (SELECT id FROM sdjobs_workers))
    AND NOT EXISTS (SELECT 1 FROM sdjobs_settings WHERE key = 'queue_paused' AND value = 'true')
), waiting AS MATERIALIZED (
    SELECT id, priority, args->>'job_id' AS job_id FROM procrastinate_jobs WHERE status = 'todo' AND task_name = %(task)s
), dropped AS (
    DELETE FROM procrastinate_jobs WHERE id IN (
        SELECT waiting.id FROM waiting LEFT JOIN wanted ON wanted.id = waiting.job_id WHERE wanted.id IS NULL)
), reordered AS (
    UPDATE procrastinate_jobs SET priority = wanted.priority FROM waiting JOIN wanted ON wanted.id = waiting.job_id
    WHERE procrastinate_jobs.id = waiting.id AND waiting.priority <> wanted.priority
)
INSERT INTO procrastinate_jobs (queue_name, task_name, priority, args)
SELECT %(queue)s, %(task)s, wanted.priority, jsonb_build_object('job_id', wanted.id)
FROM wanted LEFT JOIN waiting ON waiting.job_id = wanted.id WHERE waiting.id IS NULL ORDER BY wanted.priority DESC
"""

#: Finds a `TASK` job by the sdjobs job it runs (made by `migrate`).
_DISPATCH_INDEX = (
    "CREATE INDEX IF NOT EXISTS sdjobs_procrastinate_job_id ON procrastinate_jobs ((args->>'job_id'))"
    f" WHERE task_name = '{TASK}'"
)

#: `MIGRATIONS[i]` takes the schema from version i to i + 1.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE sdjobs_jobs (
            id TEXT PRIMARY KEY,
            name TEXT NOT NULL,
            spec TEXT NOT NULL,
            state TEXT NOT NULL,
            position BIGINT NOT NULL,
            priority INTEGER NOT NULL DEFAULT 0,
            paused BOOLEAN NOT NULL DEFAULT FALSE,
            owner TEXT,
            attempts INTEGER NOT NULL DEFAULT 0,
            worker TEXT,
            server TEXT,
            lost_server TEXT,
            folder TEXT,
            error TEXT,
            cancel TEXT,
            recall BOOLEAN NOT NULL DEFAULT FALSE,
            added_at DOUBLE PRECISION NOT NULL,
            started_at DOUBLE PRECISION,
            ended_at DOUBLE PRECISION
        )""",
        "CREATE INDEX sdjobs_jobs_in_queue ON sdjobs_jobs (priority DESC, position) WHERE ended_at IS NULL",
        "CREATE INDEX sdjobs_jobs_ended ON sdjobs_jobs (ended_at) WHERE ended_at IS NOT NULL",
        """CREATE TABLE sdjobs_stages (
            job_id TEXT NOT NULL REFERENCES sdjobs_jobs (id) ON DELETE CASCADE,
            stage_index INTEGER NOT NULL,
            partial BOOLEAN NOT NULL,
            result TEXT NOT NULL,
            PRIMARY KEY (job_id, stage_index)
        )""",
        """CREATE TABLE sdjobs_workers (
            id TEXT PRIMARY KEY,
            host TEXT NOT NULL,
            pid INTEGER NOT NULL,
            started_at DOUBLE PRECISION NOT NULL,
            heartbeat_at DOUBLE PRECISION NOT NULL
        )""",
        "CREATE TABLE sdjobs_settings (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    ),
    (
        """CREATE TABLE sdjobs_feed (
            seq BIGSERIAL PRIMARY KEY,
            job_id TEXT NOT NULL,
            worker TEXT NOT NULL,
            kind TEXT NOT NULL,
            at DOUBLE PRECISION NOT NULL,
            body TEXT NOT NULL
        )""",
        "CREATE INDEX sdjobs_feed_at ON sdjobs_feed (at)",
    ),
)

#: The schema version this sdjobs writes.
SCHEMA_VERSION = len(MIGRATIONS)

_JOB_COLUMNS = (
    "id, spec, state, position, priority, paused, owner, attempts, worker, server, lost_server, folder, error, cancel,"
    " recall, added_at, started_at, ended_at"
)
_QUEUE_ORDER = "priority DESC, position"
_SERVER_NOW = "SELECT extract(epoch FROM clock_timestamp())::float8 AS now"


def is_postgres_url(text: str | os.PathLike[str] | None) -> bool:
    """Whether `--queue` / `$SDJOBS_QUEUE` names a PostgreSQL queue rather than a file."""
    return isinstance(text, str) and urlsplit(text).scheme in SCHEMES


def redact(url: str) -> str:
    """The URL without user, password or a ``password=`` parameter: fit for a message or a log."""
    parts = urlsplit(url)
    query = "&".join(pair for pair in parts.query.split("&") if pair and not pair.startswith("password="))
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}{parts.path}" + (f"?{query}" if query else "")


def _secrets(url: str) -> list[str]:
    """The user name and password in a URL, to scrub from a driver's message."""
    parts = urlsplit(url)
    found = [value for value in (parts.password,) if value]
    found += [value for key, value in parse_qsl(parts.query) if key == "password" and value]
    return found


def _import_psycopg(location: str) -> Any:
    try:
        import psycopg
    except ImportError:
        raise StoreError(f"{location}: a PostgreSQL queue needs the postgres extra: pip install '{EXTRA}'") from None
    return psycopg


class PostgresStore(Store):
    """The queue in a PostgreSQL database; see `Store` for what each call does.

    Safe to share between threads (calls are serialised on one connection);
    each process opens its own.

    Args:
        url: A `postgresql://` URL (libpq's form; ``?options=-csearch_path=...`` picks a schema).
        lease: Seconds without a heartbeat after which a worker counts as gone.
        timeout: Seconds a call waits for another process's lock, and a connect for the server.
        clock: Unix time; None: the database server's clock, shared by every host.
        host: This machine's name, to tell whether a worker's pid can be checked here.
    """

    def __init__(
        self,
        url: str,
        *,
        lease: float = DEFAULT_LEASE,
        timeout: float = DEFAULT_TIMEOUT,
        clock: Callable[[], float] | None = None,
        host: str | None = None,
    ) -> None:
        self._url = url
        self.lease = lease
        self.timeout = timeout
        self.host = socket.gethostname() if host is None else host
        self._clock = clock
        self._lock = threading.RLock()
        self._psycopg = _import_psycopg(self.location)
        self._connection = self._connect()
        self._listener: psycopg.Connection[Any] | None = None  # made by the first `wait_feed`
        try:
            self._check_schema()
        except BaseException:
            self._connection.close()
            raise

    def __repr__(self) -> str:
        return f"PostgresStore({self.location!r})"

    @property
    def location(self) -> str:
        return redact(self._url)

    def conninfo(self) -> str:
        """The URL as given, credentials included: for Procrastinate's connections (`sdjobs.dispatch`), never to show."""
        return self._url

    def close(self) -> None:
        with self._lock:
            self._connection.close()
            if self._listener is not None:
                self._listener.close()

    # -- connecting and the schema ---------------------------------------------

    def _connect(self) -> psycopg.Connection[Any]:
        from psycopg.rows import dict_row

        with self._errors():
            connection = self._psycopg.connect(
                self._url,
                autocommit=True,
                row_factory=dict_row,
                connect_timeout=max(1, round(self.timeout)),
                application_name=f"sdjobs pid {os.getpid()} on {self.host}"[:63],
            )
            # A client stopped inside a transaction (a frozen host) holds the write lock: ended after the timeout.
            milliseconds = int(self.timeout * 1000)
            connection.execute(f"SET lock_timeout = {milliseconds}; SET idle_in_transaction_session_timeout = {milliseconds}")
        return connection

    def _check_schema(self) -> None:
        with self._read() as connection:
            found = _schema_version(connection)
        if found > SCHEMA_VERSION:
            raise StoreTooNew(
                f"{self.location}: made by a newer sdjobs (queue schema {found}; this one knows up to"
                f" {SCHEMA_VERSION}); upgrade sdjobs to use it"
            )
        if found < SCHEMA_VERSION:
            missing = "has no sdjobs queue yet" if found == 0 else f"has an older sdjobs queue (schema {found})"
            raise StoreUnreadable(f"{self.location}: {missing}; run: sdjobs queue migrate --queue URL")

    # -- transactions and errors -------------------------------------------------

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        """The driver's errors as `StoreError`s, without the URL's secrets."""
        psycopg = self._psycopg
        try:
            yield
        except psycopg.errors.LockNotAvailable:
            raise StoreLocked(self._locked_message()) from None
        except psycopg.OperationalError as error:
            raise StoreUnreadable(f"{self.location}: cannot use the queue ({self._scrub(error)})") from None
        except psycopg.errors.UndefinedTable as error:
            raise StoreUnreadable(
                f"{self.location}: the sdjobs tables are missing ({self._scrub(error)}); run: sdjobs queue migrate --queue URL"
            ) from None

    def _scrub(self, error: BaseException) -> str:
        text = " ".join(str(error).split())
        for secret in _secrets(self._url):
            text = text.replace(secret, "***")
        return text

    def _locked_message(self) -> str:
        """Who holds the write lock, as far as the server can tell (a fresh connection: ours is aborted)."""
        who = "the holder cannot be named here"
        with contextlib.suppress(self._psycopg.Error):
            with self._psycopg.connect(self._url, autocommit=True, connect_timeout=max(1, round(self.timeout))) as other:
                rows = other.execute(
                    "SELECT a.application_name, a.client_addr::text FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid"
                    " WHERE l.locktype = 'advisory' AND l.granted AND l.objid = %s",
                    (WRITE_LOCK,),
                ).fetchall()
                if rows:
                    who = "held by " + ", ".join(f"{name or 'a client'}" + (f" at {addr}" if addr else "") for name, addr in rows)
        return f"{self.location}: the queue stayed locked by another process for {self.timeout:g} s ({who})"

    @contextlib.contextmanager
    def _transaction(self, first: str, *params: object) -> Iterator[psycopg.Connection[Any]]:
        """A transaction starting with `first`; a connection lost before (the server restarted) is made again."""
        with self._lock, self._errors():
            if self._connection.closed:
                self._connection = self._connect()
            with self._connection.transaction():
                self._connection.execute(first, params or None)
                yield self._connection

    def _write(self) -> contextlib.AbstractContextManager[psycopg.Connection[Any]]:
        """A write transaction, holding the queue's write lock (so what it reads is not stale)."""
        return self._transaction("SELECT pg_advisory_xact_lock(%s)", WRITE_LOCK)

    def _read(self) -> contextlib.AbstractContextManager[psycopg.Connection[Any]]:
        """A read transaction: one consistent snapshot, and no lock taken."""
        return self._transaction("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")

    def _now(self, connection: psycopg.Connection[Any]) -> float:
        if self._clock is not None:
            return self._clock()
        return connection.execute(_SERVER_NOW).fetchone()["now"]

    # -- reading jobs -------------------------------------------------------------

    def _row(self, connection: psycopg.Connection[Any], job_id: str) -> dict[str, Any]:
        """The job with this id, or the one job whose id starts with it."""
        row = connection.execute(f"SELECT {_JOB_COLUMNS} FROM sdjobs_jobs WHERE id = %s", (job_id,)).fetchone()
        if row is not None:
            return row
        rows = []
        if len(job_id) >= MIN_PREFIX:
            rows = connection.execute(
                f"SELECT {_JOB_COLUMNS} FROM sdjobs_jobs WHERE starts_with(id, %s) LIMIT 2", (job_id,)
            ).fetchall()
        if len(rows) != 1:
            which = "no job" if not rows else "more than one job"
            raise UnknownJob(f"{self.location}: {which} with id {job_id!r}")
        return rows[0]

    def _records(self, connection: psycopg.Connection[Any], rows: Sequence[dict[str, Any]]) -> list[JobRecord]:
        """The jobs of these rows, their stages read in one query."""
        stages: dict[str, list[StageResult]] = {row["id"]: [] for row in rows}
        if rows:
            for stage in connection.execute(
                "SELECT job_id, result FROM sdjobs_stages WHERE job_id = ANY(%s) ORDER BY job_id, stage_index",
                (list(stages),),
            ):
                stages[stage["job_id"]].append(StageResult.from_dict(json.loads(stage["result"])))
        return [self._record(row, stages[row["id"]]) for row in rows]

    def _record(self, row: dict[str, Any], stages: list[StageResult]) -> JobRecord:
        try:
            return JobRecord(
                id=row["id"],
                spec=JobSpec.from_dict(json.loads(row["spec"])),
                state=JobState(row["state"]),
                position=row["position"],
                priority=row["priority"],
                paused=row["paused"],
                owner=row["owner"],
                attempts=row["attempts"],
                worker=row["worker"],
                server=row["server"],
                lost_server=row["lost_server"],
                folder=None if row["folder"] is None else Path(row["folder"]),
                stages=tuple(stages),
                error=row["error"],
                cancel=None if row["cancel"] is None else CancelMode(row["cancel"]),
                recall=row["recall"],
                added_at=row["added_at"],
                started_at=row["started_at"],
                ended_at=row["ended_at"],
            )
        except (ValueError, TypeError, KeyError) as error:
            raise StoreUnreadable(f"{self.location}: job {row['id']} cannot be read ({error})") from None

    def _job(self, connection: psycopg.Connection[Any], job_id: str) -> JobRecord:
        return self._records(connection, [self._row(connection, job_id)])[0]

    def _open_job(self, connection: psycopg.Connection[Any], job_id: str, doing: str) -> JobRecord:
        job = self._job(connection, job_id)
        if job.ended:
            raise InvalidState(f"job {job.short_id} has ended ({job.state}): cannot {doing} it")
        return job

    def _held(self, connection: psycopg.Connection[Any], job_id: str, worker_id: str) -> JobRecord:
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
        with self._write() as connection:
            now = self._now(connection)
            last = connection.execute("SELECT coalesce(max(position), 0) AS last FROM sdjobs_jobs").fetchone()["last"]
            with connection.cursor().copy(
                "COPY sdjobs_jobs (id, name, spec, state, position, priority, paused, owner, added_at) FROM STDIN"
            ) as copy:
                for number, row in enumerate(rows, 1):
                    copy.write_row((*row, "queued", last + number, priority, paused, owner, now))
            added = connection.execute(
                f"SELECT {_JOB_COLUMNS} FROM sdjobs_jobs WHERE position > %s ORDER BY position", (last,)
            ).fetchall()
            self._dispatch(connection)
            return self._records(connection, added)

    def get(self, job_id: str) -> JobRecord:
        with self._read() as connection:
            return self._job(connection, job_id)

    def list(self) -> list[JobRecord]:
        with self._read() as connection:
            rows = connection.execute(
                f"SELECT {_JOB_COLUMNS} FROM sdjobs_jobs WHERE ended_at IS NULL ORDER BY {_QUEUE_ORDER}"
            ).fetchall()
            return self._records(connection, rows)

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
                f"SELECT {_JOB_COLUMNS} FROM sdjobs_jobs WHERE ended_at IS NOT NULL"
                " AND (%(server)s::text IS NULL OR server = %(server)s)"
                " AND (%(name)s::text IS NULL OR name = %(name)s) AND (%(outcome)s::text IS NULL OR state = %(outcome)s)"
                " AND (%(since)s::float8 IS NULL OR ended_at >= %(since)s)"
                " AND (%(until)s::float8 IS NULL OR ended_at < %(until)s)"
                " ORDER BY ended_at DESC, position DESC LIMIT %(limit)s",
                {
                    "name": name,
                    "outcome": None if outcome is None else str(outcome),
                    "since": since,
                    "until": until,
                    "server": server,
                    "limit": limit,
                },
            ).fetchall()
            return self._records(connection, rows)

    def move(self, job_id: str, *, before: str | None = None, after: str | None = None) -> JobRecord:
        if (before is None) == (after is None):
            raise ValueError("move a job either before or after another one")
        with self._write() as connection:
            job = self._open_job(connection, job_id, "move")
            anchor = self._open_job(connection, before if after is None else after, "move a job next to")
            if anchor.id == job.id:
                return job
            order = [
                row["id"]
                for row in connection.execute(f"SELECT id FROM sdjobs_jobs WHERE ended_at IS NULL ORDER BY {_QUEUE_ORDER}")
                if row["id"] != job.id
            ]
            order.insert(order.index(anchor.id) + (after is not None), job.id)
            connection.execute(
                "UPDATE sdjobs_jobs SET position = ordered.number FROM unnest(%s::text[]) WITH ORDINALITY AS ordered (id, number)"
                " WHERE sdjobs_jobs.id = ordered.id",
                (order,),
            )
            connection.execute("UPDATE sdjobs_jobs SET priority = %s WHERE id = %s", (anchor.priority, job.id))
            self._dispatch(connection)
            return self._job(connection, job.id)

    def set_priority(self, job_id: str, priority: int) -> JobRecord:
        with self._write() as connection:
            job = self._open_job(connection, job_id, "change the priority of")
            connection.execute("UPDATE sdjobs_jobs SET priority = %s WHERE id = %s", (priority, job.id))
            self._dispatch(connection)
            return self._job(connection, job.id)

    def pause(self, job_id: str | None = None, *, now: bool = False) -> None:
        self._set_paused(job_id, True, recall=now)

    def resume(self, job_id: str | None = None) -> None:
        self._set_paused(job_id, False)

    def _set_paused(self, job_id: str | None, paused: bool, *, recall: bool = False) -> None:
        with self._write() as connection:
            if job_id is None:
                connection.execute(
                    "INSERT INTO sdjobs_settings (key, value) VALUES ('queue_paused', %s)"
                    " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                    (_json(paused),),
                )
                recalled, ids = "owner IS NULL", ()
            else:
                job = self._open_job(connection, job_id, "pause or resume")
                connection.execute("UPDATE sdjobs_jobs SET paused = %s WHERE id = %s", (paused, job.id))
                recalled, ids = "id = %s", (job.id,)
            if recall:
                connection.execute(f"UPDATE sdjobs_jobs SET recall = TRUE WHERE state = 'running' AND {recalled}", ids)
                _abort(connection, f"SELECT id FROM sdjobs_jobs WHERE state = 'running' AND recall AND {recalled}", ids)
            self._dispatch(connection)

    def queue_paused(self) -> bool:
        with self._read() as connection:
            return _queue_paused(connection)

    def request_cancel(self, job_id: str, mode: CancelMode = CancelMode.NOW) -> JobRecord:
        mode = CancelMode(mode)
        with self._write() as connection:
            job = self._open_job(connection, job_id, "cancel")
            if job.state is JobState.QUEUED:
                self._end(connection, job.id, JobState.CANCELLED, None, cancel=mode)
                self._undispatch(connection, job.id)
            elif job.cancel is None or mode.urgency > job.cancel.urgency:
                connection.execute("UPDATE sdjobs_jobs SET cancel = %s WHERE id = %s", (str(mode), job.id))
                if stops_job(mode):
                    _abort(connection, "SELECT %s::text", (job.id,))
            return self._job(connection, job.id)

    def cancel_requested(self, job_id: str) -> CancelMode | None:
        with self._read() as connection:
            return self._job(connection, job_id).cancel

    def remove(self, job_id: str) -> None:
        with self._write() as connection:
            job = self._job(connection, job_id)
            if job.state is JobState.RUNNING:
                raise InvalidState(f"job {job.short_id} is running: cancel it before removing it")
            connection.execute("DELETE FROM sdjobs_jobs WHERE id = %s", (job.id,))
            self._undispatch(connection, job.id)

    def retry(self, job_id: str) -> JobRecord:
        with self._write() as connection:
            job = self._job(connection, job_id)
            if job.state not in (JobState.FAILED, JobState.CANCELLED):
                raise InvalidState(f"job {job.short_id} is {job.state}: only a failed or cancelled job is retried")
            connection.execute(
                "UPDATE sdjobs_jobs SET state = 'queued', error = NULL, cancel = NULL, ended_at = NULL,"
                " position = (SELECT max(position) FROM sdjobs_jobs) + 1 WHERE id = %s",
                (job.id,),
            )
            self._dispatch(connection)
            return self._job(connection, job.id)

    # -- workers ------------------------------------------------------------------

    def register_worker(self) -> WorkerInfo:
        with self._write() as connection:
            now = self._now(connection)
            worker = WorkerInfo(uuid.uuid4().hex, self.host, os.getpid(), now, now)
            connection.execute(
                "INSERT INTO sdjobs_workers (id, host, pid, started_at, heartbeat_at) VALUES (%s, %s, %s, %s, %s)",
                (worker.id, worker.host, worker.pid, worker.started_at, worker.heartbeat_at),
            )
        return worker

    def heartbeat(self, worker_id: str) -> None:
        with self._write() as connection:
            changed = connection.execute(
                "UPDATE sdjobs_workers SET heartbeat_at = %s WHERE id = %s", (self._now(connection), worker_id)
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
            connection.execute("DELETE FROM sdjobs_workers WHERE id = %s", (worker_id,))
            self._take_back_orphans(connection)
            self._dispatch(connection)

    def workers(self) -> list[WorkerInfo]:
        with self._read() as connection:
            return [_worker(row) for row in connection.execute("SELECT * FROM sdjobs_workers ORDER BY started_at")]

    def recover(self) -> list[JobRecord]:
        with self._write() as connection:
            return self._recover(connection)

    def _recover(self, connection: psycopg.Connection[Any]) -> list[JobRecord]:
        now = self._now(connection)
        gone = [
            row["id"]
            for row in connection.execute("SELECT * FROM sdjobs_workers").fetchall()
            if _worker(row).gone(now=now, lease=self.lease, host=self.host)
        ]
        if not gone:
            return []
        connection.execute("DELETE FROM sdjobs_workers WHERE id = ANY(%s)", (gone,))
        taken = self._take_back_orphans(connection)
        self._dispatch(connection)  # their jobs, and those they added for themselves, are anyone's now
        return taken

    def _take_back_orphans(self, connection: psycopg.Connection[Any]) -> list[JobRecord]:
        """Running jobs whose worker is no longer registered: back to the queue (or cancelled)."""
        orphans = [
            row["id"]
            for row in connection.execute(
                "SELECT id FROM sdjobs_jobs WHERE state = 'running'"
                " AND (worker IS NULL OR worker NOT IN (SELECT id FROM sdjobs_workers))"
            )
        ]
        return [self._take_back(connection, job_id, lost=True) for job_id in orphans]

    def _take_back(self, connection: psycopg.Connection[Any], job_id: str, *, lost: bool) -> JobRecord:
        job = self._job(connection, job_id)
        if stops_job(job.cancel):
            self._end(connection, job.id, JobState.CANCELLED, None)
        else:
            connection.execute(
                "UPDATE sdjobs_jobs SET state = 'queued', worker = NULL, recall = FALSE, lost_server = %s WHERE id = %s",
                (job.server if lost else None, job.id),
            )
        return self._job(connection, job.id)

    def _end(
        self,
        connection: psycopg.Connection[Any],
        job_id: str,
        outcome: JobState,
        error: str | None,
        cancel: CancelMode | None = None,
    ) -> None:
        connection.execute(
            "UPDATE sdjobs_jobs SET state = %s, error = %s, ended_at = %s, worker = NULL, lost_server = NULL,"
            " recall = FALSE, cancel = coalesce(%s, cancel) WHERE id = %s",
            (str(outcome), error, self._now(connection), None if cancel is None else str(cancel), job_id),
        )

    # -- a worker's job -----------------------------------------------------------

    def claim(self, worker_id: str, *, server: str | None = None, ids: Sequence[str] | None = None) -> JobRecord | None:
        with self._write() as connection:
            self._recover(connection)
            if connection.execute("SELECT 1 FROM sdjobs_workers WHERE id = %s", (worker_id,)).fetchone() is None:
                raise NotHeld(self._gone_message(worker_id))
            if ids is not None:
                row = connection.execute(
                    "SELECT id FROM sdjobs_jobs WHERE state = 'queued' AND NOT paused"
                    f" AND id = ANY(%s) ORDER BY {_QUEUE_ORDER} LIMIT 1",
                    (list(ids),),
                ).fetchone()
            elif _queue_paused(connection):
                row = None
            else:
                row = connection.execute(
                    "SELECT id FROM sdjobs_jobs WHERE state = 'queued' AND NOT paused"
                    " AND (owner IS NULL OR owner = %s OR owner NOT IN (SELECT id FROM sdjobs_workers))"
                    f" ORDER BY {_QUEUE_ORDER} LIMIT 1",
                    (worker_id,),
                ).fetchone()
            if row is None:
                return None
            connection.execute(
                "UPDATE sdjobs_jobs SET state = 'running', worker = %s, server = %s, attempts = attempts + 1,"
                " started_at = coalesce(started_at, %s) WHERE id = %s",
                (worker_id, None if server is None else redact(server), self._now(connection), row["id"]),
            )
            return self._job(connection, row["id"])

    def set_folder(self, job_id: str, worker_id: str, folder: Path) -> JobRecord:
        with self._write() as connection:
            job = self._held(connection, job_id, worker_id)
            if job.folder is not None and job.folder != Path(folder):
                raise InvalidState(f"job {job.short_id} already writes into {job.folder}")
            connection.execute("UPDATE sdjobs_jobs SET folder = %s WHERE id = %s", (str(folder), job.id))
            return self._job(connection, job.id)

    def record_stage(self, job_id: str, worker_id: str, result: StageResult) -> JobRecord:
        with self._write() as connection:
            job = self._held(connection, job_id, worker_id)
            job.check_stage(result)
            connection.execute(
                "INSERT INTO sdjobs_stages (job_id, stage_index, partial, result) VALUES (%s, %s, %s, %s)"
                " ON CONFLICT (job_id, stage_index) DO UPDATE SET partial = excluded.partial, result = excluded.result",
                (job.id, result.stage_index, result.partial, _json(result.to_dict())),
            )
            connection.execute("UPDATE sdjobs_jobs SET lost_server = NULL WHERE id = %s", (job.id,))
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
            taken = self._take_back(connection, job.id, lost=False)
            self._dispatch(connection)
            return taken

    def _dispatch(self, connection: psycopg.Connection[Any]) -> None:
        """Make Procrastinate's waiting jobs match the jobs a worker may claim now (`_DISPATCH`)."""
        connection.execute(_DISPATCH, {"task": TASK, "queue": QUEUE})

    def _undispatch(self, connection: psycopg.Connection[Any], job_id: str) -> None:
        """A queued job ended or went: Procrastinate no longer waits to hand it out (the rest keep their order)."""
        connection.execute(
            "DELETE FROM procrastinate_jobs WHERE status = 'todo' AND task_name = %s AND args->>'job_id' = %s", (TASK, job_id)
        )

    def publish(self, worker: str, events: Sequence[tuple[str, str, Mapping[str, Any]]]) -> None:
        if not events:
            return
        with self._transaction("SELECT pg_advisory_xact_lock(%s)", FEED_LOCK) as connection:
            now = self._now(connection)
            with connection.cursor() as cursor:
                cursor.executemany(
                    "INSERT INTO sdjobs_feed (job_id, worker, kind, at, body) VALUES (%s, %s, %s, %s, %s)",
                    [(job_id, worker, kind, now, _json(body)) for job_id, kind, body in events],
                )
            connection.execute("SELECT pg_notify(%s, '')", (FEED_CHANNEL,))

    def feed(self, after: int = 0, *, limit: int = FEED_BATCH) -> list[FeedEvent]:
        with self._read() as connection:
            rows = connection.execute(
                "SELECT seq, job_id, worker, kind, body, at FROM sdjobs_feed WHERE seq > %s ORDER BY seq LIMIT %s",
                (after, limit),
            ).fetchall()
        return [FeedEvent(row["seq"], row["job_id"], row["worker"], row["kind"], json.loads(row["body"]), row["at"]) for row in rows]

    def wait_feed(self, after: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self._errors():
            listener = self._listening()
            while True:
                with self._read() as connection:
                    last = connection.execute("SELECT coalesce(max(seq), 0) AS last FROM sdjobs_feed").fetchone()["last"]
                left = deadline - time.monotonic()
                if last > after or left <= 0:
                    return last > after
                for _ in listener.notifies(timeout=left, stop_after=1):
                    pass  # a notice may be of events read already, or of another schema's: look again

    def _listening(self) -> psycopg.Connection[Any]:
        """The connection that listens on `FEED_CHANNEL` (made again after a lost one); LISTEN comes
        before `wait_feed` looks, so an event published in between still wakes it."""
        with self._lock:
            if self._listener is None or self._listener.closed:
                self._listener = self._psycopg.connect(self._url, autocommit=True, connect_timeout=max(1, round(self.timeout)))
                self._listener.execute(f"LISTEN {FEED_CHANNEL}")
            return self._listener

    def prune_feed(self, keep: float) -> int:
        with self._transaction("SELECT pg_advisory_xact_lock(%s)", FEED_LOCK) as connection:
            return connection.execute(
                "DELETE FROM sdjobs_feed WHERE at < %s"
                " AND (kind = 'progress' OR job_id NOT IN (SELECT id FROM sdjobs_jobs WHERE state = 'running'))",
                (self._now(connection) - keep,),
            ).rowcount


def _abort(connection: psycopg.Connection[Any], jobs: str, params: Sequence[object]) -> None:
    """Ask Procrastinate to abort the jobs running the sdjobs jobs that the query ``jobs`` selects: its
    trigger notifies their workers (LISTEN/NOTIFY), which then read what was asked of them."""
    connection.execute(
        "UPDATE procrastinate_jobs SET abort_requested = TRUE WHERE status = 'doing' AND NOT abort_requested"
        f" AND task_name = %s AND args->>'job_id' IN ({jobs})",
        (TASK, *params),
    )


    # -- the progress feed ---------------------------------------------------------


def migrate(url: str) -> int:
    """Make or bring up to date the queue in the database at `url`: sdjobs' tables (up to
    `SCHEMA_VERSION`) and, when missing, Procrastinate's, all in one transaction; every job a
    worker may claim then waits in Procrastinate.

    Returns the sdjobs schema version found.  `StoreTooNew` for a newer one; a
    failing step leaves the database as it was.
    """
    location = redact(url)
    psycopg = _import_psycopg(location)
    try:
        from procrastinate.schema import SchemaManager
    except ImportError:
        raise StoreError(f"{location}: a PostgreSQL queue needs the postgres extra: pip install '{EXTRA}'") from None
    try:
        with psycopg.connect(url, connect_timeout=max(1, round(DEFAULT_TIMEOUT))) as connection:
            connection.execute("SELECT pg_advisory_xact_lock(%s)", (WRITE_LOCK,))
            found = _schema_version(connection)
            if found > SCHEMA_VERSION:
                raise StoreTooNew(
                    f"{location}: made by a newer sdjobs (queue schema {found}; this one knows up to {SCHEMA_VERSION})"
                )
            for version in range(found, SCHEMA_VERSION):
                for statement in MIGRATIONS[version]:
                    connection.execute(statement)
            connection.execute(
                "INSERT INTO sdjobs_settings (key, value) VALUES ('schema_version', %s)"
                " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (str(SCHEMA_VERSION),),
            )
            if connection.execute("SELECT to_regclass('procrastinate_jobs')").fetchone()[0] is None:
                connection.execute(SchemaManager.get_schema())
            connection.execute(_DISPATCH_INDEX)
            connection.execute(_DISPATCH, {"task": TASK, "queue": QUEUE})  # jobs queued before Procrastinate dispatched
    except psycopg.Error as error:
        text = " ".join(str(error).split())
        for secret in _secrets(url):
            text = text.replace(secret, "***")
        raise StoreUnreadable(f"{location}: cannot migrate the queue ({text})") from None
    return found


def _schema_version(connection: psycopg.Connection[Any]) -> int:
    """The sdjobs schema version of the database: 0 when it has no sdjobs tables."""
    row = connection.execute("SELECT to_regclass('sdjobs_settings') IS NOT NULL AS made").fetchone()
    made = row["made"] if isinstance(row, dict) else row[0]
    if not made:
        return 0
    row = connection.execute("SELECT value FROM sdjobs_settings WHERE key = 'schema_version'").fetchone()
    value = None if row is None else row["value"] if isinstance(row, dict) else row[0]
    return 0 if value is None else int(value)


def _queue_paused(connection: psycopg.Connection[Any]) -> bool:
    row = connection.execute("SELECT value FROM sdjobs_settings WHERE key = 'queue_paused'").fetchone()
    return row is not None and json.loads(row["value"])



def _worker(row: dict[str, Any]) -> WorkerInfo:
    return WorkerInfo(row["id"], row["host"], row["pid"], row["started_at"], row["heartbeat_at"])

