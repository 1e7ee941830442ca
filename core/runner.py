"""`Runner`: runs a queue of jobs, one after another, on one thread.

The runner's thread is the one writer: it alone fires machine triggers and
hooks.  Everything else reaches it as an event on one queue: the answer of the
request in flight and the probes' samples (each from a short-lived thread, so
the runner never waits on the network), progress samples from the poller's
thread, and cancels from any thread.  So a cancel is acted on at once, not at
the next poll, and a hanging progress request holds up neither a cancel nor,
beyond the job's `probe_timeout`, the generation request.
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

from sdjobs.hooks import Hooks
from sdjobs.job import Job, JobSettings
from sdjobs.outputs import JobFolder, new_job_id
from sdjobs.preflight import CatalogError, ServerCatalog, preflight
from sdjobs.spec import JobSpec
from sdjobs.status import CancelMode, JobState, ProgressInfo, TaskProgress

log = logging.getLogger(__name__)

# How long the runner sleeps between two looks at the clock when nothing happens.
_TICK = 0.5


class _Port:
    """One job's way out to the WebUI: calls on short-lived threads, answers as events.

    Every event is put on the runner's queue tagged with the job's id, so the
    answer of a request that a cancelled job stopped waiting for is dropped.
    """

    def __init__(self, client: WebUIClient, events: queue.SimpleQueue, job_id: str) -> None:
        self.client = client
        self._events = events
        self._job_id = job_id

    @property
    def task_tracking(self) -> bool:
        """Asked at each request; the client remembers a definite answer."""
        return self.client.supports_task_progress()

    def _put(self, event: str, *args: object) -> None:
        self._events.put((self._job_id, event, *args))

    def _in_background(self, name: str, call: Callable[[], None]) -> None:
        threading.Thread(target=call, name=f"sdjobs-{name}", daemon=True).start()

    def report(self, info: ProgressInfo | None, task: TaskProgress | None) -> None:
        self._put("sample", info, task)

    def probe(self, task_id: str | None) -> None:
        def sample() -> None:
            if task_id is None:
                self._put("probed", self.client.get_progress(), None)
            else:
                self._put("probed", None, self.client.internal_progress(task_id))

        self._in_background("probe", sample)

    def send(self, endpoint: str, payload: dict[str, Any], task_id: str | None) -> None:
        def post() -> None:
            try:
                result = self.client.generate(endpoint, payload, force_task_id=task_id)
            except Exception as exc:  # whatever it was, the job must hear of it
                self._put("failed", exc)
            else:
                self._put("returned", result)

        self._in_background(endpoint, post)

    def interrupt(self) -> None:
        try:
            self.client.interrupt()
        except WebUIError as exc:
            log.warning("could not interrupt: %s", exc)


@attrs.define(eq=False)
class Runner:
    """Runs ``specs`` in order against ``client``, writing under ``out_dir``.

    Implements the front ends' `Session`: `run` blocks until the queue drained,
    `cancel` may be called from any thread, a signal handler included (it only
    sets a flag and puts an event on a queue: no lock to deadlock on).
    """

    specs: Sequence[JobSpec]
    client: WebUIClient
    hooks: Hooks
    out_dir: Path
    settings: JobSettings = JobSettings()
    clock: Callable[[], float] = time.monotonic

    outcomes: dict[str, JobState] = attrs.field(factory=dict, init=False)
    _events: queue.SimpleQueue = attrs.field(factory=queue.SimpleQueue, init=False)
    _current: str | None = attrs.field(default=None, init=False)
    _stop_queue: bool = attrs.field(default=False, init=False)
    _drained: bool = attrs.field(default=False, init=False)
    _catalog: ServerCatalog | None = attrs.field(default=None, init=False)

    def run(self) -> None:
        now = datetime.now(UTC)
        rng = random.Random()
        queued = [(new_job_id(spec.name, now, rng), spec) for spec in self.specs]
        for job_id, spec in queued:
            self.hooks.job_queued(job_id, spec)
        for job_id, spec in queued:
            self._current = job_id
            if self._stop_queue:  # read after `_current` is set: see `cancel`
                break
            self.outcomes[job_id] = self._run_one(job_id, spec)
        self._current = None
        self._drained = True
        self.hooks.queue_drained(dict(self.outcomes))

    def cancel(self, mode: CancelMode = CancelMode.NOW, *, rest: bool = False) -> None:
        if self._drained:
            return  # everything has ended: nothing to cancel, and no reason to exit 130
        if rest or mode is CancelMode.AFTER_JOB:
            self._stop_queue = True  # set before `_current` is read, so no job slips through
        self._events.put((self._current, "cancel", CancelMode(mode)))

    @property
    def stopped(self) -> bool:
        """A cancel asked to run no further job."""
        return self._stop_queue

    def _run_one(self, job_id: str, spec: JobSpec) -> JobState:
        try:
            folder = JobFolder.create(self.out_dir, job_id)
        except OSError as exc:
            log.error("%s: cannot create the job's folder in %s: %s", spec.name, self.out_dir, exc)
            return JobState.FAILED
        job = Job(
            spec=spec,
            job_id=job_id,
            folder=folder,
            hooks=self.hooks,
            port=_Port(self.client, self._events, job_id),
            settings=self.settings,
            clock=self.clock,
        )
        self._handle(job, "begin")
        while not job.finished:
            self._dispatch(job)
        return job.outcome

    def _dispatch(self, job: Job) -> None:
        deadline = job.next_deadline
        timeout = _TICK if deadline is None else max(0.0, min(_TICK, deadline - self.clock()))
        try:
            job_id, event, *args = self._events.get(timeout=timeout)
        except queue.Empty:
            pass
        else:
            if job_id == job.job_id:  # else: for a job that has ended, or a cancel between jobs
                self._handle(job, event, *args)
        # Also after an event: samples may keep coming while nothing moves (a stall).
        self._handle(job, "tick")

    def _handle(self, job: Job, event: str, *args: object) -> None:
        """Hand ``event`` to the job; an error that is not the WebUI's fails the job, not the run."""
        try:
            if event == "begin":
                self._begin(job)
            else:
                getattr(job, event)(*args)
        except Exception as exc:
            log.debug("job %s failed on %s", job.job_id, event, exc_info=True)
            job.abort(exc)

    def _begin(self, job: Job) -> None:
        problems = self._preflight(job.spec)
        if problems:
            job.begin_failed("; ".join(problems))
        else:
            job.begin()

    def _preflight(self, spec: JobSpec) -> list[str]:
        try:
            if self._catalog is None:
                self._catalog = ServerCatalog.from_client(self.client)
        except (WebUIError, CatalogError) as exc:
            return [str(exc)]
        return preflight(spec, self._catalog)
