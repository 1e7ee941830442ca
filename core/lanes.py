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
  with its lists asked anew.  Letting a job go never interrupts a request that
  cannot be shown to be ours: the job's cancel asks the server first, and a
  server that does not answer is not interrupted.
- **routing**: `pick` takes the first queued job that a free, up lane can run:
  its checkpoint, samplers, upscalers and ADetailer are on that server
  (`preflight` finds nothing).  Among the lanes that fit, the least busy wins:
  fewest jobs started for its weight.  A job that fits a busy or down lane
  waits for it; a job that fits no server at all (every server's lists known)
  goes to any free one, whose preflight then fails it saying why.

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
from sdjobs.job import PING_BACKOFF
from sdjobs.preflight import CatalogError, ServerCatalog, preflight
from sdjobs.runner import Runner
from sdjobs.servers import ServerConfig
from sdjobs.spec import JobSpec
from sdjobs.status import JobState
from sdjobs.store import JobRecord

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
    """

    server: ServerConfig
    runner: Runner
    up: bool | None = None
    catalog: ServerCatalog | None = None
    job: JobRecord | None = None
    started: int = 0
    down_since: float | None = None

    @property
    def free(self) -> bool:
        """Up and running nothing: it may take a job."""
        return self.up is True and self.job is None

    def fits(self, spec: JobSpec) -> bool:
        """Its lists are known and have every name ``spec`` uses."""
        return self.catalog is not None and not preflight(spec, self.catalog)

    def load(self) -> float:
        """Jobs started per weight: the lower, the sooner it gets the next job."""
        return self.started / self.server.weight


def route(spec: JobSpec, lanes: Sequence[Lane]) -> Lane | None:
    """The free lane ``spec`` should run on now, or None when it must wait (see the module's doc)."""
    known = [lane for lane in lanes if lane.catalog is not None]
    fitting = [lane for lane in known if lane.fits(spec)]
    if not fitting and len(known) == len(lanes):
        fitting = known  # it fits nowhere: one server's preflight fails it, saying why
    return min((lane for lane in fitting if lane.free), key=Lane.load, default=None)


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
                lane = route(record.spec, self.lanes)
                if lane is not None:
                    return record, lane
        return None

    def start(self, lane: Lane, record: JobRecord, run: Callable[[Runner, JobRecord], JobState | None],
              ended: Callable[[Lane, JobRecord, JobState | None], None]) -> None:  # fmt: skip
        """Run ``record`` on ``lane`` on a thread of its own: ``run(runner, record)``, then ``ended`` with its outcome."""
        with self._lock:
            lane.job = record
            lane.started += 1

        def work() -> None:
            outcome = None
            try:
                outcome = run(lane.runner, record)
            finally:
                with self._lock:
                    lane.job = None
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
                catalog = lane.catalog if lane.up else ServerCatalog.from_client(lane.runner.client)
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
