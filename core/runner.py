"""`Runner`: runs a queue of jobs, one after another, on one thread.

The runner's thread is the one writer: it alone fires machine triggers and
hooks.  Everything else reaches it as an event on a queue: the answer of the
request in flight (sent from a short-lived thread, so the runner never blocks on
it), progress samples from the poller's thread, and cancels from any thread.
So a cancel is acted on at once, not at the next poll, and a hanging progress
request can never hold up the generation request or a cancel.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import attrs

from sdjobs.client import WebUIClient, WebUIError
from sdjobs.frontend import CancelMode
from sdjobs.hooks import Hooks
from sdjobs.job import Job, JobSettings
from sdjobs.outputs import JobFolder, new_job_id
from sdjobs.preflight import ServerCatalog, preflight
from sdjobs.spec import JobSpec
from sdjobs.status import JobState, ProgressInfo, TaskProgress

log = logging.getLogger(__name__)

# How long the runner sleeps between two looks at the clock when nothing happens.
_TICK = 0.5


class _Port:
    """A job's way out to the WebUI: requests on their own threads, answers as events."""

    def __init__(self, client: WebUIClient, events: queue.SimpleQueue) -> None:
        self.client = client
        self._events = events

    @property
    def task_tracking(self) -> bool:
        """Asked at the first request, when the preflight has found the server up:
        the client remembers the answer, so an unreachable server must not give it."""
        return self.client.supports_task_progress()

    def report(self, info: ProgressInfo | None, task: TaskProgress | None) -> None:
        self._events.put(("sample", info, task))

    def sample(self, task_id: str | None) -> tuple[ProgressInfo | None, TaskProgress | None]:
        if task_id is None:
            return self.client.get_progress(), None
        return None, self.client.internal_progress(task_id)

    def send(self, endpoint: str, payload: dict[str, Any], task_id: str | None) -> None:
        def post() -> None:
            try:
                result = self.client.generate(endpoint, payload, force_task_id=task_id)
            except WebUIError as exc:
                self._events.put(("failed", exc))
            else:
                self._events.put(("returned", result))

        threading.Thread(target=post, name=f"sdjobs-{endpoint}", daemon=True).start()

    def interrupt(self) -> None:
        try:
            self.client.interrupt()
        except WebUIError as exc:
            log.warning("could not interrupt: %s", exc)


@attrs.define(eq=False)
class Runner:
    """Runs ``specs`` in order against ``client``, writing under ``out_dir``.

    Implements the front ends' `Session`: `run` blocks until the queue drained,
    `cancel` may be called from any thread.
    """

    specs: Sequence[JobSpec]
    client: WebUIClient
    hooks: Hooks
    out_dir: Path
    settings: JobSettings = JobSettings()
    clock: Callable[[], float] = time.monotonic

    outcomes: dict[str, JobState] = attrs.field(factory=dict, init=False)
    _ids: list[str] = attrs.field(factory=list, init=False)
    _lock: threading.Lock = attrs.field(factory=threading.Lock, init=False)
    _events: queue.SimpleQueue | None = attrs.field(default=None, init=False)
    _stop_queue: bool = attrs.field(default=False, init=False)
    _catalog: ServerCatalog | None = attrs.field(default=None, init=False)

    def run(self) -> None:
        now = datetime.now(UTC)
        rng = random.Random()
        self._ids = [new_job_id(spec.name, now, rng) for spec in self.specs]
        for job_id, spec in zip(self._ids, self.specs):
            self.hooks.job_queued(job_id, spec)
        for job_id, spec in zip(self._ids, self.specs):
            if self._stop_queue:
                break
            self.outcomes[job_id] = self._run_one(job_id, spec)
        self.hooks.queue_drained(dict(self.outcomes))

    def cancel(self, mode: CancelMode = CancelMode.NOW, *, rest: bool = False) -> None:
        with self._lock:
            if rest:
                self._stop_queue = True
            if self._events is not None:
                self._events.put(("cancel", CancelMode(mode)))

    @property
    def stopped(self) -> bool:
        """A cancel asked to run no further job."""
        return self._stop_queue

    def _run_one(self, job_id: str, spec: JobSpec) -> JobState:
        events: queue.SimpleQueue = queue.SimpleQueue()
        job = Job(
            spec=spec,
            job_id=job_id,
            folder=JobFolder.create(self.out_dir, job_id),
            hooks=self.hooks,
            port=_Port(self.client, events),
            settings=self.settings,
            clock=self.clock,
        )
        with self._lock:
            self._events = events
        try:
            problems = self._preflight(spec)
            if problems:
                job.begin_failed("; ".join(problems))
            else:
                job.begin()
            while not job.finished:
                self._dispatch(job, events)
        finally:
            with self._lock:
                self._events = None
            job.folder.write_manifest(
                spec, job.results, outcome=job.outcome or "unfinished", error=job.error
            )
        return job.outcome

    def _dispatch(self, job: Job, events: queue.SimpleQueue) -> None:
        deadline = job.next_deadline
        timeout = _TICK if deadline is None else max(0.0, min(_TICK, deadline - self.clock()))
        try:
            event, *args = events.get(timeout=timeout)
        except queue.Empty:
            pass
        else:
            getattr(job, event)(*args)
        # Also after an event: samples may keep coming while nothing moves (a stall).
        job.tick()

    def _preflight(self, spec: JobSpec) -> list[str]:
        try:
            if self._catalog is None:
                self._catalog = ServerCatalog.from_client(self.client)
        except WebUIError as exc:
            return [str(exc)]
        return preflight(spec, self._catalog)
