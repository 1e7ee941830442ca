"""The store: the durable queue and history of jobs, behind one narrow interface.

A job lives in the store from `add` to its end.  A worker registers, `claim`s
the next job, `record_stage`s every finished stage (after its images are on
disk) and `finish`es it; on SIGTERM it `release`s it.  A worker that dies
(`kill -9`, a lost machine) stops its heartbeat; the next `recover` (every
`claim` runs one) puts its running jobs back in the queue, where they resume at
their first unfinished stage (`JobRecord.next_stage`).  Every call is one
transaction, so two workers in two processes never hold the same job.

`Store` is the interface; `sdjobs.sqlite_store.SQLiteStore` is the embedded
backend, `sdjobs.postgres_store.PostgresStore` the farm's, both on the logic
they share (`sdjobs.sql_store.SQLStore`).  A backend keeps the rules written
here (`WorkerInfo.gone`, `JobRecord.next_stage`, `stops_job`) and passes
`tests/test_store_contract.py` unchanged.

Workers also publish their running jobs' hooks into the store's progress feed
(`publish`, `feed`, `wait_feed`, `prune_feed`), which `sdjobs watch` reads.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, Self

import attrs

from sdjobs.outputs import SHORT_ID_LENGTH
from sdjobs.spec import JobSpec
from sdjobs.status import CancelMode, JobState, StageResult

#: Seconds without a heartbeat after which a worker counts as gone, wherever it runs.
DEFAULT_LEASE = 60.0

#: The shortest id prefix `Store.get` accepts in place of a whole id.
MIN_PREFIX = 4

#: The most events `Store.feed` returns at once.
FEED_BATCH = 1000

#: Seconds between two looks of `Store.wait_feed` where the store cannot wake it (SQLite).
FEED_POLL = 0.1


class StoreError(Exception):
    """Something the store cannot do; `str()` is one line naming the store or the job, fit to print."""


class UnknownJob(StoreError):
    """No job has this id (or more than one starts with this prefix)."""


class InvalidState(StoreError):
    """The job is not in a state that allows this (an ended job moved, a stage recorded twice, ...)."""


class NotHeld(InvalidState):
    """The worker does not hold this job (any more): it was released, finished or recovered.

    A worker that was thought dead (its heartbeat lapsed) gets this from every
    call about its old jobs, so it can never overwrite what the next worker did.
    """


class StoreLocked(StoreError):
    """Another process held the store locked longer than the timeout; the message says who."""


class StoreUnreadable(StoreError):
    """The store cannot be read: not a queue, damaged, or not readable.  It is left untouched."""


class StoreTooNew(StoreError):
    """The store was made by a newer sdjobs (its schema is newer than this one knows)."""


def stops_job(mode: CancelMode | None) -> bool:
    """Whether a requested cancel ends the job itself (not only the jobs after it)."""
    return mode is not None and mode is not CancelMode.AFTER_JOB


def pid_alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine (POSIX; elsewhere, assume it does).

    On Windows `os.kill` would end the process, so only the heartbeat tells there.
    """
    if os.name != "posix":
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


@attrs.frozen
class WorkerInfo:
    """A registered worker: a process that claims and runs jobs.

    Attributes:
        id: Random, made by `Store.register_worker`.
        host: The machine it runs on (`socket.gethostname()`).
        pid: Its process id there.
        started_at: Unix time it registered.
        heartbeat_at: Unix time of its latest heartbeat.
    """

    id: str
    host: str
    pid: int
    started_at: float
    heartbeat_at: float

    def gone(self, *, now: float, lease: float, host: str) -> bool:
        """Dead or lost: no heartbeat for `lease` seconds, or (on `host`, this machine) no such process."""
        return now - self.heartbeat_at > lease or (self.host == host and not pid_alive(self.pid))

    def describe(self) -> str:
        """`"sdjobs worker 3fa2b1c0 (pid 4242 on studio)"`."""
        return f"sdjobs worker {self.id[:SHORT_ID_LENGTH]} (pid {self.pid} on {self.host})"


