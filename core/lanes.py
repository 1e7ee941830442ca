"""Lanes: one worker running jobs on several WebUI servers, one job per server at a time.

Each server is a `Lane`: its own `Runner` (so its own client and job thread),
whether it is up, what it offers (its `ServerCatalog`) and the job it runs.
`Lanes` owns them all:

- **health**: a thread per lane pings its server every `health_interval` while
  it is up.  A ping that fails (refused, dropped, a gateway's 502/503/504, or no
  answer in the client's time: hung) marks the lane down (`sdjobs_server_down`)
  and lets its running job go (`Runner.let_go`), which the worker hands back to
  the queue at its first unfinished stage; a down lane is pinged with backoff
  (`PING_BACKOFF`) and, once it answers, marked up again (`sdjobs_server_up`)
  with its lists asked anew (`Runner.ask_lists`: its jobs' checks use them, and
  ask again on a miss).  Letting a job go never interrupts a request that
  cannot be shown to be ours: the job's cancel asks the server first, and a
  server that does not answer is not interrupted.
- **routing**: `pick` takes the first queued job that a free, up lane can run
  from its first unfinished stage: the stage may run there (`ServerConfig.takes`:
  its `server` and `tags`), and so may the stages after it that the lane would
  run too (up to the first that must run elsewhere: the job then goes back to
  the queue after them, its images passed on through its folder), and their
  checkpoints, samplers, upscalers and ADetailer are on that server (`preflight`
  finds nothing).  Among the free lanes that fit, the one whose history says it
  runs the stage soonest wins (`ServerHistory.stage_seconds`), when every one's
  history knows; else the least busy: fewest jobs started for its weight.  A job
  that fits a busy or down lane waits for it; a job that fits no server at all
  (every server's lists known) goes to any free one, whose checks then fail it
  saying why.

The worker (`sdjobs.worker.Worker`) claims what `pick` chose and runs it with
`start`; everything about the queue (claims, heartbeat, hand-back) stays there.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence

import attrs
from sdjobs.client import WebUIError
from sdjobs.history import ServerHistory
from sdjobs.job import PING_BACKOFF
from sdjobs.preflight import CatalogError, ServerCatalog, preflight
from sdjobs.runner import Runner
from sdjobs.servers import ServerConfig, route_problem
from sdjobs.spec import JobSpec
from sdjobs.status import JobState
from sdjobs.store import JobRecord, Store

log = logging.getLogger(__name__)

#: Seconds between two health checks of a server that is up.
DEFAULT_HEALTH_INTERVAL = 2.0


@attrs.define(eq=False)
class Lane:
    """One server and the runner that runs its jobs.

    Attributes:
        server: Which server.
        runner: Runs this lane's jobs, one at a time, against the server.
        up: It answered its last health check; None before the first one.
        catalog: What it offers, asked when it came up; None until then.
        job: The job it runs now, if any.
        started: How many jobs it started, for the least-busy choice.
        down_since: `time.monotonic()` when it was found down, while it is.
        history: What the server's history says of its speed; None: nothing yet.
    """

    server: ServerConfig
    runner: Runner
    up: bool | None = None
    catalog: ServerCatalog | None = None
    job: JobRecord | None = None
    started: int = 0
    down_since: float | None = None
    history: ServerHistory | None = None

    @property
    def free(self) -> bool:
        """Up and running nothing: it may take a job."""
        return self.up is True and self.job is None

    def stages(self, spec: JobSpec, start: int) -> range:
        """The stages from ``start`` on that may run here one after another (their `server` and `tags`)."""
        stop = start
        while stop < len(spec.stages) and self.server.takes(spec.stages[stop]):
            stop += 1
        return range(start, stop)

    def fits(self, spec: JobSpec, start: int = 0) -> bool:
        """It may run stage ``start`` of ``spec``, and its lists have every name of the stages it would run."""
        stages = self.stages(spec, start)
        if self.catalog is None or not stages and start < len(spec.stages):
            return False
        return not preflight(spec, self.catalog, stages)

    def load(self) -> float:
        """Jobs started per weight: the lower, the sooner it gets the next job."""
        return self.started / self.server.weight

    def seconds(self, spec: JobSpec, start: int) -> float | None:
        """How long its history says stage ``start`` of ``spec`` takes here; None: it does not know."""
        if self.history is None or start == len(spec.stages):
            return None
        return self.history.stage_seconds(spec, start)


def route(spec: JobSpec, lanes: Sequence[Lane], start: int = 0) -> Lane | None:
    """The free lane ``spec`` should run on now from stage ``start``, or None when it must wait (see
    the module's doc)."""
    takers = [lane for lane in lanes if lane.stages(spec, start)] or list(lanes)
    known = [lane for lane in takers if lane.catalog is not None]
    fitting = [lane for lane in known if lane.fits(spec, start)]
    if not fitting and len(known) == len(takers):
        fitting = known  # it fits nowhere: one server's checks fail it, saying why
    free = [lane for lane in fitting if lane.free]
    seconds = {lane: lane.seconds(spec, start) for lane in free}
    if None in seconds.values():
        return min(free, key=Lane.load, default=None)
    return min(free, key=lambda lane: (seconds[lane], lane.load()), default=None)


def unroutable(spec: JobSpec, start: int, lanes: Sequence[Lane]) -> list[str]:
    """Why stage ``start`` of ``spec`` can run on no server of ``lanes`` by its `server` and `tags`; [] when it can."""
    if start == len(spec.stages):
        return []  # every stage finished: any server ends the job
    problem = route_problem(spec.stages[start], [lane.server for lane in lanes])
    return [] if problem is None else [f"stage {start + 1} ({spec.stages[start].type}): {problem[0]}: {problem[1]}"]


@attrs.define(eq=False)
class Lanes:
    """The lanes of one worker, their health checks, and which job goes where.

    Attributes:
        lanes: One per server, in the order the servers were given.
        health_interval: Seconds between two pings of a server that is up.
        changed: Called (from a health thread) when a lane went up or down, so the
            worker looks at the queue again.
    """

    lanes: Sequence[Lane]
    health_interval: float = DEFAULT_HEALTH_INTERVAL
    changed: Callable[[], None] = lambda: None

    _lock: threading.Lock = attrs.field(factory=threading.Lock, init=False)
    _jobs: list[threading.Thread] = attrs.field(factory=list, init=False)
    _health: list[threading.Thread] = attrs.field(factory=list, init=False)

    @property
    def runners(self) -> list[Runner]:
        return [lane.runner for lane in self.lanes]

    @property
    def busy(self) -> bool:
        """Some lane runs a job."""
        with self._lock:
            return any(lane.job is not None for lane in self.lanes)

    def down_for(self, seconds: float) -> bool:
        """Some lane is down, and every lane that is has been for ``seconds`` or more."""
        now = time.monotonic()
        with self._lock:
            down = [lane.down_since for lane in self.lanes if lane.down_since is not None]
        return bool(down) and all(now - since >= seconds for since in down)

    def each_running(self, act: Callable[[Runner, JobRecord], None]) -> None:
        """``act(runner, job)`` for each lane's running job; no lane starts another meanwhile, so what
        ``act`` asks of the runner reaches that job and no later one."""
        with self._lock:
            for lane in self.lanes:
                if lane.job is not None:
                    act(lane.runner, lane.job)

    def pick(self, queued: Iterable[JobRecord]) -> tuple[JobRecord, Lane] | None:
        """The first of ``queued`` (in queue order) that a free lane should run now, with that lane."""
        with self._lock:
            for record in queued:
                lane = route(record.spec, self.lanes, record.next_stage)
                if lane is not None:
                    return record, lane
        return None

    def run_held(self, lane: Lane, store: Store, worker_id: str, record: JobRecord) -> JobState | None:
        """`Runner.run_held` of ``record`` on ``lane``: the stages from its first unfinished one that may
        run there; fails it, saying why, when its stage may run on no server of these."""
        stages = lane.stages(record.spec, record.next_stage)
        return lane.runner.run_held(store, worker_id, record, stop=stages.stop,
                                    problems=unroutable(record.spec, record.next_stage, self.lanes))  # fmt: skip

    def take(self, record: JobRecord) -> Lane | None:
        """The free lane ``record`` should run on now (as `pick` chooses), kept for it until `run` on it
        ends or `put_back`; None when it must wait or run elsewhere.  (Jobs dispatched one at a time.)"""
        with self._lock:
            lane = route(record.spec, self.lanes, record.next_stage)
            if lane is not None:
                lane.job = record
            return lane

    def put_back(self, lane: Lane) -> None:
        """Free a lane `take` kept for a job that will not run on it after all."""
        with self._lock:
            lane.job = None

    def run(self, lane: Lane, record: JobRecord, run: Callable[[Runner, JobRecord], JobState | None]) -> JobState | None:
        """Run ``record`` on ``lane`` here: ``run(runner, record)``, the lane busy meanwhile; its outcome."""
        with self._lock:
            lane.job = record
            lane.started += 1
        try:
            return run(lane.runner, record)
        finally:
            with self._lock:
                lane.job = None

    def start(self, lane: Lane, record: JobRecord, run: Callable[[Runner, JobRecord], JobState | None],
              ended: Callable[[Lane, JobRecord, JobState | None], None]) -> None:  # fmt: skip
        """Run ``record`` on ``lane`` on a thread of its own (`run`), then ``ended`` with its outcome."""
        with self._lock:
            lane.job = record  # busy from now, so the next `pick` passes it by

        def work() -> None:
            outcome = None
            try:
                outcome = self.run(lane, record, run)
            finally:
                ended(lane, record, outcome)

        thread = threading.Thread(target=work, name=f"sdjobs-lane-{lane.server.name}", daemon=True)
        self._jobs.append(thread)
        thread.start()

    def check_health(self, stop: threading.Event) -> None:
        """Start a health thread per lane, each checking its server at once, until ``stop`` is set."""
        for lane in self.lanes:
            thread = threading.Thread(target=self._watch, args=(lane, stop), name=f"sdjobs-health-{lane.server.name}", daemon=True)
            self._health.append(thread)
            thread.start()

    def join_jobs(self) -> None:
        """Wait until every job started has ended."""
        for thread in self._jobs:
            thread.join()

    def join_health(self) -> None:
        """Wait for the health threads to end, once their stop event is set (a ping under way ends first)."""
        for thread in self._health:
            thread.join()

    def _watch(self, lane: Lane, stop: threading.Event) -> None:
        wait = 0.0
        while not stop.wait(wait):
            try:
                lane.runner.client.ping()
                catalog = (lane.up and lane.runner.lists) or lane.runner.ask_lists()  # a job's checks may have asked anew
            except (WebUIError, CatalogError) as exc:
                wait = PING_BACKOFF[0] if lane.up or wait == 0.0 else min(wait * 2, PING_BACKOFF[1])
                self._went_down(lane, exc)
            else:
                wait = self.health_interval
                self._came_up(lane, catalog)

    def _went_down(self, lane: Lane, error: Exception) -> None:
        with self._lock:
            was_up, lane.up = lane.up, False
            if was_up is False:
                return  # down already: said once
            lane.down_since = time.monotonic()
        log.warning("server %s is down: %s", lane.server.name, error)
        lane.runner.hooks.server_down(lane.server.name, lane.server.url, str(error))
        with self._lock:
            if lane.job is not None:
                lane.runner.let_go()  # the worker hands it back to the queue; another lane may take it
        self.changed()

    def _came_up(self, lane: Lane, catalog: ServerCatalog) -> None:
        with self._lock:
            was_up, lane.up, lane.catalog, lane.down_since = lane.up, True, catalog, None
        if not was_up:  # also the first check: every front end learns which servers there are
            log.info("server %s is up", lane.server.name)
            lane.runner.hooks.server_up(lane.server.name, lane.server.url)
            self.changed()
