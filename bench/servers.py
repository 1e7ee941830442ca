"""Several servers: throughput with 1, 2 and 4 of them, and what a server killed mid-run costs.

Each server is `sdjobs sim` in a process of its own at a fixed step time.  One worker
(`Worker` with `Lanes`, as `sdjobs worker --until-empty --webui ... --webui ...` runs it)
takes 40 queued 2-stage jobs (txt2img, img2img; 10 steps each) from a fresh queue file.

- Throughput: jobs a second with N servers, against N × the one-server figure (target ≥ 0.95).
- Kill: with 2 servers, one is killed (SIGKILL) once 10 jobs are done: every job must end done
  with its two images, each once; the time from the kill to the job it ran starting on the
  other server is shown (it waits for that server to finish the job it runs).
- Failover: with 2 servers, one job on the first, the second idle, the first killed mid-stage
  2: the time from the kill to the job starting on the second, against the health-check
  interval + 1 s; 5 runs.

Run: python bench/servers.py  (from the bench/ folder; about three minutes)
"""

from __future__ import annotations

import contextlib
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from _common import plugin_hooks, table
from sdjobs import hookimpl
from sdjobs.client import WebUIClient
from sdjobs.job import JobSettings
from sdjobs.lanes import Lane, Lanes
from sdjobs.runner import Runner
from sdjobs.servers import ServerConfig
from sdjobs.spec import JobSpec
from sdjobs.sqlite_store import SQLiteStore
from sdjobs.status import JobState
from sdjobs.worker import Worker

STEP_TIME = 0.05
JOBS = 40
HEALTH_INTERVAL = 1.0


def two_stage_job(n: int, steps: int = 10) -> JobSpec:
    return JobSpec.from_mapping({
        "name": f"bench{n}", "prompt": "a lighthouse", "seed": n,
        "settings": {"steps": steps, "width": 64, "height": 64, "sampler_name": "Euler a"},
        "stages": [{"type": "txt2img"}, {"type": "img2img", "denoising_strength": 0.5}],
    })  # fmt: skip


@contextlib.contextmanager
def simulators(count: int) -> Iterator[list[tuple[subprocess.Popen, str]]]:
    """``count`` `sdjobs sim` processes, each with its URL; killed at the end if still running."""
    command = [sys.executable, "-m", "sdjobs", "sim", "--port", "0", "--step-time", str(STEP_TIME), "--first-step-time", str(STEP_TIME)]
    started = [subprocess.Popen(command, stdout=subprocess.PIPE, text=True) for _ in range(count)]
    try:
        yield [(sim, re.search(r"http://\S+", sim.stdout.readline()).group(0)) for sim in started]
    finally:
        for sim in started:
            if sim.poll() is None:
                sim.send_signal(signal.SIGINT)
            sim.wait(timeout=10)


class Events:
    """When each job started (and on which server), finished, and when a stage ended."""

    def __init__(self) -> None:
        self.started: list[tuple[float, str, str | None]] = []
        self.in_stage_two = 0
        self.servers_up = 0
        self.done = 0
        self.last_finished = 0.0
        self.changed = threading.Condition()

    @hookimpl
    def sdjobs_server_up(self):
        with self.changed:
            self.servers_up += 1
            self.changed.notify_all()

    @hookimpl
    def sdjobs_stage_started(self, status):
        with self.changed:
            self.in_stage_two += status.stage_index == 1
            self.changed.notify_all()

    @hookimpl
    def sdjobs_job_started(self, status):
        with self.changed:
            self.started.append((time.monotonic(), status.job_id, status.server))
            self.changed.notify_all()

    @hookimpl
    def sdjobs_job_finished(self, status, outcome):
        with self.changed:
            self.done += outcome is JobState.DONE
            self.last_finished = time.monotonic()
            self.changed.notify_all()

    def wait(self, predicate, timeout: float = 120.0) -> None:
        with self.changed:
            assert self.changed.wait_for(predicate, timeout), "the run did not get there"


def make_worker(store: SQLiteStore, urls: list[str], out: Path, events: Events) -> Worker:
    """One worker on ``urls``: the plain one-server worker for one, lanes for more (as the CLI chooses)."""
    hooks = plugin_hooks([events])
    runners = [Runner(specs=[], client=WebUIClient(url), hooks=hooks, out_dir=out, settings=JobSettings(),
                      server=None if len(urls) == 1 else f"s{i}") for i, url in enumerate(urls)]  # fmt: skip
    if len(urls) == 1:
        return Worker(store, runners[0], until_empty=True, idle_poll=0.05)
    lanes = Lanes([Lane(ServerConfig(f"s{i}", url), runner) for i, (url, runner) in enumerate(zip(urls, runners))],
                  health_interval=HEALTH_INTERVAL)  # fmt: skip
    return Worker(store, lanes=lanes, until_empty=True, idle_poll=0.05)