@attrs.frozen
class JobRecord:
    """A job as the store holds it: its spec as submitted and where it stands.

    Attributes:
        id: Random hex, unique by construction.
        spec: The spec as submitted, its seed resolved.
        state: `queued`, `running`, or where it ended (`done`, `failed`, `cancelled`).
        position: Its place in the queue; lower runs sooner among equal priorities.
        priority: Higher runs sooner.
        paused: Held back: no worker claims it until it is resumed.
        owner: The worker that added it for itself (`sdjobs run`): others leave it
            alone while that worker lives.
        attempts: How often a worker claimed it.
        worker: The worker holding it while it runs.
        server: The WebUI it runs on, or ran on last (no credentials).
        lost_server: The WebUI an attempt was running on when its worker was
            lost (died or fell silent), until the job records a stage, is
            released or ends: the next worker may interrupt a request of this
            job still running there.
        folder: Its output folder, once made; a resumed job writes there again.
        stages: The recorded stages in order; the last may be partial.
        error: Why it failed, when it did.
        cancel: The cancel asked for it, if any (the most urgent one asked).
        recall: A running job asked back into the queue (`Store.pause` with
            ``now``): its worker hands it back, resumable where it was.
        added_at: Unix time it was added.
        started_at: Unix time it was first claimed.
        ended_at: Unix time it ended.
    """

    id: str
    spec: JobSpec
    state: JobState
    position: int
    priority: int = 0
    paused: bool = False
    owner: str | None = None
    attempts: int = 0
    worker: str | None = None
    server: str | None = None
    lost_server: str | None = None
    folder: Path | None = None
    stages: tuple[StageResult, ...] = ()
    error: str | None = None
    cancel: CancelMode | None = None
    recall: bool = False
    added_at: float = 0.0
    started_at: float | None = None
    ended_at: float | None = None

    @property
    def short_id(self) -> str:
        """The start of the id, as the job's folder name and the command line show it."""
        return self.id[:SHORT_ID_LENGTH]

    @property
    def ended(self) -> bool:
        return self.state.terminal

    @property
    def shown_state(self) -> str:
        """The state as `sdjobs queue list` and the front ends show it: `paused` for a queued job held back."""
        return "paused" if self.paused and self.state is JobState.QUEUED else str(self.state)

    @property
    def next_stage(self) -> int:
        """The first stage (0-based) not finished in full: where the job runs or resumes."""
        return sum(not result.partial for result in self.stages)  # only the last can be partial

    def check_stage(self, result: StageResult) -> None:
        """Raise `InvalidState` unless `result` is the job's next stage: no stage twice, none skipped."""
        index = self.next_stage
        stages = self.spec.stages
        if result.stage_index != index or index >= len(stages) or result.stage != stages[index].type:
            expected = f"stage {index + 1} ({stages[index].type})" if index < len(stages) else "no stage"
            raise InvalidState(
                f"job {self.short_id}: expected {expected}, got stage {result.stage_index + 1} ({result.stage})"
            )


@attrs.frozen
class FeedEvent:
    """One event of a running job in the store's feed (`Store.publish`), as `sdjobs watch` reads it.

    Attributes:
        seq: Its place in the feed: larger for every later event, never used again.
        job_id: The job.
        worker: The worker that published it, as it names itself (`"3fa2b1c0 on gpu1"`).
        kind: The hook it stands for, without ``sdjobs_`` (`job_started`, `progress`, ...).
        body: The hook's arguments, as JSON-ready data.
        at: Unix time it was published, from the store's clock.
    """

    seq: int
    job_id: str
    worker: str
    kind: str
    body: Mapping[str, Any]
    at: float


