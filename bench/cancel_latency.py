"""Cancel latency: from `cancel()` to the job's `cancelled`, less the server's own return.

A txt2img of 20 steps of 0.1 s is cancelled at its 5th step, 20 times.  The
server needs about one step to return the interrupted request; what sdjobs adds
on top is measured from that return to `sdjobs_job_finished`.
Target: ≤ 50 ms plus the server's own return.  Run: python bench/cancel_latency.py
"""

from __future__ import annotations

import statistics
import threading
import time

from _common import four_stage_job, percentile, runner_for, table
from sdjobs import hookimpl
from sdjobs.client import WebUIClient
from sdjobs.status import CancelMode
from sdjobs.sim import SimSettings, SimulatedWebUI

RUNS = 20


class TimedClient(WebUIClient):
    """Notes when each generation request returned."""

    returned_at: float = 0.0

    def generate(self, *args, **kwargs):
        try:
            return super().generate(*args, **kwargs)
        finally:
            self.returned_at = time.monotonic()


class CancelAtStep:
    def __init__(self, step: int) -> None:
        self.step = step
        self.runner = None
        self.cancelled_at = 0.0
        self.finished_at = 0.0
        self.outcome = None

    @hookimpl
    def sdjobs_progress(self, status):
        if not self.cancelled_at and (status.step or 0) >= self.step:
            self.cancelled_at = time.monotonic()
            threading.Thread(target=self.runner.cancel, args=(CancelMode.NOW,)).start()

    @hookimpl
    def sdjobs_job_finished(self, outcome):
        self.finished_at = time.monotonic()
        self.outcome = outcome


def one_run(client: TimedClient) -> tuple[float, float]:
    """Seconds from cancel to the server's return, and from that return to `job_finished`."""
    canceller = CancelAtStep(step=5)
    with runner_for([four_stage_job(steps=20)], client, [canceller], poll_interval=0.25) as runner:
        canceller.runner = runner
        runner.run()
    assert canceller.outcome == "cancelled", canceller.outcome
    return client.returned_at - canceller.cancelled_at, canceller.finished_at - client.returned_at


def main() -> None:
    settings = SimSettings(step_time=0.1, first_step_time=0.1)
    with SimulatedWebUI(settings) as sim, TimedClient(sim.url) as client:
        runs = [one_run(client) for _ in range(RUNS)]
    server = [s for s, _ in runs]
    ours = [o for _, o in runs]
    print(
        table(
            ["runs", "server's return (median)", "sdjobs after it: median", "p95", "max", "target"],
            [[RUNS, f"{statistics.median(server) * 1000:.0f} ms", f"{statistics.median(ours) * 1000:.1f} ms", f"{percentile(ours, 95) * 1000:.1f} ms", f"{max(ours) * 1000:.1f} ms", "≤ 50 ms"]],
        )
    )


if __name__ == "__main__":
    main()