def images_once(store: SQLiteStore, ids: list[str]) -> bool:
    """Every job done, with one txt2img and one img2img image in its folder and nothing else."""
    for job in map(store.get, ids):
        pngs = sorted(path.relative_to(job.folder).as_posix() for path in job.folder.rglob("*.png"))
        if job.state is not JobState.DONE or pngs != ["01-txt2img/001.png", "02-img2img/001.png"]:
            return False
    return True


def throughput(count: int) -> tuple[float, float, bool]:
    """Seconds from the worker's start to its end for `JOBS` jobs on ``count`` servers, jobs per second
    from the first job's start to the last one's end, and whether all ended done once."""
    events = Events()
    with tempfile.TemporaryDirectory() as scratch, simulators(count) as sims, SQLiteStore(Path(scratch, "queue.db")) as store:
        ids = [job.id for job in store.add([two_stage_job(n) for n in range(JOBS)])]
        worker = make_worker(store, [url for _, url in sims], Path(scratch, "out"), events)
        began = time.monotonic()
        worker.run()
        took = time.monotonic() - began
        return took, JOBS / (events.last_finished - events.started[0][0]), images_once(store, ids)


def killed_mid_run() -> tuple[bool, int, float | None]:
    """2 servers, the first killed once 10 jobs are done: all done once?, jobs run again, kill → elsewhere."""
    events = Events()
    with tempfile.TemporaryDirectory() as scratch, simulators(2) as sims, SQLiteStore(Path(scratch, "queue.db")) as store:
        ids = [job.id for job in store.add([two_stage_job(n) for n in range(JOBS)])]
        worker = make_worker(store, [url for _, url in sims], Path(scratch, "out"), events)
        running = threading.Thread(target=worker.run)
        running.start()
        events.wait(lambda: events.done >= 10 and worker.lanes.lanes[0].job is not None)
        killed_at = time.monotonic()
        sims[0][0].send_signal(signal.SIGKILL)
        running.join()
        retried = {job for job in ids if store.get(job).attempts > 1}
        moved = min((at - killed_at for at, job, _ in events.started if job in retried and at > killed_at), default=None)
        return images_once(store, ids), len(retried), moved


def failover() -> float:
    """One job on the first of 2 servers, the second idle; the first killed mid-stage 2: kill → started on the second."""
    events = Events()
    with tempfile.TemporaryDirectory() as scratch, simulators(2) as sims, SQLiteStore(Path(scratch, "queue.db")) as store:
        worker = make_worker(store, [url for _, url in sims], Path(scratch, "out"), events)
        worker.lanes.lanes[1].started = 1  # the first server takes the job
        worker.until_empty = False
        running = threading.Thread(target=worker.run)
        running.start()
        events.wait(lambda: events.servers_up == 2)
        [job] = store.add([two_stage_job(0, steps=40)])
        events.wait(lambda: events.in_stage_two)
        killed_at = time.monotonic()
        sims[0][0].send_signal(signal.SIGKILL)
        events.wait(lambda: len(events.started) == 2)
        moved = events.started[1][0] - killed_at
        events.wait(lambda: events.done == 1)
        worker.cancel(rest=True)
        running.join()
        assert events.started[1][2] == "s1" and store.get(job.id).state is JobState.DONE
        return moved


def main() -> None:
    rows, single = [], None
    for count in (1, 2, 4):
        took, rate, once = throughput(count)
        single = single or rate
        rows.append((count, f"{took:.1f} s", f"{rate:.2f} jobs/s", f"{rate / (single * count):.3f}", "yes" if once else "**no**"))
    print(f"{JOBS} jobs of 2 stages × 10 steps of {STEP_TIME * 1000:g} ms, 64×64, one worker\n")
    print(table(["servers", "worker start to end", "throughput (first start to last end)", "vs N × one server", "every job done, images once"], rows))
    once, retried, moved = killed_mid_run()
    print(f"\nA server killed after 10 jobs (2 servers, health checks every {HEALTH_INTERVAL:g} s):\n")
    print(table(["every job done, images once", "jobs run again elsewhere", "kill → its job started elsewhere (waits for a free server)"],
                [("yes" if once else "**no**", retried, "-" if moved is None else f"{moved:.2f} s")]))  # fmt: skip
    moves = sorted(failover() for _ in range(5))
    print(f"\nFailover to an idle server, 5 runs (target ≤ {HEALTH_INTERVAL:g} s interval + 1 s):\n")
    print(table(["min", "median", "max"], [tuple(f"{value:.2f} s" for value in (moves[0], moves[2], moves[-1]))]))


if __name__ == "__main__":
    main()
