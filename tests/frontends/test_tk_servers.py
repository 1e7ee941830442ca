"""The Tk window of a worker with several servers: a row per server with its running job, in a real
window on a private X server, fed by a real worker on two simulated servers."""

from __future__ import annotations

import pytest
from runner_helpers import Background, job_spec, make_lanes
from tkwindow import on_tk, rows

from sdjobs.frontend import FrontendOptions
from sdjobs.frontends.tk import TkFrontend
from sdjobs.sim import SimSettings, SimulatedWebUI
from sdjobs.sqlite_store import SQLiteStore
from sdjobs.status import JobState
from sdjobs.worker import Worker

pytestmark = pytest.mark.usefixtures("x_display")


def test_a_row_per_server_shows_its_running_job_and_stage_then_idle_and_down(queue_file, tmp_path):
    frontend = TkFrontend(FrontendOptions(close_when_done=True))
    seen: dict[str, list[tuple[str, ...]]] = {}
    with SimulatedWebUI(SimSettings(stepping=True)) as desk, SimulatedWebUI(SimSettings(stepping=True)) as rented, \
            SQLiteStore(queue_file) as store:  # fmt: skip
        jobs = store.add([job_spec(name="sea"), job_spec(name="sky")])
        lanes, log = make_lanes({"desk": desk.url, "rented": rented.url}, tmp_path / "out", plugins=[frontend], health_interval=0.1)
        worker = Worker(store, lanes=lanes, idle_poll=0.05)

        def drive() -> None:
            """Both servers hold a step of their job: look; let them finish and look; stop one and look; stop."""
            try:
                for name in ("desk", "rented"):
                    assert log.wait_for("stage_started", lambda call, name=name: call["status"].server == name, timeout=10)
                seen["busy"] = on_tk(frontend, lambda panel: sorted(rows(panel.servers)))
                for sim in (desk, rented):
                    sim.release(10_000)
                for job in jobs:
                    assert log.wait_for("job_finished", lambda call, job=job: call["status"].job_id == job.id, timeout=20)
                seen["idle"] = on_tk(frontend, lambda panel: sorted(rows(panel.servers)))
                desk.stop()
                assert log.wait_for("server_down", lambda call: call["server"] == "desk", timeout=10)
                seen["down"] = on_tk(frontend, lambda panel: sorted(rows(panel.servers)))
            finally:
                worker.cancel(rest=True)  # the session ends, and with close_when_done the window closes

        driving = Background(drive)
        assert frontend.run(worker) is None
        driving.join(timeout=10)
    busy = [(server, up, job, stage) for server, up, job, stage, _ in seen["busy"]]
    assert busy in ([("desk", "up", "sea", "1/1 txt2img"), ("rented", "up", "sky", "1/1 txt2img")],
                    [("desk", "up", "sky", "1/1 txt2img"), ("rented", "up", "sea", "1/1 txt2img")])  # fmt: skip
    assert all(progress.endswith("%") for *_, progress in seen["busy"])
    assert seen["idle"] == [("desk", "up", "-", "-", "-"), ("rented", "up", "-", "-", "-")]
    assert seen["down"] == [("desk", "down", "-", "-", "-"), ("rented", "up", "-", "-", "-")]
    assert set(worker.outcomes.values()) == {JobState.DONE} and len(worker.outcomes) == 2
