"""Progress lag: from the simulator's step change to the `sdjobs_progress` hook showing it.

Steps of 0.2 s, the default poll interval of 0.5 s, the built-in poller.
Target: p95 ≤ poll interval + 20 ms.  Run: python bench/progress_lag.py
"""

from __future__ import annotations

import time

from _common import four_stage_job, percentile, run_jobs, table
from sdjobs import hookimpl
from sdjobs.client import WebUIClient
from sdjobs.polling import DEFAULT_POLL_INTERVAL
from sdjobs.sim import SimSettings, SimulatedWebUI


class StepClock:
    """When each (stage, step) was first shown by a progress hook."""

    def __init__(self) -> None:
        self.shown: list[tuple[float, int, int | None]] = []

    @hookimpl
    def sdjobs_progress(self, status):
        self.shown.append((time.monotonic(), status.stage_index, status.step))


def lags(sim: SimulatedWebUI, shown: list[tuple[float, int, int | None]]) -> list[float]:
    """For every sampling step the server took, the time until a hook showed that step or a later one."""
    changes = [
        (t, snap.job_timestamp, snap.job_no, snap.sampling_step)
        for t, snap in sim.state_changes
        if snap.job_count > 0 and snap.sampling_step > 0
    ]
    result = []
    for t, _, _, step in changes:
        later = [seen for seen, _, shown_step in shown if seen >= t and shown_step is not None and shown_step >= step]
        if later and later[0] - t < 5:
            result.append(later[0] - t)
    return result


def main() -> None:
    settings = SimSettings(step_time=0.2, first_step_time=0.2)
    clock = StepClock()
    with SimulatedWebUI(settings) as sim, WebUIClient(sim.url) as client:
        run_jobs([four_stage_job(steps=20)], client, plugins=[clock], poll_interval=DEFAULT_POLL_INTERVAL)
        measured = lags(sim, clock.shown)
    target = DEFAULT_POLL_INTERVAL + 0.020
    print(
        table(
            ["steps seen", "p50", "p95", "max", "target (p95)"],
            [[len(measured), f"{percentile(measured, 50) * 1000:.0f} ms", f"{percentile(measured, 95) * 1000:.0f} ms", f"{max(measured) * 1000:.0f} ms", f"≤ {target * 1000:.0f} ms"]],
        )
    )


if __name__ == "__main__":
    main()
