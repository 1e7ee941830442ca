"""Job and queue ETAs against the truth: `sdjobs check`'s expected duration, the queue's end as
`sdjobs queue list` says it, and a running job's ETA, over 10 queued jobs of mixed sizes.

A real worker (`Worker` + `Runner`, the built-in poller at 0.1 s) runs the jobs from a real
SQLite queue against the simulated WebUI in a process of its own with the `h200-sd15` cost
profile (a 512² step takes 0.1 s; other sizes, batches, decodes and detections as that
profile scales them; ADetailer finds 0–3 faces, seeded).  Twice: on a server with no history,
then on one where one job (the 4-stage chain at 512²) has run before, as `sdjobs check` would
find it.  Before the 10 jobs run, each job's expected duration (`ServerHistory.estimate`) and
the queue's end are taken; while they run, each job's ETA (`job_eta`) at 25/50/75 % of it.

Run: python bench/eta_queue.py   (about 3 minutes)
"""

from __future__ import annotations

import contextlib
import re
import signal
import statistics
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
from sdjobs.history import ServerHistory, plan_queue
from sdjobs.job import JobSettings
from sdjobs.runner import Runner
from sdjobs.spec import JobSpec
from sdjobs.sqlite_store import SQLiteStore
from sdjobs.worker import Worker

POINTS = (0.25, 0.50, 0.75)
STEP = 0.1  # seconds of a 512² step
POLL = 0.1
CLOSE = 30  # the target: check within this many % of the truth

ADETAILER = {"type": "adetailer", "ad_model": "face_yolov8n.pt"}
IMG2IMG = {"type": "img2img", "denoising_strength": 0.5}
UPSCALE = {"type": "upscale", "upscaler": "Lanczos", "scale": 2}


def job(name: str, stages: list[dict] | None = None, **settings) -> JobSpec:
    return JobSpec.from_mapping(
        {
            "name": name,
            "prompt": "a lighthouse",
            "seed": 7,
            "settings": {"steps": 20, "width": 512, "height": 512, "sampler_name": "Euler a", **settings},
            "stages": [{"type": "txt2img"}, *(stages or [])],
        }
    )


FIRST = job("4-stage chain", [IMG2IMG, ADETAILER, UPSCALE])
QUEUE = [
    job("txt2img 512²"),
    job("txt2img 768²", width=768, height=768),
    job("512×768 batch 2, 15 steps", width=512, height=768, batch_size=2, steps=15),
    job("hires 2×", enable_hr=True, hr_scale=2, hr_upscaler="Latent", hr_second_pass_steps=10, denoising_strength=0.5),
    job("n_iter 2, 12 steps", n_iter=2, steps=12),
    job("txt2img → img2img", [IMG2IMG]),
    job("txt2img → ADetailer", [ADETAILER]),
    job("txt2img 1024², 10 steps", width=1024, height=1024, steps=10),
    job("4-stage chain", [IMG2IMG, ADETAILER, UPSCALE]),
    job("txt2img 640², 25 steps", width=640, height=640, steps=25),
]


class Watch:
    """Each job's start, end and every `job_eta` shown, with when."""

    def __init__(self) -> None:
        self.started: dict[str, float] = {}
        self.ended: dict[str, float] = {}
        self.etas: dict[str, list[tuple[float, float | None]]] = {}

    @hookimpl
    def sdjobs_job_started(self, status, spec):
        self.started[status.job_id] = time.monotonic()

    @hookimpl
    def sdjobs_progress(self, status):
        self.etas.setdefault(status.job_id, []).append((time.monotonic(), status.job_eta))

    @hookimpl
    def sdjobs_job_finished(self, status, outcome, error, results):
        self.ended[status.job_id] = time.monotonic()


@contextlib.contextmanager
def simulator() -> Iterator[str]:
    command = [sys.executable, "-m", "sdjobs", "sim", "--port", "0", "--profile", "h200-sd15",
               "--step-time", str(STEP), "--faces", "0-3"]  # fmt: skip
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True) as server:
        try:
            yield re.search(r"http://\S+", server.stdout.readline()).group(0)
        finally:
            server.send_signal(signal.SIGINT)
            server.wait(timeout=10)


