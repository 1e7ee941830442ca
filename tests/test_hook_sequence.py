"""The exact order of hook calls in whole runs against the simulated WebUI.

The simulator runs in stepping mode, and each stage's steps are released only
once the stage has shown progress, so every sampled stage has at least one
progress call.  Consecutive progress calls are collapsed into one.
"""

from __future__ import annotations

import pytest
from runner_helpers import ALL_STAGES, DROPPED_IN_STAGE_TWO, Background, HookLog, in_stage, job_spec, make_runner

from sdjobs import hookimpl
from sdjobs.status import CancelMode
from sdjobs.sim import SimSettings, SimulatedWebUI
from sdjobs.spec import JobSpec
from sdjobs.testing import follows_documented_order


def collapsed(log: HookLog) -> list[str]:
    """The hook names, each run of progress calls as one."""
    names = log.names()
    return [name for i, name in enumerate(names) if not (name == "progress" and names[i - 1] == "progress")]


def show_progress_then_release(sim: SimulatedWebUI, log: HookLog, spec: JobSpec, stages: range) -> None:
    """For each stage in ``stages``: wait until it has shown progress, then let all its steps run."""
    for index in stages:
        assert log.wait_for("progress", showing(spec, index)), f"stage {index + 1} showed no progress"
        sim.release(spec.plan()[index].steps)


def showing(spec: JobSpec, index: int):
    """A `HookLog.wait_for` filter: a call about stage ``index`` of job ``spec``."""
    return lambda kwargs: kwargs["status"].name == spec.name and kwargs["status"].stage_index == index


@pytest.mark.parametrize("sim_settings", [SimSettings(stepping=True)])
def test_a_four_stage_job_calls_its_hooks_in_the_documented_order(webui_sim, webui_client, tmp_path):
    spec = job_spec(ALL_STAGES)
    runner, log = make_runner(webui_client, [spec], tmp_path)
    running = Background(runner.run)
    show_progress_then_release(webui_sim, log, spec, range(3))
    running.join()
    assert collapsed(log) == [
        "job_queued",
        "job_started",
        "stage_started", "progress", "stage_finished",  # txt2img
        "stage_started", "progress", "stage_finished",  # img2img
        "stage_started", "progress", "stage_finished",  # adetailer
        "stage_started", "stage_finished",  # upscale: extras are not polled
        "job_finished",
        "queue_drained",
    ]  # fmt: skip
    assert follows_documented_order(log.names()[1:-1], stages=4)


@pytest.mark.parametrize("sim_settings", [SimSettings(stepping=True)])
def test_a_cancelled_job_ends_with_its_partial_stage(webui_sim, webui_client, tmp_path):
    spec = job_spec(ALL_STAGES)
    runner, log = make_runner(webui_client, [spec], tmp_path)
    running = Background(runner.run)
    show_progress_then_release(webui_sim, log, spec, range(1))
    assert log.wait_for("progress", in_stage(1))
    runner.cancel(CancelMode.NOW)
    running.join()
    assert collapsed(log) == [
        "job_queued",
        "job_started",
        "stage_started", "progress", "stage_finished",  # txt2img
        "stage_started", "progress", "stage_finished",  # img2img, partial
        "job_finished",
        "queue_drained",
    ]  # fmt: skip
    assert log.calls[log.find("stage_finished", in_stage(1))][1]["result"].partial


class RefusesImg2imgOf:
    """A plugin that cannot amend the img2img request of job ``name``: that job fails there."""

    def __init__(self, name: str) -> None:
        self.name = name

    @hookimpl
    def sdjobs_amend_payload(self, payload, stage, status):
        if status.name == self.name and stage.type == "img2img":
            raise ValueError("no img2img today")


@pytest.mark.parametrize("sim_settings", [SimSettings(stepping=True)])
def test_a_failed_job_ends_its_failed_stage_partial_and_the_next_job_runs(
    webui_sim, webui_client, tmp_path
):
    failing = DROPPED_IN_STAGE_TWO
    following = job_spec(name="after", steps=4)
    runner, log = make_runner(webui_client, [failing, following], tmp_path, plugins=[RefusesImg2imgOf(failing.name)])
    running = Background(runner.run)
    show_progress_then_release(webui_sim, log, failing, range(1))
    show_progress_then_release(webui_sim, log, following, range(1))
    running.join()
    assert collapsed(log) == [
        "job_queued",
        "job_queued",
        "job_started",
        "stage_started", "progress", "stage_finished",  # txt2img
        "stage_started", "stage_finished",  # img2img: its request could not be built, partial, no image
        "job_finished",
        "job_started",
        "stage_started", "progress", "stage_finished",
        "job_finished",
        "queue_drained",
    ]  # fmt: skip
    assert [kwargs["outcome"] for name, kwargs in log.calls if name == "job_finished"] == ["failed", "done"]