class Store(Protocol):
    """The durable queue: jobs from `add` to their end, and the workers that run them.

    Every method is one transaction, safe to call from any thread and from any
    number of processes at once.  Ids may be given whole; `get` also takes a
    unique prefix of at least `MIN_PREFIX` characters.  Times are Unix seconds
    from the store's clock.
    """

    @property
    def location(self) -> str:
        """Where the store is, for messages (a path; never credentials)."""
        ...

    # -- the queue ----------------------------------------------------------

    def add(
        self, specs: Iterable[JobSpec], *, priority: int = 0, paused: bool = False, owner: str | None = None
    ) -> list[JobRecord]:
        """Queue one job per spec (the same spec twice makes two jobs), last in the queue, in order."""
        ...

    def get(self, job_id: str) -> JobRecord:
        """The job with this id or unique id prefix; `UnknownJob` if none (or several)."""
        ...

    def list(self) -> list[JobRecord]:
        """The jobs that have not ended, running ones included, in the order they are claimed."""
        ...

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
        """Ended jobs, latest first: of this name, with this outcome, ended in `[since, until)`, last run
        on this `server` (`JobRecord.server`: the server's history, `sdjobs.history`), at most `limit`."""
        ...

    def move(self, job_id: str, *, before: str | None = None, after: str | None = None) -> JobRecord:
        """Put a job that has not ended just before or just after another one, taking its priority."""
        ...

    def set_priority(self, job_id: str, priority: int) -> JobRecord:
        """Change the priority of a job that has not ended."""
        ...

    def pause(self, job_id: str | None = None, *, now: bool = False) -> None:
        """Hold one job back, or (no id) the whole queue: claims without `ids` get nothing.

        With ``now``, the running jobs it holds back (that job, or every running
        job without an owner) are asked back (`JobRecord.recall`): their workers
        hand them back to the queue, resumable where they were.
        """
        ...

    def resume(self, job_id: str | None = None) -> None:
        """Undo `pause` for one job or the whole queue."""
        ...

    def queue_paused(self) -> bool:
        ...

    def request_cancel(self, job_id: str, mode: CancelMode = CancelMode.NOW) -> JobRecord:
        """Cancel a job: a queued one ends `cancelled` now; a running one's worker reads the request.

        A later request only ever makes it more urgent.  `InvalidState` for an ended job.
        """
        ...

    def cancel_requested(self, job_id: str) -> CancelMode | None:
        """The most urgent cancel asked for this job, for its worker to act on."""
        ...

    def remove(self, job_id: str) -> None:
        """Forget a job that is not running, with its recorded stages (its files stay)."""
        ...

    def retry(self, job_id: str) -> JobRecord:
        """Queue a failed or cancelled job again, last in the queue, to resume at its first unfinished stage.

        Its stages, folder and attempts are kept; its error and cancel are cleared.
        `InvalidState` for a job that did not fail and was not cancelled.
        """
        ...

    # -- workers ------------------------------------------------------------

    def register_worker(self) -> WorkerInfo:
        """Register this process (its pid and host) as a worker; it must then `heartbeat`."""
        ...

    def heartbeat(self, worker_id: str) -> None:
        """Say the worker lives; `NotHeld` when it was counted gone and its jobs went back to the queue."""
        ...

    def unregister_worker(self, worker_id: str) -> None:
        """A worker leaving: its running jobs go back to the queue (as `release` does)."""
        ...

    def workers(self) -> list[WorkerInfo]:
        ...

    def recover(self) -> list[JobRecord]:
        """Take back the running jobs of workers that are gone (`WorkerInfo.gone`).

        Each goes back to the queue at its place, to resume at its first
        unfinished stage (or ends `cancelled` if a cancel that stops it was
        asked), with `lost_server` naming where it ran, so the next worker can
        interrupt a request that may still run there.  Returns those jobs.
        """
        ...

    # -- a worker's job -----------------------------------------------------

    def claim(self, worker_id: str, *, server: str | None = None, ids: Sequence[str] | None = None) -> JobRecord | None:
        """Take the next queued job for this worker (after a `recover`), or None.

        Without `ids`: the first job by priority and position that is not paused
        and not owned by another living worker, unless the queue is paused.  With
        `ids`: the first of those jobs that is queued and not paused, queue pause
        and owner aside.  The job becomes `running`, held by the worker, on
        `server`, its attempts counted.
        """
        ...

    def set_folder(self, job_id: str, worker_id: str, folder: Path) -> JobRecord:
        """Record the output folder of a held job, once; it never changes after."""
        ...

    def record_stage(self, job_id: str, worker_id: str, result: StageResult) -> JobRecord:
        """Record a stage of a held job, after its images are on disk.

        It must be the job's next stage (`JobRecord.check_stage`); a partial
        result is replaced when the stage runs again.
        """
        ...

    def finish(self, job_id: str, worker_id: str, outcome: JobState, error: str | None = None) -> JobRecord:
        """End a held job with a terminal `outcome` (and why, for a failure)."""
        ...

    def release(self, job_id: str, worker_id: str) -> JobRecord:
        """Hand a held job back to the queue, resumable at its first unfinished stage.

        A job with a cancel that stops it ends `cancelled` instead.
        """
        ...

    # -- the progress feed: what workers run, for watchers on any host ----------

    def publish(self, worker: str, events: Sequence[tuple[str, str, Mapping[str, Any]]]) -> None:
        """Append ``worker``'s events, each `(job id, kind, body)`, to the feed, in order, in one transaction.

        Two publishers' events never interleave, and a reader never sees a
        later one without the earlier ones.  On PostgreSQL this takes a lock of
        its own, not the queue's, and wakes every `wait_feed` at once.
        """
        ...

    def feed(self, after: int = 0, *, limit: int = FEED_BATCH) -> list[FeedEvent]:
        """The events published after the one numbered ``after`` (`FeedEvent.seq`), oldest first, at most ``limit``."""
        ...

    def wait_feed(self, after: int, timeout: float) -> bool:
        """Wait until an event after ``after`` is in the feed (True) or ``timeout`` seconds passed (False).

        PostgreSQL wakes at once (LISTEN/NOTIFY); SQLite looks every `FEED_POLL`
        seconds.  One thread at a time.
        """
        ...

    def prune_feed(self, keep: float) -> int:
        """Drop the events older than ``keep`` seconds, but those of a running job that are not
        progress (so a watcher started late still sees it start); returns how many it dropped."""
        ...

    def close(self) -> None:
        ...

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
