"""A farm on one PostgreSQL queue: worker processes, each with simulated WebUIs of its own.

Starts a throwaway PostgreSQL server on loopback (`sdjobs.postgres_server`) and
the simulators in this process; the workers are Procrastinate workers (`sdjobs.dispatch`).
Then it measures:

- enqueue: `sdjobs queue add`'s store call for 5,000 jobs (target ≥ 2,000 jobs/s);
- throughput: --jobs one-stage jobs through --workers `sdjobs worker` processes
  of --servers simulators each, against what the servers alone can do (one bare txt2img timed on each, summed;
  target ≥ 0.9 ×), timed from the queue's resume once every worker waits on it;
- cancel-to-interrupt: `request_cancel` of a running job (as `sdjobs queue cancel`
  from any host; Procrastinate's abort over LISTEN/NOTIFY) until the simulator
  receives the interrupt (target ≤ 1 s);
- a worker lost: its job claimed again by another worker, after kill -9 (this
  host sees the pid gone) and after SIGSTOP (a silent host: only the heartbeat
  lease tells; target ≤ lease + 5 s); the job must end done with every stage once.

Run: python bench/farm.py [--workers 4] [--servers 2] [--jobs 400] [--steps 8] [--step-time 0.05] [--lease 30]
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from _common import table
from sdjobs.client import WebUIClient
from sdjobs.postgres_server import ThrowawayPostgres, fresh_url, server_binaries
from sdjobs.postgres_store import PostgresStore, migrate
from sdjobs.sim import SimSettings, SimulatedWebUI
from sdjobs.spec import JobSpec
from sdjobs.status import JobState


def small_job(steps: int, stages: int = 1) -> JobSpec:
    kinds = [{"type": "txt2img"}] + [{"type": "img2img", "denoising_strength": 0.5}] * (stages - 1)
    return JobSpec.from_mapping(
        {"name": "farm", "prompt": "a lighthouse", "seed": 1234,
         "settings": {"steps": steps, "width": 64, "height": 64}, "stages": kinds}  # fmt: skip
    )


def until(condition: Callable[[], object], timeout: float, every: float = 0.01) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(every)
    raise SystemExit(f"bench/farm.py: gave up after {timeout:g} s")


def server_seconds(sim: SimulatedWebUI, spec: JobSpec, runs: int = 5) -> float:
    """How long the bare server takes for one job's txt2img (mean of ``runs``)."""
    payload = {"prompt": spec.prompt, "seed": 1234, **spec.settings}
    with WebUIClient(sim.url) as client:
        started = time.monotonic()
        for _ in range(runs):
            client.generate("txt2img", payload)
        return (time.monotonic() - started) / runs


