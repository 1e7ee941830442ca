"""Orchestration overhead: a 4-stage job through sdjobs vs the same HTTP calls made directly.

Both run against the simulated WebUI in a process of its own (as a real WebUI is), 64×64 images.  sdjobs' run includes what
it adds on top of the requests: preflight, progress polling, hooks, writing PNGs
and the manifest.  The direct run replays the very payloads sdjobs sent, with
plain `requests`, one after another.

Targets: ≤ 5 ms per stage at zero time per step; a ratio ≤ 1.02 at 20 steps of 50 ms.
Run: python bench/orchestration.py
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import requests

from _common import four_stage_job, plugin_hooks, simulator_process, table
from sdjobs import hookimpl
from sdjobs.client import WebUIClient
from sdjobs.hooks import Hooks
from sdjobs.runner import Runner

ROUTES = {"txt2img": "txt2img", "img2img": "img2img", "extra-single-image": "extra-single-image"}


class PayloadRecorder:
    """Keeps every payload sdjobs sends, to replay them directly."""

    def __init__(self) -> None:
        self.payloads: list[tuple[str, dict]] = []

    @hookimpl(trylast=True)
    def sdjobs_amend_payload(self, payload, stage):
        self.payloads.append((stage.endpoint, payload))


def direct(url: str, payloads: list[tuple[str, dict]]) -> float:
    with requests.Session() as session:
        started = time.perf_counter()
        for endpoint, payload in payloads:
            session.post(f"{url}/sdapi/v1/{ROUTES[endpoint]}", json=payload).raise_for_status()
        return time.perf_counter() - started


def through_sdjobs(client: WebUIClient, hooks: Hooks) -> float:
    """One 4-stage job run by a `Runner`: plugins are loaded before, once per process as the
    command does, and the output folder is made before and removed after the timing."""
    with tempfile.TemporaryDirectory() as out:
        runner = Runner(specs=[four_stage_job(steps=20)], client=client, hooks=hooks, out_dir=Path(out))
        started = time.perf_counter()
        runner.run()
        elapsed = time.perf_counter() - started
    assert set(runner.outcomes.values()) == {"done"}, runner.outcomes
    return elapsed


def measure(step_time: float, repeats: int) -> tuple[float, float, float]:
    """The medians of sdjobs' runs, of the direct replays, and of their differences.

    Each sdjobs run is followed at once by its replay, so that the machine's other work,
    which comes and goes, weighs on both sides of a difference alike."""
    with simulator_process(step_time) as url, WebUIClient(url) as client:
        recorder = PayloadRecorder()
        through_sdjobs(client, plugin_hooks([recorder]))  # warm-up, and the payloads to replay
        hooks = plugin_hooks()
        pairs = [(through_sdjobs(client, hooks), direct(url, recorder.payloads)) for _ in range(repeats)]
    ours, theirs = zip(*pairs, strict=True)
    return statistics.median(ours), statistics.median(theirs), statistics.median(a - b for a, b in pairs)


def main() -> None:
    rows = []
    for step_time, repeats, target in ((0.0, 45, "≤ 5 ms/stage"), (0.05, 3, "ratio ≤ 1.02")):
        ours, theirs, overhead = measure(step_time, repeats)
        per_stage = overhead / 4 * 1000
        rows.append(
            [f"{step_time * 1000:.0f} ms", f"{ours:.3f} s", f"{theirs:.3f} s", f"{per_stage:.1f} ms", f"{ours / theirs:.3f}", target]
        )
    print(table(["step time", "sdjobs", "direct", "overhead/stage", "ratio", "target"], rows))


if __name__ == "__main__":
    main()
