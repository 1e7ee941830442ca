"""`sdjobs watch`: how late a watcher shows a worker's progress, and what publishing costs the worker.

A publisher (the worker's side, `sdjobs.feed.Publisher`) gets a progress hook
every 50 ms for one running job; a `Watcher` on another connection to the same
queue records when each progress reaches its hooks.  On a queue file and on a
throwaway PostgreSQL server on loopback (when its binaries are installed).
Targets: a shown progress at most 0.5 s behind the worker's hook (p95); the
hook costs the runner's thread microseconds; a few writes a second.
Run: python bench/watch.py [--events 200]
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from _common import percentile, plugin_hooks, table
from sdjobs import hookimpl
from sdjobs.feed import Publisher
from sdjobs.postgres_server import ThrowawayPostgres, fresh_url, server_binaries
from sdjobs.postgres_store import PostgresStore, migrate
from sdjobs.spec import JobSpec
from sdjobs.sqlite_store import SQLiteStore
from sdjobs.status import JobState, RuntimeStatus
from sdjobs.watch import Watcher

INTERVAL = 0.05  # seconds between two progress hooks of the worker


class Shown:
    """When the watcher's hooks showed each progress value."""

    def __init__(self) -> None:
        self.at: dict[float, float] = {}
        self.done = threading.Event()

    @hookimpl
    def sdjobs_progress(self, status: RuntimeStatus) -> None:
        self.at[status.progress] = time.monotonic()

    @hookimpl
    def sdjobs_job_finished(self) -> None:
        self.done.set()


def measure(open_store, events: int) -> list[object]:
    with open_store() as worker_side, open_store() as watcher_side:
        spec = JobSpec.from_mapping({"name": "bench", "seed": 1, "stages": [{"type": "txt2img"}]})
        [job] = worker_side.add([spec])
        worker = worker_side.register_worker()
        worker_side.claim(worker.id)
        shown = Shown()
        watcher = Watcher(watcher_side, plugin_hooks([shown]))
        watching = threading.Thread(target=watcher.run)
        watching.start()
        publisher = Publisher(worker_side, lambda: "bench")
        publisher.start()
        sent: dict[float, float] = {}
        hook_time = 0.0
        base = RuntimeStatus(job.id, "bench", "txt2img", 0, 1, state=JobState.RUNNING)
        publisher.sdjobs_job_started(base)
        for number in range(1, events + 1):
            status = RuntimeStatus(job.id, "bench", "txt2img", 0, 1, progress=number / (events + 1), state=JobState.RUNNING)
            began = time.perf_counter()
            publisher.sdjobs_progress(status)
            hook_time += time.perf_counter() - began
            sent[status.progress] = time.monotonic()
            time.sleep(INTERVAL)
        publisher.sdjobs_job_finished(base, JobState.DONE, None, ())
        shown.done.wait(30)
        publisher.stop()
        watcher.stop()
        watching.join(30)
        writes = len({event.at for event in watcher_side.feed()})
        lags = [shown.at[value] - sent[value] for value in shown.at]
        seconds = events * INTERVAL
        return [len(lags), f"{writes / seconds:.1f}", f"{percentile(lags, 50) * 1000:.0f}", f"{percentile(lags, 95) * 1000:.0f}",
                f"{max(lags) * 1000:.0f}", f"{hook_time / events * 1e6:.1f}"]  # fmt: skip


@contextlib.contextmanager
def postgres() -> Iterator[str | None]:
    binaries = server_binaries()
    if binaries is None:
        yield None
        return
    server = ThrowawayPostgres(binaries)
    try:
        yield server.start()
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=200, help="progress hooks of the worker (one each 50 ms)")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as folder, postgres() as server:
        path = Path(folder) / "queue.db"
        rows.append(["queue file", args.events, *measure(lambda: SQLiteStore(path), args.events)])
        if server is not None:
            url = fresh_url(server)
            migrate(url)
            rows.append(["PostgreSQL", args.events, *measure(lambda: PostgresStore(url), args.events)])
    print(table(["queue", "progress hooks", "shown", "writes/s", "lag p50 ms", "lag p95 ms", "lag max ms", "hook µs"], rows))


if __name__ == "__main__":
    main()
