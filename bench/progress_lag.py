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


def server_jobs(sim: SimulatedWebUI) -> list[tuple[float, float, list[tuple[float, int]]]]:
    """Each job the server ran, in order: (began, ended, [(time, sampling_step) of each step change])."""
    jobs: list[tuple[float, float, list[tuple[float, int]]]] = []
    running = False
    for t, snap in sim.state_changes:
        if snap.job_count == -1 and not running:  # begin(): job_count is -1 for a moment
            jobs.append((t, 0.0, []))
            running = True
        elif snap.job_count == 0 and running:  # end()
            jobs[-1] = (jobs[-1][0], t, jobs[-1][2])
            running = False
        elif running and snap.job_count > 0 and snap.sampling_step > 0:
            jobs[-1][2].append((t, snap.sampling_step))
    return jobs


def lags(sim: SimulatedWebUI, shown: list[tuple[float, int, int | None]]) -> list[float]:
    """For each step change a poll could see (a progress request reached the server after it,
    while that job still ran): the time until a progress hook of that job's stage fired."""
    polls = [t for t, _, path in sim.requests if path == "/sdapi/v1/progress"]
    result = []
    # The bench job sends one request per stage, so the server's k-th job is stage k.
    for stage, (_, ended, steps) in enumerate(server_jobs(sim)):
        for t, _ in steps:
            if not any(t < poll < ended for poll in polls):
                continue  # the request returned before anyone could look
            after = [seen for seen, index, _ in shown if index == stage and seen > t]
            if after:
                result.append(after[0] - t)
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
