"""The Tk window of a worker with several servers: a row per server with its running job, in a real
window on a private X server, fed by a real worker on two simulated servers."""

from __future__ import annotations

import signal

import pytest
from process_helpers import killable_sim
from runner_helpers import Background, job_spec, make_lanes
from tkwindow import on_tk, rows

from sdjobs.cli import exit_status

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


def test_two_servers_in_the_window_one_killed_every_one_of_20_jobs_ends_done_with_its_images_once(queue_file, tmp_path):
    """The issue's "done when": one worker, two WebUIs (`sdjobs sim` processes), 20 queued jobs, both
    servers seen working in the Tk window, one killed (SIGKILL) on the way."""
    frontend = TkFrontend(FrontendOptions(close_when_done=True))
    seen: dict[str, list[tuple[str, ...]]] = {}
    with killable_sim("--step-time", "0.02") as (desk, desk_url), killable_sim("--step-time", "0.02") as (_, rented_url), \
            SQLiteStore(queue_file) as store:  # fmt: skip
        jobs = store.add([job_spec(("txt2img", "img2img"), name=f"job{n}", steps=6) for n in range(20)])
        lanes, log = make_lanes({"desk": desk_url, "rented": rented_url}, tmp_path / "out", plugins=[frontend], health_interval=0.1)
        worker = Worker(store, lanes=lanes, until_empty=True, idle_poll=0.05)

        def finished() -> set[str]:
            return {call["status"].job_id for name, call in log.calls if name == "job_finished"}

        def busy(panel) -> list[tuple[str, ...]]:
            return sorted(row[:3] for row in rows(panel.servers) if row[2] != "-")

        def drive() -> None:
            """Both servers seen running a job in the window; once 4 jobs are done, desk is killed."""
            try:
                for name in ("desk", "rented"):
                    assert log.wait_for("stage_started", lambda call, name=name: call["status"].server == name, timeout=20)
                for _ in range(100):  # the window shows what the hooks said once Tk has run their updates
                    seen["busy"] = on_tk(frontend, busy)
                    if [server for server, *_ in seen["busy"]] == ["desk", "rented"]:
                        break
                assert log.wait_for("job_finished", lambda call: len(finished()) >= 4, timeout=30)
                assert log.wait_for("stage_started", lambda call: call["status"].server == "desk" and call["status"].stage_index == 1
                                    and call["status"].job_id not in finished(), timeout=10)  # fmt: skip
                desk.send_signal(signal.SIGKILL)  # in stage 2 of a job
                assert log.wait_for("server_down", lambda call: call["server"] == "desk", timeout=10)
                seen["down"] = on_tk(frontend, lambda panel: sorted(row[:2] for row in rows(panel.servers)))
            except BaseException:
                worker.cancel(rest=True)
                raise

        driving = Background(drive)
        assert frontend.run(worker) is None
        driving.join(timeout=10)
        records = [store.get(job.id) for job in jobs]
    assert [server for server, up, _ in seen["busy"]] == ["desk", "rented"] and {up for _, up, _ in seen["busy"]} == {"up"}
    assert seen["down"] == [("desk", "down"), ("rented", "up")]
    assert exit_status(worker) == 0 and set(worker.outcomes.values()) == {JobState.DONE} and len(worker.outcomes) == 20
    for record in records:
        assert record.state is JobState.DONE
        assert sorted(path.relative_to(record.folder).as_posix() for path in record.folder.rglob("*.png")) == [
            "01-txt2img/001.png", "02-img2img/001.png"]  # fmt: skip
    assert any(record.attempts == 2 and record.server == rented_url for record in records)  # desk's job ran on
