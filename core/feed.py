"""The progress feed: the jobs a worker runs, as `sdjobs watch` on any host sees them.

A worker registers a `Publisher` among its plugins.  It turns each job hook
(started, stage started, progress, stage finished, stalled, WebUI unreachable,
finished) into an event in the store's feed (`Store.publish`), and `replay`
turns an event back into the same hook call, so a watcher's front ends and
plugins see every worker's jobs as a worker's own front end sees them.

Publishing never holds up a job: the hooks only queue their event, and a
thread of the publisher's writes what is queued at most every
`PUBLISH_INTERVAL` seconds, only the latest progress of each job.  A job's end
is the exception: it is written at once, on the runner's thread, so it is in
the feed before the store records the job's end, and a watcher that finds the
queue empty has every event of it.  Old events are dropped after each job's
end (`Store.prune_feed`, keeping `FEED_KEEP` seconds).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import attrs

from sdjobs.hookspecs import hookimpl
from sdjobs.hooks import Hooks
from sdjobs.spec import JobSpec
from sdjobs.status import JobState, RuntimeStatus, StageResult
from sdjobs.store import FeedEvent, Store, StoreError

log = logging.getLogger(__name__)

#: Seconds between two writes of a worker's queued events: progress reaches the feed a few times a second.
PUBLISH_INTERVAL = 0.25

#: Seconds the feed keeps events of ended jobs, and progress (`Store.prune_feed`).
FEED_KEEP = 120.0

#: The name a worker registers its publisher under.
PLUGIN_NAME = "sdjobs.feed"

Event = tuple[str, str, dict[str, Any]]


@attrs.define(eq=False)
class Publisher:
    """Writes the job hooks of one worker into ``store``'s feed; `start` it, and `stop` it after the last job.

    Attributes:
        store: The queue the worker runs from.
        worker: The worker's name as watchers show it (`"3fa2b1c0 on gpu1"`), read at every write.
        interval: Seconds between two writes.
    """

    store: Store
    worker: Callable[[], str]
    interval: float = PUBLISH_INTERVAL
    _pending: list[Event] = attrs.field(factory=list, init=False)
    _queued: threading.Lock = attrs.field(factory=threading.Lock, init=False)
    _writing: threading.Lock = attrs.field(factory=threading.Lock, init=False)  # so writes keep the hooks' order
    _wake: threading.Event = attrs.field(factory=threading.Event, init=False)
    _stop: threading.Event = attrs.field(factory=threading.Event, init=False)
    _thread: threading.Thread | None = attrs.field(default=None, init=False)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="sdjobs-publish", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Write what is left and stop the thread."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
        self._write()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait()
            self._wake.clear()
            self._write()
            self._stop.wait(self.interval)

    def _queue(self, job_id: str, kind: str, body: dict[str, Any]) -> None:
        """Queue an event; a progress replaces the job's progress still queued, when nothing of the job came after it."""
        with self._queued:
            last = next((index for index in range(len(self._pending) - 1, -1, -1) if self._pending[index][0] == job_id), None)
            if kind == "progress" and last is not None and self._pending[last][1] == "progress":
                self._pending[last] = (job_id, kind, body)
            else:
                self._pending.append((job_id, kind, body))
        self._wake.set()

    def _write(self) -> None:
        with self._writing:
            with self._queued:
                batch, self._pending = self._pending, []
            try:
                self.store.publish(self.worker(), batch)
            except StoreError as exc:  # the job goes on; watchers miss these events
                log.warning("publishing progress for sdjobs watch: %s", exc)

    @hookimpl
    def sdjobs_job_started(self, status: RuntimeStatus) -> None:
        self._queue(status.job_id, "job_started", {"status": status.to_dict()})

    @hookimpl
    def sdjobs_stage_started(self, status: RuntimeStatus) -> None:
        self._queue(status.job_id, "stage_started", {"status": status.to_dict()})

    @hookimpl
    def sdjobs_progress(self, status: RuntimeStatus) -> None:
        self._queue(status.job_id, "progress", {"status": status.to_dict()})

    @hookimpl
    def sdjobs_stage_finished(self, status: RuntimeStatus, result: StageResult) -> None:
        self._queue(status.job_id, "stage_finished", {"status": status.to_dict(), "result": result.to_dict()})

    @hookimpl
    def sdjobs_job_stalled(self, status: RuntimeStatus, seconds: float) -> None:
        self._queue(status.job_id, "job_stalled", {"status": status.to_dict(), "seconds": seconds})

    @hookimpl
    def sdjobs_webui_unreachable(self, status: RuntimeStatus, error: str, retry_in: float, waited: float) -> None:
        body = {"status": status.to_dict(), "error": error, "retry_in": retry_in, "waited": waited}
        self._queue(status.job_id, "webui_unreachable", body)

    @hookimpl
    def sdjobs_job_finished(
        self, status: RuntimeStatus, outcome: JobState, error: str | None, results: tuple[StageResult, ...]
    ) -> None:
        body = {"status": status.to_dict(), "outcome": str(outcome), "error": error,
                "results": [result.to_dict() for result in results]}  # fmt: skip
        self._queue(status.job_id, "job_finished", body)
        self._write()  # now: before the store records the end
        try:
            self.store.prune_feed(FEED_KEEP)
        except StoreError as exc:
            log.warning("pruning the progress feed: %s", exc)


def replay(event: FeedEvent, spec: JobSpec, hooks: Hooks, status: RuntimeStatus) -> JobState | None:
    """Call the hook ``event`` stands for, with ``status`` (read from it, filled in by the watcher) and
    the job's ``spec``; returns the outcome of a `job_finished`.  An event of a kind this sdjobs does
    not know (a newer worker's) is skipped.  Raises KeyError, TypeError or ValueError for a body the
    publisher did not write."""
    body = event.body
    match event.kind:
        case "job_started":
            hooks.job_started(status, spec)
        case "stage_started":
            hooks.stage_started(status, spec.stages[status.stage_index])
        case "progress":
            hooks.progress(status)
        case "stage_finished":
            hooks.stage_finished(status, StageResult.from_dict(body["result"]))
        case "job_stalled":
            hooks.job_stalled(status, body["seconds"])
        case "webui_unreachable":
            hooks.webui_unreachable(status, body["error"], body["retry_in"], body["waited"])
        case "job_finished":
            outcome = JobState(body["outcome"])
            results = tuple(StageResult.from_dict(result) for result in body["results"])
            hooks.job_finished(status, outcome, body["error"], results)
            return outcome
        case _:
            log.debug("feed event %d: unknown kind %r, skipped", event.seq, event.kind)
    return None
