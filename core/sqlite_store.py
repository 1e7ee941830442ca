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

The queue's logic is `sdjobs.sql_store.SQLStore`'s, shared with the
PostgreSQL store; this module holds what is SQLite's own: the file, its locks
and their messages, the schema, and the feed's waiting (a look every
`FEED_POLL` seconds).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import platformdirs

from sdjobs.sql_store import SQLStore, _worker
from sdjobs.store import (
    DEFAULT_LEASE,
    FEED_POLL,
    StoreLocked,
    StoreTooNew,
    StoreUnreadable,
    WorkerInfo,
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


class SQLiteStore(SQLStore):
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

    def _now(self, connection: sqlite3.Connection) -> float:
        return self._clock()

    def _member(self, column: str, values: Sequence[str]) -> tuple[str, object]:
        return f"{column} IN (SELECT value FROM json_each(?))", json.dumps(list(values))

    def wait_feed(self, after: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            last = self._last_event()
            left = deadline - time.monotonic()
            if last > after or left <= 0:
                return last > after
            time.sleep(min(FEED_POLL, left))