def start_worker(url: str, sims: list[SimulatedWebUI], out: Path, lease: float) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "sdjobs", "worker", "--queue", url, "--lease", str(lease),
               "--frontend", "log", "--log-level", "WARNING", "--out", str(out)]  # fmt: skip
    for sim in sims:
        command += ["--webui", sim.url]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def main() -> None:
    options = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    options.add_argument("--workers", type=int, default=4)
    options.add_argument("--servers", type=int, default=2, help="simulated WebUIs per worker")
    options.add_argument("--jobs", type=int, default=400)
    options.add_argument("--steps", type=int, default=8)
    options.add_argument("--step-time", type=float, default=0.05)
    options.add_argument("--lease", type=float, default=30.0)
    args = options.parse_args()
    binaries = server_binaries()
    if binaries is None:
        raise SystemExit("bench/farm.py: needs PostgreSQL's server binaries (initdb)")
    server = ThrowawayPostgres(binaries)
    sims = [SimulatedWebUI(SimSettings(step_time=args.step_time, first_step_time=args.step_time)).start()
            for _ in range(args.workers * args.servers)]  # fmt: skip
    own = [sims[number * args.servers : (number + 1) * args.servers] for number in range(args.workers)]
    workers: list[subprocess.Popen[bytes]] = []
    rows: list[tuple[str, str, str]] = []

    def measured(row: tuple[str, str, str]) -> None:
        rows.append(row)
        print(f"{row[0]}: {row[1]}", file=sys.stderr)

    try:
        url = fresh_url(server.start())
        migrate(url)
        store = PostgresStore(url, lease=args.lease)
        spec = small_job(args.steps)

        started = time.monotonic()
        store.add([spec] * 5000)
        rate = 5000 / (time.monotonic() - started)
        measured(("enqueue 5,000 jobs", f"{rate:,.0f} jobs/s", "≥ 2,000 jobs/s"))
        for job in store.list():
            store.remove(job.id)

        capacity = sum(1 / server_seconds(sim, spec) for sim in sims)
        store.pause()
        store.add([spec] * args.jobs)
        with tempfile.TemporaryDirectory() as out:
            workers = [start_worker(url, mine, Path(out), args.lease) for mine in own]
            until(lambda: len(store.workers()) == len(workers), 60)
            time.sleep(1)  # every worker past its start-up, waiting on the paused queue
            started = time.time()  # the store's clock: the server's, on this host
            store.resume()
            until(lambda: not store.list(), 3600, every=0.5)  # seldom: the simulators share this process
            done = store.history(outcome=JobState.DONE, limit=args.jobs + 1)
            throughput = args.jobs / (max(job.ended_at or 0 for job in done) - started)
            measured((f"throughput, {args.jobs} jobs, {len(workers)} workers × {args.servers} servers",
                         f"{throughput:.2f} jobs/s = {throughput / capacity:.2f} × servers ({capacity:.2f}); {len(done)} done",
                         "≥ 0.9 × servers"))  # fmt: skip

            latencies = []
            for _ in range(5):
                [job] = store.add([small_job(400)])
                until(lambda: any(sim.snapshot().sampling_step >= 2 for sim in sims), 60)
                cancelled = time.monotonic()
                store.request_cancel(job.id)
                interrupted = until(lambda: [at for sim in sims for at, _, path in sim.requests
                                             if path == "/sdapi/v1/interrupt" and at > cancelled], 30)  # fmt: skip
                latencies.append(min(interrupted) - cancelled)
                until(lambda: store.get(job.id).ended, 30)
            measured(("cancel → interrupt (5 runs)", f"median {sorted(latencies)[2] * 1000:.0f} ms, max {max(latencies) * 1000:.0f} ms", "≤ 1 s"))

            for how, signum in (("kill -9", signal.SIGKILL), ("SIGSTOP (silent host)", signal.SIGSTOP)):
                [job] = store.add([small_job(60, stages=2)])
                running = until(lambda: (record := store.get(job.id)).stages and record, 120)
                holder = next(worker for worker in store.workers() if worker.id == running.worker)
                victim = next(process for process in workers if process.pid == holder.pid)
                lost = time.monotonic()
                os.kill(victim.pid, signum)
                if signum == signal.SIGKILL:
                    victim.wait(timeout=30)  # reaped, as a host's init would: no pid left to look alive
                until(lambda: (record := store.get(job.id)).state is JobState.RUNNING and record.worker != running.worker, 600)
                resumed = time.monotonic() - lost
                ended = until(lambda: (record := store.get(job.id)).ended and record, 120)
                once = ended.state is JobState.DONE and len(list(ended.folder.glob("*/*.png"))) == 2
                measured((f"worker lost by {how}: job claimed again", f"{resumed:.1f} s; {ended.state}, every stage once: {once}",
                             f"≤ lease + 5 s = {args.lease + 5:g} s"))  # fmt: skip
                index = workers.index(victim)
                victim.kill()
                victim.wait(timeout=30)
                workers[index] = start_worker(url, own[index], Path(out), args.lease)  # a replacement on its servers
        store.close()
    finally:
        for worker in workers:
            worker.terminate()
        for worker in workers:
            worker.wait(timeout=30)
        for sim in sims:
            sim.stop()
        server.stop()
    print(table(["measure", "result", "target"], rows))


if __name__ == "__main__":
    main()