def work(store: SQLiteStore, client: WebUIClient, out: Path, watch: Watch) -> None:
    runner = Runner(specs=[], client=client, hooks=plugin_hooks([watch]), out_dir=out, settings=JobSettings(poll_interval=POLL))
    worker = Worker(store, runner, until_empty=True)
    thread = threading.Thread(target=worker.run)
    thread.start()
    thread.join(timeout=600)


def pct(estimate: float, truth: float) -> float:
    return 100 * (estimate - truth) / truth


def one_round(with_history: bool) -> tuple[list[list[str]], dict[str, list[float]], list[tuple[bool, str]]]:
    """The table's rows, the absolute % errors, and whether each job's time lay within the range check printed
    (of those it printed one for)."""
    errors: dict[str, list[float]] = {"check": [], "queue": [], "job eta": []}
    rows, within = [], []
    with tempfile.TemporaryDirectory() as folder, simulator() as url, WebUIClient(url) as client:
        with SQLiteStore(Path(folder) / "queue.db") as store:
            if with_history:
                store.add([FIRST])
                work(store, client, Path(folder) / "out", Watch())
            records = store.add(QUEUE)
            history = ServerHistory.load(store, client.base_url)
            planned = plan_queue(records, {client.base_url: history}, now=time.time(), paused=False)
            queued_at = time.monotonic()
            watch = Watch()
            work(store, client, Path(folder) / "out", watch)
        for record, plan in zip(records, planned, strict=True):
            truth = watch.ended[record.id] - watch.started[record.id]
            expected = "unknown"
            if plan.estimate is not None:
                errors["check"].append(abs(pct(plan.estimate.seconds, truth)))
                shown = ""
                if not plan.estimate.sure:
                    within.append((plan.estimate.low <= truth <= plan.estimate.high, record.spec.name))
                    shown = f", range {plan.estimate.low:.1f}–{plan.estimate.high:.1f}" + ("" if within[-1][0] else " missed")
                expected = f"{plan.estimate.seconds:.1f} ({pct(plan.estimate.seconds, truth):+.0f}%{shown})"
            cells = []
            for share in POINTS:
                moment = watch.started[record.id] + share * truth
                shown = [(t, eta) for t, eta in watch.etas.get(record.id, []) if t <= moment]
                eta = shown[-1][1] if shown else None
                if eta is None:
                    cells.append("—")
                    continue
                estimate = eta - (moment - shown[-1][0])
                left = watch.ended[record.id] - moment
                errors["job eta"].append(abs(pct(estimate, left)))
                cells.append(f"{pct(estimate, left):+.0f}%")
            rows.append([record.spec.name, f"{truth:.1f}", expected, *cells])
        last = max(watch.ended.values()) - queued_at
        end = planned[-1].end
        queue_cell = "unknown"
        if end is not None:
            queue_estimate = end - planned[0].start
            errors["queue"].append(abs(pct(queue_estimate, last)))
            queue_cell = f"{queue_estimate:.1f} ({pct(queue_estimate, last):+.0f}%)"
        rows.append(["**the queue's end**", f"{last:.1f}", queue_cell, "", "", ""])
    return rows, errors, within


def main() -> None:
    summary = []
    for with_history in (False, True):
        label = "one job run before" if with_history else "no history"
        rows, errors, within = one_round(with_history)
        print(f"\n{label}:\n")
        print(table(["job", "took s", "expected s (check)", *(f"job ETA at {p:.0%}" for p in POINTS)], rows))
        for what, values in errors.items():
            cell = f"{statistics.median(values):.0f} / {max(values):.0f}" if values else "—"
            close = f"{sum(value <= CLOSE for value in values)} of {len(values)}" if what == "check" and values else ""
            ranged = f"{sum(inside for inside, _ in within)} of {len(within)}" if what == "check" and within else ""
            summary.append([label, what, cell, str(len(values)), close, ranged])
    print(f"\nAbsolute error in % (median / worst; n: estimates shown; within {CLOSE}%: check's figure; in range: the jobs")
    print("whose time lay within the range check printed, of those it printed one for):\n")
    print(table(["history", "estimate", "error %", "n", f"within {CLOSE}%", "in range"], summary))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
