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
  waiting jobs match in the same transaction (`_claimable_changed`): one `TASK` job on
  the `QUEUE` queue for each job a worker may claim, its priority its place in
  the queue.  A cancel or a recall of a running job asks Procrastinate to abort
  the job running it, which reaches its worker over LISTEN/NOTIFY.
- The progress feed (`sdjobs watch`) takes an advisory lock of its own, not the
  write lock, and NOTIFYs `FEED_CHANNEL`, on which `wait_feed` LISTENs.

The queue's logic is `sdjobs.sql_store.SQLStore`'s, shared with the SQLite
store; this module holds what is PostgreSQL's own: the connection, the locks,
the clock, the schema, COPY for adding jobs and LISTEN/NOTIFY.

Without the extra installed, opening one is one line naming it (`needs_extra`).
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlsplit

from sdjobs.sql_store import SQLStore
from sdjobs.store import StoreError, StoreLocked, StoreTooNew, StoreUnreadable

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


class PostgresStore(SQLStore):
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

    TABLE_PREFIX = "sdjobs_"
    PARAM = "%s"

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

    def _member(self, column: str, values: Sequence[str]) -> tuple[str, object]:
        return f"{column} = ANY(?)", list(values)

    def _insert_jobs(self, connection: psycopg.Connection[Any], rows: Sequence[Sequence[object]]) -> None:
        """By COPY: thousands of jobs a second (see docs/benchmarks.md)."""
        with connection.cursor().copy(
            "COPY sdjobs_jobs (id, name, spec, state, position, priority, paused, owner, added_at) FROM STDIN"
        ) as copy:
            for row in rows:
                copy.write_row(row)

    def _renumber(self, connection: psycopg.Connection[Any], order: Sequence[str]) -> None:
        self._execute(
            connection,
            "UPDATE {jobs} SET position = ordered.number FROM unnest(?::text[]) WITH ORDINALITY AS ordered (id, number)"
            " WHERE {jobs}.id = ordered.id",
            (list(order),),
        )

    # -- Procrastinate: the jobs handed out, and aborts --------------------------------

    def _claimable_changed(self, connection: psycopg.Connection[Any]) -> None:
        """Make Procrastinate's waiting jobs match the jobs a worker may claim now (`_DISPATCH`)."""
        connection.execute(_DISPATCH, {"task": TASK, "queue": QUEUE})

    def _unqueued(self, connection: psycopg.Connection[Any], job_id: str) -> None:
        """Procrastinate no longer waits to hand the job out (the rest keep their order)."""
        connection.execute(
            "DELETE FROM procrastinate_jobs WHERE status = 'todo' AND task_name = %s AND args->>'job_id' = %s", (TASK, job_id)
        )

    def _stop_asked(self, connection: psycopg.Connection[Any], job_ids: Sequence[str]) -> None:
        """Ask Procrastinate to abort the jobs running these sdjobs jobs: its trigger notifies their workers
        (LISTEN/NOTIFY), which then read what was asked of them."""
        connection.execute(
            "UPDATE procrastinate_jobs SET abort_requested = TRUE WHERE status = 'doing' AND NOT abort_requested"
            " AND task_name = %s AND args->>'job_id' = ANY(%s)",
            (TASK, list(job_ids)),
        )

    # -- the progress feed ---------------------------------------------------------

    def _feed_write(self) -> contextlib.AbstractContextManager[psycopg.Connection[Any]]:
        return self._transaction("SELECT pg_advisory_xact_lock(%s)", FEED_LOCK)

    def _published(self, connection: psycopg.Connection[Any]) -> None:
        connection.execute("SELECT pg_notify(%s, '')", (FEED_CHANNEL,))

    def wait_feed(self, after: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self._errors():
            listener = self._listening()
            while True:
                last = self._last_event()
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
