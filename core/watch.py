"""`sdjobs watch`: every worker's jobs, live, from any host that reaches the queue.

The `Watcher` reads the store's progress feed (what each worker's `Publisher`
wrote, `sdjobs.feed`) and calls the same hooks a worker's own front end gets:
`sdjobs_job_started`, `sdjobs_progress`, `sdjobs_stage_finished`,
`sdjobs_job_finished`..., each status naming the worker that runs the job
(`RuntimeStatus.worker`) and its server; and, as a worker does, the queue's
changes (`sdjobs_queue_changed`, ...).  So any front end and any plugin works
in a watcher unchanged.  It is a `Session` and a `QueueControl` for the front
ends: a cancel (Ctrl-C) stops the watching, never a job; pausing pauses the
queue for every worker.

On PostgreSQL a published event wakes the watcher at once (LISTEN/NOTIFY); on
a queue file it looks every `Store.wait_feed` poll.  It starts with what the
feed still keeps: the running jobs from their start, and the last
`feed.FEED_KEEP` seconds.
"""

from __future__ import annotations

import logging
import threading
import time

import attrs

from sdjobs.feed import replay
from sdjobs.hooks import Hooks
from sdjobs.queue_view import QueueView, nothing_to_run
from sdjobs.status import CancelMode, JobState, RuntimeStatus
from sdjobs.store import FEED_BATCH, FeedEvent, JobRecord, Store, StoreError, UnknownJob

log = logging.getLogger(__name__)

#: Seconds between two looks at the queue, and the longest wait for the feed.
WATCH_INTERVAL = 0.25


@attrs.define(eq=False)
class Watcher:
    """Shows what every worker of ``store`` runs, through ``hooks``, until stopped.

    Attributes:
        store: The queue.
        hooks: The front end's and the plugins'.
        until_empty: Stop once no job is queued or running (and every event of the
            jobs that ended is shown).
        interval: Seconds between two looks at the queue.
        outcomes: How each job seen ending ended, in the order they ended.
    """

    store: Store
    hooks: Hooks
    until_empty: bool = False
    interval: float = WATCH_INTERVAL
    outcomes: dict[str, JobState] = attrs.field(factory=dict, init=False)
    _stop: threading.Event = attrs.field(factory=threading.Event, init=False)
    _jobs: dict[str, JobRecord] = attrs.field(factory=dict, init=False)  # the running jobs seen, by id
    _announced: set[str] = attrs.field(factory=set, init=False)

    def run(self) -> None:
        """Watch until `stop` (or, with ``until_empty``, until nothing is left to run); `sdjobs_queue_drained` last."""
        view = QueueView(self.hooks)
        after, next_look = 0, 0.0
        try:
            while not self._stop.is_set():
                try:
                    empty = self.until_empty and nothing_to_run(self.store)  # before the feed: the ends are in it
                    if empty or time.monotonic() >= next_look:
                        view.look(self.store)
                        next_look = time.monotonic() + self.interval
                    events = self.store.feed(after)
                    for event in events:
                        self._show(event)
                        after = event.seq
                    if empty and len(events) < FEED_BATCH:
                        return
                    self.store.wait_feed(after, self.interval)
                except StoreError as exc:  # locked a while, or the server restarting: the next look may get through
                    log.warning("watching the queue: %s", exc)
                    self._stop.wait(self.interval)
        finally:
            self.hooks.queue_drained(dict(self.outcomes))

    def stop(self) -> None:
        """Stop watching (from any thread); the jobs go on."""
        self._stop.set()

    def cancel(self, mode: CancelMode = CancelMode.NOW, *, rest: bool = False) -> None:
        """A front end's cancel (Ctrl-C) stops the watching, not a job: `sdjobs queue cancel` does that."""
        self.stop()

    def pause_queue(self, *, now: bool = False) -> None:
        """Pause the queue for every worker (a front end's button); with ``now`` the running jobs go back to it."""
        self.store.pause(now=now)

    def resume_queue(self) -> None:
        self.store.resume()

    def _show(self, event: FeedEvent) -> None:
        record = self._record(event)
        if record is None:
            return  # removed from the queue since
        try:
            status = RuntimeStatus.from_dict(event.body["status"])
            status = attrs.evolve(status, worker=event.worker, server=status.server or record.server)
            if event.kind == "job_started" and record.id not in self._announced:
                self._announced.add(record.id)
                self.hooks.job_queued(record.id, record.spec)
            outcome = replay(event, record.spec, self.hooks, status)
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            log.warning("feed event %d of job %s cannot be read (%s); skipped", event.seq, event.job_id, exc)
            return
        if outcome is not None:
            self.outcomes[record.id] = outcome
            del self._jobs[record.id]

    def _record(self, event: FeedEvent) -> JobRecord | None:
        """The event's job, read again when it starts (it may run on another server than before)."""
        if event.kind == "job_started" or event.job_id not in self._jobs:
            try:
                self._jobs[event.job_id] = self.store.get(event.job_id)
            except UnknownJob:
                return None
        return self._jobs[event.job_id]
