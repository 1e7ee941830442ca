"""The store's logic once, in the SQL both backends speak: `SQLStore`.

Every rule of `sdjobs.store` (claims, recovery, fencing by worker, cancels,
the progress feed) is written here once.  A backend (`SQLiteStore`,
`PostgresStore`) supplies only what differs: how it connects and opens its
transactions (`_read`, `_write`, `_feed_write`), its clock (`_now`), the names
of its tables (`TABLE_PREFIX`), how a parameter is written (`PARAM`), how a
column is matched against a list (`_member`), and `wait_feed`.  It may do a
step its own way where it is faster (`_insert_jobs`, `_renumber`).

The SQL here is written with ``?`` for a parameter and ``{jobs}``,
``{stages}``, ``{workers}``, ``{settings}``, ``{feed}`` for the tables;
`_sql` turns it into the backend's.  Rows are read by column name only.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import uuid
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import urlsplit, urlunsplit

from sdjobs.outputs import SHORT_ID_LENGTH, random_job_id
from sdjobs.spec import JobSpec
from sdjobs.status import CancelMode, JobState, StageResult
from sdjobs.store import (
    FEED_BATCH,
    MIN_PREFIX,
    FeedEvent,
    InvalidState,
    JobRecord,
    NotHeld,
    Store,
    StoreUnreadable,
    UnknownJob,
    WorkerInfo,
    stops_job,
)

#: The tables, by their name in the shared SQL.
TABLES = ("jobs", "stages", "workers", "settings", "feed")

_JOB_COLUMNS = (
    "id, spec, state, position, priority, paused, owner, attempts, worker, server, lost_server, folder, error, cancel,"
    " recall, added_at, started_at, ended_at"
)
_QUEUE_ORDER = "priority DESC, position"


def _json(data: Any) -> str:
    # `default=str`: a TOML date passed through to the WebUI is kept as the text it is sent as.
    return json.dumps(data, sort_keys=True, default=str)


def without_credentials(url: str | None) -> str | None:
    """A server's URL as the store records it: without user and password."""
    if url is None:
        return None
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


@functools.cache
def _translate(sql: str, prefix: str, param: str) -> str:
    text = sql.format(**{name: prefix + name for name in TABLES})
    return text if param == "?" else text.replace("%", "%%").replace("?", param)


