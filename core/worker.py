"""`Worker`: runs jobs from the store, one at a time, until stopped.

A worker registers in the store, keeps a heartbeat going on a thread of its own
(every `lease`/4, so it is never counted gone while it lives), and claims one
job after another, each run by a `Runner` (`Runner.run_held`) from its first
unfinished stage.  When nothing is queued it waits for the next poll of the
store, on an event, so that a stop is acted on at once.

`sdjobs worker` runs every job of the queue; `sdjobs run` adds its files for
itself (the worker owns them, so no other worker takes them while it lives)
and runs only those.  A worker is the front ends' `Session` and `QueueControl`:

- ``cancel(NOW, rest=True)`` (the first Ctrl-C) cancels the running job and
  runs no further one; the jobs `sdjobs run` added and never started end
  cancelled, the other queued jobs stay queued.
- `hand_back` (SIGTERM, a second Ctrl-C) interrupts our running request and
  hands the job back to the queue, resumable at its first unfinished stage.

A job that failed because the WebUI stayed unreachable (`Runner.webui_down`)
makes the worker claim nothing more until the WebUI answers a ping again, so
the next jobs do not each wait `JobSettings.wait_for_webui` and fail; with
``until_empty`` (or `sdjobs run`) it stops instead, leaving the jobs queued.

With several servers (`lanes`) the worker runs one job per server at once,
each on the server `Lanes.pick` chooses for it; a server found down has its
job let go, and the worker hands it back to the queue, where a server that
fits takes it.  With one server it runs as described above.

While it runs, a watch thread looks at the store every `watch_interval`, so
that what another process asks (`sdjobs queue cancel`, `pause --now`) is acted
on within a second: a cancel of the running job reaches the runner; a recall
(`JobRecord.recall`) lets the job go and hands it back to the queue; and the
front ends hear of the queue's changes (`sdjobs_queue_changed`,
`sdjobs_history_changed`, `sdjobs_queue_paused`, `sdjobs_queue_resumed`).

Its jobs' hooks also go into the store's progress feed (a `feed.Publisher`
among the plugins while it runs), where `sdjobs watch` on any host reads them.

On a PostgreSQL queue, `sdjobs worker` is a Procrastinate worker instead
(`sdjobs.dispatch`): Procrastinate hands it the jobs, one per server at once,
and a cancel or a recall reaches it as Procrastinate's abort over LISTEN/NOTIFY;
the watch thread then only tells the front ends, every `DISPATCHED_WATCH_INTERVAL`.
Heartbeat, claims, fencing and hand-backs are the same.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Sequence

import attrs
from sdjobs.client import WebUIError
from sdjobs.feed import PLUGIN_NAME as PUBLISHER_NAME
from sdjobs.feed import Publisher
from sdjobs.history import ServerHistory
from sdjobs.job import PING_BACKOFF
from sdjobs.lanes import Lane, Lanes, unroutable
from sdjobs.outputs import SHORT_ID_LENGTH
from sdjobs.queue_view import QueueView, nothing_to_run
from sdjobs.runner import Runner
from sdjobs.spec import JobSpec
from sdjobs.status import CancelMode, JobState
from sdjobs.store import DEFAULT_LEASE, JobRecord, NotHeld, Store, StoreError, stops_job

log = logging.getLogger(__name__)

#: Seconds an idle worker waits before it looks at the store again.
DEFAULT_IDLE_POLL = 1.0

#: Seconds between two looks of the watch thread at the store.
DEFAULT_WATCH_INTERVAL = 0.25

#: Seconds between two looks of a dispatched worker's watch thread (it only tells the front ends).
DISPATCHED_WATCH_INTERVAL = 1.0


@attrs.frozen
class HandedBack:
    """What a worker stopped by `Worker.hand_back` left in the queue.

    Attributes:
        job: The job it was running, back in the queue; None if it ran none.
        waiting: How many of the jobs it would have run next stay queued.
    """

    job: JobRecord | None
    waiting: int

    def describe(self) -> str:
        """`"interrupted: job 3fa2b1c0 will resume at stage 2; 3 jobs stay queued"`."""
        resumes = (
            f"job {self.job.short_id} will resume at stage {self.job.next_stage + 1}; "
            if self.job
            else ""
        )
        return f"interrupted: {resumes}{self.waiting} job{'s' * (self.waiting != 1)} stay{'s' * (self.waiting == 1)} queued"


@attrs.define(eq=False)
class Worker:
    """Claims jobs from ``store`` and runs them with ``runner``.

    Attributes:
        store: The queue.
        runner: Runs each claimed job; its hooks are the front ends'.  With
            ``lanes``, the first lane's runner.
        add: Jobs to add for this worker alone (`sdjobs run`): it then runs only
            those, and stops when none of them is left queued.
        until_empty: Stop when no job is queued or running, instead of waiting for more.
        pause_after_crash: On start, if a worker that died (`kill -9`, a crash) left jobs running,
            pause the queue (`Store.pause`) rather than resume them: a person looks first.
        lease: The store's lease; the heartbeat beats four times in it.
        idle_poll: Seconds between two looks at an empty queue (a change the
            watch thread sees ends the wait sooner).
        watch_interval: Seconds between two looks of the watch thread at the store.
        lanes: Several servers, each with its runner: a job on each at once.
        gave_up: With ``lanes``, it stopped because the jobs left wait for servers
            down longer than `JobSettings.wait_for_webui` (they stay queued).
    """

    store: Store
    runner: Runner = None  # type: ignore[assignment]  # with lanes: set from them
    add: Sequence[JobSpec] = ()
    until_empty: bool = False
    pause_after_crash: bool = False
    lease: float = DEFAULT_LEASE
    idle_poll: float = DEFAULT_IDLE_POLL
    watch_interval: float = DEFAULT_WATCH_INTERVAL
    lanes: Lanes | None = None

    handed_back: HandedBack | None = attrs.field(default=None, init=False)
    gave_up: bool = attrs.field(default=False, init=False)
    _ids: list[str] | None = attrs.field(default=None, init=False)
    _announced: set[str] = attrs.field(factory=set, init=False)
    _last: str | None = attrs.field(default=None, init=False)
    _worker_id: str = attrs.field(default="", init=False)
    _host: str = attrs.field(factory=socket.gethostname, init=False)
    _rejoining: threading.Lock = attrs.field(factory=threading.Lock, init=False)
    _stop: threading.Event = attrs.field(factory=threading.Event, init=False)
    _wake: threading.Event = attrs.field(factory=threading.Event, init=False)
    _running: str | None = attrs.field(default=None, init=False)
    _switch: threading.Lock = attrs.field(factory=threading.Lock, init=False)
    _error: BaseException | None = attrs.field(default=None, init=False)
    _ended: dict[str, JobState] = attrs.field(factory=dict, init=False)

    def __attrs_post_init__(self) -> None:
        if self.lanes is not None:
            self.runner = self.lanes.runners[0]
        elif self.runner is None:
            raise TypeError("Worker needs a runner, or lanes")

    @property
    def runners(self) -> list[Runner]:
        """The runner of each server."""
        return [self.runner] if self.lanes is None else self.lanes.runners

    @property
    def outcomes(self) -> dict[str, JobState]:
        """How each job this worker ran ended, in the order they ended."""
        return self.runner.outcomes if self.lanes is None else dict(self._ended)

    @property
    def stopped(self) -> bool:
        """A cancel or a hand-back asked to run no further job."""
        return self.runner.stopped

    @property
    def handing_back(self) -> bool:
        """`hand_back` was asked: the running job goes back to the queue."""
        return self.runner.handing_back

    def cancel(self, mode: CancelMode = CancelMode.NOW, *, rest: bool = False) -> None:
        """As `Runner.cancel` (each server's); with ``rest`` (or "after this job") an idle worker stops at once too."""
        for runner in self.runners:
            runner.cancel(mode, rest=rest)
        if self.runner.stopped:
            self._stop.set()
            self._wake.set()

    def hand_back(self) -> None:
        """Stop, handing the running jobs back to the queue (see `Runner.hand_back`); from any thread."""
        for runner in self.runners:
            runner.hand_back()
        self._stop.set()
        self._wake.set()

    def pause_queue(self, *, now: bool = False) -> None:
        """Pause the queue for every worker on it (a front end's button); with ``now`` the running
        job goes back to the queue too.  `sdjobs run`'s own jobs are not held back."""
        self.store.pause(now=now)

    def resume_queue(self) -> None:
        """Resume the paused queue."""
        self.store.resume()

    def run(self) -> None:
        """Run jobs until stopped; on the main thread, a `KeyboardInterrupt` hands the running job back.

        The jobs run on a thread of their own, so that the interrupt never lands
        inside a store transaction; this thread waits for it.  An error that
        stopped the worker (a `StoreError`) is raised here.
        """
        work = threading.Thread(target=self._work, name="sdjobs-worker")
        work.start()
        try:
            work.join()
        except KeyboardInterrupt:
            self.hand_back()
            work.join()
            raise
        if self._error is not None:
            raise self._error

    def _work(self) -> None:
        try:
            self._worker_id = self.store.register_worker().id
        except StoreError as exc:
            self._error = exc
            self.runner.hooks.queue_drained({})
            return
        beating = threading.Thread(
            target=self._heartbeat, name="sdjobs-heartbeat", daemon=True
        )
        beating.start()
        watching = threading.Thread(target=self._watch, name="sdjobs-watch", daemon=True)
        publisher = Publisher(self.store, self._name)
        self.runner.hooks.pm.register(publisher, name=f"{PUBLISHER_NAME}:{self._worker_id[:SHORT_ID_LENGTH]}")
        publisher.start()
        try:
            self._pause_after_crash()
            self._add_own()
            watching.start()  # after `sdjobs run`'s jobs are queued: its first look shows them
            if self.dispatched:
                self._serve_dispatched()
            elif self.lanes is None:
                self._claim_and_run()
            else:
                self._run_lanes(self.lanes)
        except Exception as exc:  # noqa: BLE001  (raised again on the thread that runs the worker)
            self._error = exc
        finally:
            self._stop.set()
            beating.join()
            if watching.ident is not None:
                watching.join()
            if self.lanes is not None:
                self.lanes.join_health()
            publisher.stop()
            self.runner.hooks.pm.unregister(publisher)
            self._leave()
            self.runner.hooks.queue_drained(dict(self.outcomes))

    def _name(self) -> str:
        """`"3fa2b1c0 on gpu1"`: this worker as `sdjobs watch` names it."""
        return f"{self._worker_id[:SHORT_ID_LENGTH]} on {self._host}"

    @property
    def dispatched(self) -> bool:
        """Procrastinate hands this worker its jobs: `sdjobs worker` on a PostgreSQL queue."""
        return self._ids is None and callable(getattr(self.store, "conninfo", None))

    def _serve_dispatched(self) -> None:
        """Run the jobs Procrastinate hands over, one per server at once, until stopped (see `sdjobs.dispatch`)."""
        from sdjobs.dispatch import Dispatch

        if self.lanes is not None:
            self.lanes.changed = self._wake.set
            self.lanes.check_health(self._stop)
            while not self._stop.is_set() and any(lane.up is None for lane in self.lanes.lanes):
                self._wake.wait(self.idle_poll)  # each server's lists known first, to route the first jobs
                self._wake.clear()
        try:
            Dispatch(self.store.conninfo(), len(self.runners), self._run_dispatched, self._act_on_requests,  # type: ignore[attr-defined]
                     self._tick, self.lease, interval=self.idle_poll).serve()  # fmt: skip
        finally:
            if self.lanes is not None:
                self.lanes.join_jobs()

    def _run_dispatched(self, job_id: str) -> None:
        """Claim the job Procrastinate handed over and run it on a free server that fits it; a job that is
        not queued any more (taken, paused, ended) is let be.  `PassOn` when no free server here should run it.

        An error the claim loop would stop on stops the worker the same way (`run` raises it; the job
        goes back to the queue as it leaves); Procrastinate hands the job on.
        """
        from sdjobs.dispatch import PassOn

        try:
            self._claim_dispatched(job_id)
        except PassOn:
            raise
        except Exception as exc:  # noqa: BLE001  (raised again by `run`)
            self._error = exc
            self._stop.set()
            raise PassOn("this worker stops") from None

    def _claim_dispatched(self, job_id: str) -> None:
        from sdjobs.dispatch import PassOn

        if self.runner.stopped:
            raise PassOn("this worker is stopping")
        lane = None
        if self.lanes is not None:
            record = self.store.get(job_id)
            if record.state is not JobState.QUEUED:
                return
            if unroutable(record.spec, record.next_stage, self.lanes.lanes) or (lane := self.lanes.take(record)) is None:
                raise PassOn(f"no free server here takes job {record.short_id}")  # another worker's may
        server = self.runner.client.base_url if lane is None else lane.server.url  # as `Store.claim` records them
        worker_id = self._worker_id
        claimed = None
        try:
            claimed = self.store.claim(worker_id, server=server, ids=[job_id])
        except NotHeld:
            self._rejoin(worker_id)
            raise PassOn("this worker registered again") from None
        finally:
            if lane is not None and claimed is None:
                self.lanes.put_back(lane)
        if claimed is None:
            return
        self._announce(claimed)
        self._last = claimed.id
        if lane is not None:
            lanes = self.lanes
            self._lane_ended(lane, claimed, lanes.run(lane, claimed, lambda _, job: lanes.run_held(lane, self.store, worker_id, job)))
            return
        if not self._run_held(claimed, worker_id):
            self._stop.set()  # `sdjobs worker --until-empty` stops (the jobs not run stay queued)

    def _tick(self) -> bool:
        """Every second of a dispatched worker: take back the jobs of workers that are gone, which the
        store dispatches again; True when the worker is to stop (a stop asked, or with ``until_empty``
        no job is queued or running, a lost worker's counted as running until it is taken back)."""
        try:
            self.store.recover()
            if self._stop.is_set() or self.runner.stopped:
                return True
            busy = self._running is not None or (self.lanes is not None and self.lanes.busy)
            if busy or not self.until_empty:
                return False
            return nothing_to_run(self.store) or (self.lanes is not None and self._gives_up(self.lanes))
        except StoreError as exc:  # locked a while: the next tick may get through
            log.warning("watching the queue: %s", exc)
            return False

    def _pause_after_crash(self) -> None:
        if self.pause_after_crash and (lost := self.store.recover()):
            self.store.pause()
            names = ", ".join(f"{job.short_id} ({job.spec.name})" for job in lost)
            log.warning("a worker died with jobs running (%s): the queue is paused; 'sdjobs queue resume' goes on",
                        names)  # fmt: skip

    def _add_own(self) -> None:
        if self.add:
            self._ids = [
                record.id for record in self.store.add(self.add, owner=self._worker_id)
            ]
            for record in map(self.store.get, self._ids):
                self._announce(record)

    def _claim_and_run(self) -> None:
        server = self.runner.client.base_url  # without credentials
        while not self.runner.stopped:
            worker_id = self._worker_id
            try:
                record = self.store.claim(worker_id, server=server, ids=self._ids)
            except NotHeld:
                self._rejoin(worker_id)
                continue
            if record is None:
                if self._ids is not None or (self.until_empty and nothing_to_run(self.store)):
                    return
                self._wake.wait(self.idle_poll)
                self._wake.clear()
                continue
            self._announce(record)
            self._last = record.id
            if not self._run_held(record, worker_id):
                return

    def _run_held(self, record: JobRecord, worker_id: str) -> bool:
        """Run a claimed job on the worker's one server; False when the WebUI stayed down, so the
        worker should start no other job."""
        with self._switch:
            self._running = record.id
        outcome = self.runner.run_held(self.store, worker_id, record)
        with self._switch:
            self._running = None
        if outcome is None:
            self._hand_over(record, worker_id)
        return not (outcome is JobState.FAILED and self.runner.webui_down and not self._wait_for_webui())

    def _run_lanes(self, lanes: Lanes) -> None:
        """Start on each free server the job `Lanes.pick` chose for it, until stopped (or, with
        ``until_empty`` or `sdjobs run`'s own jobs, until none is left to run)."""
        lanes.changed = self._wake.set
        for lane in lanes.lanes:
            lane.history = ServerHistory.load(self.store, lane.server.url)
        lanes.check_health(self._stop)
        try:
            while not self.runner.stopped:
                picked = lanes.pick(self._claimable())
                if picked is not None:
                    self._start_on(lanes, *picked)
                    continue
                if not lanes.busy and self._nothing_left():
                    return
                if not lanes.busy and self._gives_up(lanes):
                    return
                self._wake.wait(self.idle_poll)
                self._wake.clear()
        finally:
            lanes.join_jobs()

    def _gives_up(self, lanes: Lanes) -> bool:
        """With ``until_empty`` or `sdjobs run`'s own jobs, the jobs left wait for servers that have been
        down for `JobSettings.wait_for_webui`: stop, leaving them queued (as one server's worker does)."""
        if not (self.until_empty or self._ids is not None) or not lanes.down_for(self.runner.settings.wait_for_webui):
            return False
        log.warning("servers down for %g s: the worker stops; the jobs not run stay queued", self.runner.settings.wait_for_webui)
        self.gave_up = True
        return True

    def _claimable(self) -> list[JobRecord]:
        """The queued jobs this worker may claim, in queue order (as `Store.claim` would take them),
        after taking back the jobs of workers that are gone (as every `Store.claim` does first): a
        lost worker's job is queued again even when no other job is queued to claim."""
        self.store.recover()
        jobs = self.store.list()
        if self._ids is not None:
            return [job for job in jobs if job.id in self._ids and job.state is JobState.QUEUED and not job.paused]
        if self.store.queue_paused():
            return []
        live = {worker.id for worker in self.store.workers()}
        return [job for job in jobs if job.state is JobState.QUEUED and not job.paused
                and (job.owner is None or job.owner == self._worker_id or job.owner not in live)]  # fmt: skip

    def _nothing_left(self) -> bool:
        """With ``until_empty`` or own jobs: none is left that this worker would run."""
        if self._ids is not None:
            return not any(job.id in self._ids and not job.ended for job in self.store.list())
        return self.until_empty and nothing_to_run(self.store)

    def _start_on(self, lanes: Lanes, record: JobRecord, lane: Lane) -> None:
        """Claim ``record`` for ``lane``'s server and run it there; taken by another worker meanwhile: nothing."""
        worker_id = self._worker_id
        try:
            claimed = self.store.claim(worker_id, server=lane.server.url, ids=[record.id])
        except NotHeld:
            self._rejoin(worker_id)
            return
        if claimed is None:
            return
        self._announce(claimed)
        self._last = claimed.id
        lanes.start(lane, claimed, lambda runner, job: lanes.run_held(lane, self.store, worker_id, job), self._lane_ended)

    def _lane_ended(self, lane: Lane, record: JobRecord, outcome: JobState | None) -> None:
        """A lane's job ended (on its thread): recorded, or handed back to the queue when let go (or
        passed on, for its next stage to run elsewhere); the server's history learns from it."""
        if outcome is None:
            self._hand_over(record, record.worker or self._worker_id)
        else:
            self._ended[record.id] = outcome
        try:
            lane.history = ServerHistory.load(self.store, lane.server.url)
        except StoreError as exc:  # locked a while: the lane keeps what it knew
            log.warning("reading the history of server %s: %s", lane.server.name, exc)
        self._wake.set()

    def _wait_for_webui(self) -> bool:
        """The WebUI stayed unreachable through a whole job: ping it with backoff (on a thread of its
        own, as a ping may take its connect timeout) until it answers; True then, False when the worker
        is to stop instead: with ``until_empty`` or `sdjobs run`'s own jobs, or once stopped meanwhile."""
        waited = f"WebUI unreachable for {self.runner.settings.wait_for_webui:g} s"
        if self.until_empty or self._ids is not None:
            log.warning("%s: the worker stops; the jobs not run stay queued", waited)
            return False
        log.warning("%s: the queue waits until it answers", waited)
        back = threading.Event()
        threading.Thread(target=self._ping_until_back, args=(back,), name="sdjobs-ping", daemon=True).start()
        while not (back.is_set() or self._stop.is_set()):
            self._wake.wait()  # set by `back`, a stop, or a change of the queue
            self._wake.clear()
        if back.is_set():
            log.info("the WebUI answers again: the queue goes on")
        return back.is_set()

    def _ping_until_back(self, back: threading.Event) -> None:
        """Ping the WebUI with `PING_BACKOFF` until it answers (then set ``back``) or the worker stops."""
        wait = PING_BACKOFF[0]
        while not self._stop.wait(wait):
            try:
                self.runner.client.ping()
            except WebUIError as exc:
                log.debug("the WebUI is still unreachable: %s", exc)
                wait = min(wait * 2, PING_BACKOFF[1])
            else:
                back.set()
                self._wake.set()
                return

    def _hand_over(self, record: JobRecord, worker_id: str) -> None:
        """The runner let a job go (a recall) that the store may still count as ours: back to the queue.

        Any other way a job ends without an outcome (a hand-back, a stage passed on
        to another server, another worker holding it now) has left it out of our
        hands already: it is queued, or claimed again since (more attempts; maybe by
        another lane of this worker, with the same worker id), or `NotHeld`.
        """
        job = self.store.get(record.id)
        if job.state is not JobState.RUNNING or job.attempts != record.attempts:
            return
        try:
            self.store.release(record.id, worker_id)
        except NotHeld:
            pass

    def _watch(self) -> None:
        """Look at the store every `watch_interval` until the worker stops (see the module's doc)."""
        shown = QueueView(self.runner.hooks, servers=tuple(runner.client.base_url for runner in self.runners))
        self._look(shown)
        interval = max(self.watch_interval, DISPATCHED_WATCH_INTERVAL) if self.dispatched else self.watch_interval
        while not self._stop.wait(interval):
            self._look(shown)
        self._look(shown)  # the queue as the worker leaves it, before `sdjobs_queue_drained`

    def _look(self, shown: QueueView) -> None:
        try:
            if not self.dispatched:  # a dispatched worker hears of requests as Procrastinate's aborts
                self._act_on_requests()
            if shown.look(self.store, self._ids):  # a change wakes an idle worker
                self._wake.set()
        except StoreError as exc:  # locked a while: the next look may get through
            log.warning("watching the queue: %s", exc)

    def _act_on_requests(self, job_id: str | None = None) -> None:
        """Pass a cancel or a recall of the running jobs (or only of ``job_id``) to their runners; again at
        every look while one runs, as the runner drops one that came between two jobs (repeats are harmless).

        Under `_switch`, so that a request read for one job never reaches the next one.
        """
        try:
            if self.lanes is not None:
                self.lanes.each_running(lambda runner, job: job_id in (None, job.id) and self._pass_request(runner, job.id))
                return
            with self._switch:
                if self._running is not None and job_id in (None, self._running):
                    self._pass_request(self.runner, self._running)
        except StoreError as exc:  # locked a while: the next pass may get through
            log.warning("watching the queue: %s", exc)

    def _pass_request(self, runner: Runner, job_id: str) -> None:
        job = self.store.get(job_id)
        if job.recall:
            runner.let_go()
        elif stops_job(job.cancel):
            runner.cancel(job.cancel)

    def _rejoin(self, gone: str) -> None:
        """The store counted worker ``gone`` (this one) gone: register anew, once, whichever thread saw it first."""
        with self._rejoining:
            if self._worker_id == gone:
                log.warning(
                    "%s: this worker was counted gone; it registers again",
                    self.store.location,
                )
                self._worker_id = self.store.register_worker().id

    def _announce(self, record: JobRecord) -> None:
        if record.id not in self._announced:
            self._announced.add(record.id)
            self.runner.hooks.job_queued(record.id, record.spec)

    def _heartbeat(self) -> None:
        """Beat until the worker stops; if the store counted it gone, its running job is let go
        (another worker may hold it by now) and the worker registers again."""
        while not self._stop.wait(self.lease / 4):
            worker_id = self._worker_id
            try:
                self.store.heartbeat(worker_id)
            except NotHeld:
                for runner in self.runners:
                    runner.let_go()
                self._rejoin(worker_id)
            except StoreError as exc:  # locked a while: the next beat may get through
                log.warning("heartbeat: %s", exc)

    def _leave(self) -> None:
        """Unregister; the jobs `sdjobs run` added and never started end cancelled after a cancel,
        stay queued after a hand-back."""
        try:
            self.store.unregister_worker(
                self._worker_id
            )  # a job it still held goes back to the queue
            waiting = [job for job in self.store.list() if job.state is JobState.QUEUED
                       and (self._ids is None or job.id in self._ids)]  # fmt: skip
            if self.runner.handing_back:
                last = next((job for job in waiting if job.id == self._last), None)
                self.handed_back = HandedBack(last, len(waiting) - (last is not None))
            elif self.runner.stopped and self._ids is not None:
                for job in waiting:
                    self.store.request_cancel(job.id)
        except StoreError as exc:
            log.warning("leaving the queue: %s", exc)