class SQLStore(Store):
    """What both SQL backends share; see the module's doc for what a backend adds.

    A backend sets `location`, `lease`, `host` and the members below.  Its
    connection's rows must be readable by column name.
    """

    #: Put before each table's name: `"sdjobs_"` on PostgreSQL, where other applications' tables live too.
    TABLE_PREFIX: ClassVar[str] = ""
    #: How the driver writes a parameter: `"?"` or `"%s"`.
    PARAM: ClassVar[str] = "?"

    lease: float
    host: str

    # -- what a backend supplies ------------------------------------------------

    def _read(self) -> contextlib.AbstractContextManager[Any]:
        """A read transaction: one consistent snapshot, no lock taken; yields the connection."""
        raise NotImplementedError

    def _write(self) -> contextlib.AbstractContextManager[Any]:
        """A write transaction holding the queue's write lock, so what it reads is not stale."""
        raise NotImplementedError

    def _feed_write(self) -> contextlib.AbstractContextManager[Any]:
        """A transaction that writes to the feed; two never interleave their events."""
        return self._write()

    def _now(self, connection: Any) -> float:
        """Unix time from the store's clock."""
        raise NotImplementedError

    def _member(self, column: str, values: Sequence[str]) -> tuple[str, object]:
        """SQL true when ``column`` is one of ``values``, and its one parameter."""
        raise NotImplementedError

    # Where the workers are told rather than look (PostgreSQL's, through Procrastinate), a backend
    # tells them in the same transaction; by default nothing is done: the workers look.

    def _claimable_changed(self, connection: Any) -> None:
        """Which jobs a worker may claim, or their order, may have changed in this transaction."""

    def _unqueued(self, connection: Any, job_id: str) -> None:
        """A queued job ended or went in this transaction: it is no longer to be handed out."""

    def _stop_asked(self, connection: Any, job_ids: Sequence[str]) -> None:
        """A cancel that stops them, or a recall, was asked of these running jobs in this transaction."""

    # -- SQL --------------------------------------------------------------------

    def _sql(self, sql: str) -> str:
        return _translate(sql, self.TABLE_PREFIX, self.PARAM)

    def _execute(self, connection: Any, sql: str, params: Sequence[object] = ()) -> Any:
        return connection.execute(self._sql(sql), tuple(params))

    def _one(self, connection: Any, sql: str, params: Sequence[object] = ()) -> Any:
        return self._execute(connection, sql, params).fetchone()

    def _all(self, connection: Any, sql: str, params: Sequence[object] = ()) -> list[Any]:
        return self._execute(connection, sql, params).fetchall()

    def _execute_many(self, connection: Any, sql: str, rows: Sequence[Sequence[object]]) -> None:
        cursor = connection.cursor()
        try:
            cursor.executemany(self._sql(sql), rows)
        finally:
            cursor.close()

    # -- reading jobs -------------------------------------------------------------

    def _row(self, connection: Any, job_id: str) -> Any:
        """The job with this id, or the one job whose id starts with it."""
        row = self._one(connection, f"SELECT {_JOB_COLUMNS} FROM {{jobs}} WHERE id = ?", (job_id,))
        if row is not None:
            return row
        rows = []
        if len(job_id) >= MIN_PREFIX:
            rows = self._all(
                connection, f"SELECT {_JOB_COLUMNS} FROM {{jobs}} WHERE substr(id, 1, ?) = ? LIMIT 2", (len(job_id), job_id)
            )
        if len(rows) != 1:
            which = "no job" if not rows else "more than one job"
            raise UnknownJob(f"{self.location}: {which} with id {job_id!r}")
        return rows[0]

    def _records(self, connection: Any, rows: Sequence[Any]) -> list[JobRecord]:
        """The jobs of these rows, their stages read in one query."""
        stages: dict[str, list[StageResult]] = {row["id"]: [] for row in rows}
        if rows:
            member, values = self._member("job_id", list(stages))
            for stage in self._all(
                connection, f"SELECT job_id, result FROM {{stages}} WHERE {member} ORDER BY job_id, stage_index", (values,)
            ):
                stages[stage["job_id"]].append(StageResult.from_dict(json.loads(stage["result"])))
        return [self._record(row, stages[row["id"]]) for row in rows]

    def _record(self, row: Any, stages: list[StageResult]) -> JobRecord:
        try:
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
                stages=tuple(stages),
                error=row["error"],
                cancel=None if row["cancel"] is None else CancelMode(row["cancel"]),
                recall=bool(row["recall"]),
                added_at=row["added_at"],
                started_at=row["started_at"],
                ended_at=row["ended_at"],
            )
        except (ValueError, TypeError, KeyError) as error:
            raise StoreUnreadable(f"{self.location}: job {row['id']} cannot be read ({error})") from None

    def _job(self, connection: Any, job_id: str) -> JobRecord:
        return self._records(connection, [self._row(connection, job_id)])[0]

    def _open_job(self, connection: Any, job_id: str, doing: str) -> JobRecord:
        """A job that has not ended; `InvalidState` naming what could not be done otherwise."""
        job = self._job(connection, job_id)
        if job.ended:
            raise InvalidState(f"job {job.short_id} has ended ({job.state}): cannot {doing} it")
        return job

    def _held(self, connection: Any, job_id: str, worker_id: str) -> JobRecord:
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
        jobs = [(random_job_id(), spec.name, _json(spec.to_dict())) for spec in specs]
        with self._write() as connection:
            now = self._now(connection)
            last = self._one(connection, "SELECT coalesce(max(position), 0) AS last FROM {jobs}")["last"]
            self._insert_jobs(connection, [(*job, "queued", last + number, priority, paused, owner, now)
                                           for number, job in enumerate(jobs, 1)])  # fmt: skip
            self._claimable_changed(connection)
            added = self._all(connection, f"SELECT {_JOB_COLUMNS} FROM {{jobs}} WHERE position > ? ORDER BY position", (last,))
            return self._records(connection, added)

    def _insert_jobs(self, connection: Any, rows: Sequence[Sequence[object]]) -> None:
        """Insert new jobs: rows of id, name, spec, state, position, priority, paused, owner, added_at."""
        self._execute_many(
            connection,
            "INSERT INTO {jobs} (id, name, spec, state, position, priority, paused, owner, added_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            rows,
        )

    def get(self, job_id: str) -> JobRecord:
        with self._read() as connection:
            return self._job(connection, job_id)

    def list(self) -> list[JobRecord]:
        with self._read() as connection:
            rows = self._all(connection, f"SELECT {_JOB_COLUMNS} FROM {{jobs}} WHERE ended_at IS NULL ORDER BY {_QUEUE_ORDER}")
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
        asked = {"name = ?": name, "state = ?": None if outcome is None else str(outcome), "ended_at >= ?": since,
                 "ended_at < ?": until, "server = ?": server}  # fmt: skip
        conditions = ["ended_at IS NOT NULL", *(condition for condition, value in asked.items() if value is not None)]
        params = [value for value in asked.values() if value is not None]
        sql = f"SELECT {_JOB_COLUMNS} FROM {{jobs}} WHERE {' AND '.join(conditions)} ORDER BY ended_at DESC, position DESC"
        if limit is not None:
            sql, params = sql + " LIMIT ?", [*params, limit]
        with self._read() as connection:
            return self._records(connection, self._all(connection, sql, params))

    def move(self, job_id: str, *, before: str | None = None, after: str | None = None) -> JobRecord:
        if (before is None) == (after is None):
            raise ValueError("move a job either before or after another one")
        with self._write() as connection:
            job = self._open_job(connection, job_id, "move")
            anchor = self._open_job(connection, before if after is None else after, "move a job next to")
            if anchor.id == job.id:
                return job
            order = [row["id"] for row in self._all(connection, f"SELECT id FROM {{jobs}} WHERE ended_at IS NULL ORDER BY {_QUEUE_ORDER}")
                     if row["id"] != job.id]  # fmt: skip
            order.insert(order.index(anchor.id) + (after is not None), job.id)
            self._renumber(connection, order)
            self._execute(connection, "UPDATE {jobs} SET priority = ? WHERE id = ?", (anchor.priority, job.id))
            self._claimable_changed(connection)
            return self._job(connection, job.id)

    def _renumber(self, connection: Any, order: Sequence[str]) -> None:
        """Give the jobs of ``order`` the positions 1, 2, ... in that order."""
        self._execute_many(connection, "UPDATE {jobs} SET position = ? WHERE id = ?", list(enumerate(order, 1)))

    def set_priority(self, job_id: str, priority: int) -> JobRecord:
        with self._write() as connection:
            job = self._open_job(connection, job_id, "change the priority of")
            self._execute(connection, "UPDATE {jobs} SET priority = ? WHERE id = ?", (priority, job.id))
            self._claimable_changed(connection)
            return self._job(connection, job.id)

    def pause(self, job_id: str | None = None, *, now: bool = False) -> None:
        self._set_paused(job_id, True, recall=now)

    def resume(self, job_id: str | None = None) -> None:
        self._set_paused(job_id, False)

    def _set_paused(self, job_id: str | None, paused: bool, *, recall: bool = False) -> None:
        with self._write() as connection:
            if job_id is None:
                self._execute(
                    connection,
                    "INSERT INTO {settings} (key, value) VALUES ('queue_paused', ?)"
                    " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                    (_json(paused),),
                )
                recalled, ids = "owner IS NULL", ()
            else:
                job = self._open_job(connection, job_id, "pause or resume")
                self._execute(connection, "UPDATE {jobs} SET paused = ? WHERE id = ?", (paused, job.id))
                recalled, ids = "id = ?", (job.id,)
            if recall:
                self._execute(connection, f"UPDATE {{jobs}} SET recall = TRUE WHERE state = 'running' AND {recalled}", ids)
                asked = self._all(connection, f"SELECT id FROM {{jobs}} WHERE state = 'running' AND recall AND {recalled}", ids)
                self._stop_asked(connection, [row["id"] for row in asked])
            self._claimable_changed(connection)

    def queue_paused(self) -> bool:
        with self._read() as connection:
            return self._queue_paused(connection)

    def _queue_paused(self, connection: Any) -> bool:
        row = self._one(connection, "SELECT value FROM {settings} WHERE key = 'queue_paused'")
        return row is not None and json.loads(row["value"])

    def request_cancel(self, job_id: str, mode: CancelMode = CancelMode.NOW) -> JobRecord:
        mode = CancelMode(mode)
        with self._write() as connection:
            job = self._open_job(connection, job_id, "cancel")
            if job.state is JobState.QUEUED:
                self._end(connection, job.id, JobState.CANCELLED, None, cancel=mode)
                self._unqueued(connection, job.id)
            elif job.cancel is None or mode.urgency > job.cancel.urgency:
                self._execute(connection, "UPDATE {jobs} SET cancel = ? WHERE id = ?", (str(mode), job.id))
                if stops_job(mode):
                    self._stop_asked(connection, [job.id])
            return self._job(connection, job.id)

    def cancel_requested(self, job_id: str) -> CancelMode | None:
        with self._read() as connection:
            return self._job(connection, job_id).cancel

    def remove(self, job_id: str) -> None:
        with self._write() as connection:
            job = self._job(connection, job_id)
            if job.state is JobState.RUNNING:
                raise InvalidState(f"job {job.short_id} is running: cancel it before removing it")
            self._execute(connection, "DELETE FROM {jobs} WHERE id = ?", (job.id,))
            self._unqueued(connection, job.id)

    def retry(self, job_id: str) -> JobRecord:
        with self._write() as connection:
            job = self._job(connection, job_id)
            if job.state not in (JobState.FAILED, JobState.CANCELLED):
                raise InvalidState(f"job {job.short_id} is {job.state}: only a failed or cancelled job is retried")
            self._execute(
                connection,
                "UPDATE {jobs} SET state = 'queued', error = NULL, cancel = NULL, ended_at = NULL,"
                " position = (SELECT max(position) FROM {jobs}) + 1 WHERE id = ?",
                (job.id,),
            )
            self._claimable_changed(connection)
            return self._job(connection, job.id)

    # -- workers ------------------------------------------------------------------

    def register_worker(self) -> WorkerInfo:
        with self._write() as connection:
            now = self._now(connection)
            worker = WorkerInfo(uuid.uuid4().hex, self.host, os.getpid(), now, now)
            self._execute(
                connection,
                "INSERT INTO {workers} (id, host, pid, started_at, heartbeat_at) VALUES (?, ?, ?, ?, ?)",
                (worker.id, worker.host, worker.pid, worker.started_at, worker.heartbeat_at),
            )
        return worker

    def heartbeat(self, worker_id: str) -> None:
        with self._write() as connection:
            changed = self._execute(
                connection, "UPDATE {workers} SET heartbeat_at = ? WHERE id = ?", (self._now(connection), worker_id)
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
            self._execute(connection, "DELETE FROM {workers} WHERE id = ?", (worker_id,))
            self._take_back_orphans(connection)
            self._claimable_changed(connection)

    def workers(self) -> list[WorkerInfo]:
        with self._read() as connection:
            return [_worker(row) for row in self._all(connection, "SELECT * FROM {workers} ORDER BY started_at")]

    def recover(self) -> list[JobRecord]:
        with self._write() as connection:
            return self._recover(connection)

    def _recover(self, connection: Any) -> list[JobRecord]:
        now = self._now(connection)
        gone = [row["id"] for row in self._all(connection, "SELECT * FROM {workers}")
                if _worker(row).gone(now=now, lease=self.lease, host=self.host)]  # fmt: skip
        if not gone:
            return []  # a worker's jobs are taken back as it goes (here, or as it leaves): none is left behind
        member, values = self._member("id", gone)
        self._execute(connection, f"DELETE FROM {{workers}} WHERE {member}", (values,))
        taken = self._take_back_orphans(connection)
        self._claimable_changed(connection)  # their jobs, and those they added for themselves, are anyone's now
        return taken

    def _take_back_orphans(self, connection: Any) -> list[JobRecord]:
        """Running jobs whose worker is no longer registered: back to the queue (or cancelled)."""
        orphans = self._all(
            connection,
            "SELECT id FROM {jobs} WHERE state = 'running' AND (worker IS NULL OR worker NOT IN (SELECT id FROM {workers}))",
        )
        return [self._take_back(connection, row["id"], lost=True) for row in orphans]

    def _take_back(self, connection: Any, job_id: str, *, lost: bool) -> JobRecord:
        """A running job back to the queue (or cancelled); `lost`: its worker died, mid-request maybe."""
        job = self._job(connection, job_id)
        if stops_job(job.cancel):
            self._end(connection, job.id, JobState.CANCELLED, None)
        else:
            self._execute(
                connection,
                "UPDATE {jobs} SET state = 'queued', worker = NULL, recall = FALSE, lost_server = ? WHERE id = ?",
                (job.server if lost else None, job.id),
            )
        return self._job(connection, job.id)

    def _end(self, connection: Any, job_id: str, outcome: JobState, error: str | None, cancel: CancelMode | None = None) -> None:
        self._execute(
            connection,
            "UPDATE {jobs} SET state = ?, error = ?, ended_at = ?, worker = NULL, lost_server = NULL, recall = FALSE,"
            " cancel = coalesce(?, cancel) WHERE id = ?",
            (str(outcome), error, self._now(connection), None if cancel is None else str(cancel), job_id),
        )

    # -- a worker's job -----------------------------------------------------------

    def claim(self, worker_id: str, *, server: str | None = None, ids: Sequence[str] | None = None) -> JobRecord | None:
        with self._write() as connection:
            self._recover(connection)
            if self._one(connection, "SELECT 1 AS registered FROM {workers} WHERE id = ?", (worker_id,)) is None:
                raise NotHeld(self._gone_message(worker_id))
            if ids is not None:
                member, values = self._member("id", ids)
                row = self._one(connection, f"SELECT id FROM {{jobs}} WHERE state = 'queued' AND NOT paused AND {member}"
                                f" ORDER BY {_QUEUE_ORDER} LIMIT 1", (values,))  # fmt: skip
            elif self._queue_paused(connection):
                row = None
            else:
                row = self._one(
                    connection,
                    "SELECT id FROM {jobs} WHERE state = 'queued' AND NOT paused"
                    " AND (owner IS NULL OR owner = ? OR owner NOT IN (SELECT id FROM {workers}))"
                    f" ORDER BY {_QUEUE_ORDER} LIMIT 1",
                    (worker_id,),
                )
            if row is None:
                return None
            self._execute(
                connection,
                "UPDATE {jobs} SET state = 'running', worker = ?, server = ?, attempts = attempts + 1,"
                " started_at = coalesce(started_at, ?) WHERE id = ?",
                (worker_id, without_credentials(server), self._now(connection), row["id"]),
            )
            return self._job(connection, row["id"])

    def set_folder(self, job_id: str, worker_id: str, folder: Path) -> JobRecord:
        with self._write() as connection:
            job = self._held(connection, job_id, worker_id)
            if job.folder is not None and job.folder != Path(folder):
                raise InvalidState(f"job {job.short_id} already writes into {job.folder}")
            self._execute(connection, "UPDATE {jobs} SET folder = ? WHERE id = ?", (str(folder), job.id))
            return self._job(connection, job.id)

    def record_stage(self, job_id: str, worker_id: str, result: StageResult) -> JobRecord:
        with self._write() as connection:
            job = self._held(connection, job_id, worker_id)
            job.check_stage(result)
            self._execute(
                connection,
                "INSERT INTO {stages} (job_id, stage_index, partial, result) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (job_id, stage_index) DO UPDATE SET partial = excluded.partial, result = excluded.result",
                (job.id, result.stage_index, result.partial, _json(result.to_dict())),
            )
            self._execute(connection, "UPDATE {jobs} SET lost_server = NULL WHERE id = ?", (job.id,))
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
            self._claimable_changed(connection)
            return taken

    # -- the progress feed ---------------------------------------------------------

    def publish(self, worker: str, events: Sequence[tuple[str, str, Mapping[str, Any]]]) -> None:
        if not events:
            return
        with self._feed_write() as connection:
            now = self._now(connection)
            self._execute_many(connection, "INSERT INTO {feed} (job_id, worker, kind, at, body) VALUES (?, ?, ?, ?, ?)",
                               [(job_id, worker, kind, now, _json(body)) for job_id, kind, body in events])  # fmt: skip
            self._published(connection)

    def _published(self, connection: Any) -> None:
        """Events were written in this transaction: wake the watchers that can be woken."""

    def feed(self, after: int = 0, *, limit: int = FEED_BATCH) -> list[FeedEvent]:
        with self._read() as connection:
            rows = self._all(connection, "SELECT seq, job_id, worker, kind, body, at FROM {feed} WHERE seq > ? ORDER BY seq LIMIT ?",
                             (after, limit))  # fmt: skip
        return [FeedEvent(row["seq"], row["job_id"], row["worker"], row["kind"], json.loads(row["body"]), row["at"]) for row in rows]

    def _last_event(self) -> int:
        """The number of the latest event in the feed; 0 when none."""
        with self._read() as connection:
            return self._one(connection, "SELECT coalesce(max(seq), 0) AS last FROM {feed}")["last"]

    def prune_feed(self, keep: float) -> int:
        with self._feed_write() as connection:
            return self._execute(
                connection,
                "DELETE FROM {feed} WHERE at < ? AND (kind = 'progress' OR job_id NOT IN (SELECT id FROM {jobs} WHERE state = 'running'))",
                (self._now(connection) - keep,),
            ).rowcount


def _worker(row: Any) -> WorkerInfo:
    return WorkerInfo(row["id"], row["host"], row["pid"], row["started_at"], row["heartbeat_at"])
