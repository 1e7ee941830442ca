"""The runner against the simulated WebUI over real HTTP: stages, cancels, failures, plugins, stalls."""

from __future__ import annotations

import base64
import itertools
import json
import logging
import threading
import time
from pathlib import Path

import attrs
import pytest
from runner_helpers import (
    ALL_STAGES,
    DROPPED_IN_STAGE_TWO,
    FAST,
    GENERATION_PATHS,
    PROGRESS_PATHS,
    Background,
    assert_monotonic,
    in_stage,
    job_spec,
    make_runner,
    requests_to,
)

from sdjobs import hookimpl
from sdjobs.client import WebUIClient

from sdjobs.job import JobSettings
from sdjobs.outputs import MANIFEST, read_parameters, read_provenance
from sdjobs.sim import SimSettings, SimulatedWebUI
from sdjobs.spec import JobSpec
from sdjobs.status import CancelMode, JobState
from sdjobs.testing import RaisingObserver

STEPPING = SimSettings(stepping=True)


def manifest(out_dir: Path) -> dict:
    [path] = out_dir.glob(f"*/{MANIFEST}")
    return json.loads(path.read_text())


def outcomes(runner) -> list[JobState]:
    return list(runner.outcomes.values())


def interrupts(sim) -> int:
    return len(requests_to(sim, ["/sdapi/v1/interrupt"]))


# -- a whole job --------------------------------------------------------------------


@pytest.mark.parametrize("sim_settings", [SimSettings(step_time=0.01, first_step_time=0.01)])
def test_a_four_stage_job_shows_monotonic_progress_in_every_stage(webui_sim, webui_client, tmp_path):
    runner, log = make_runner(webui_client, [job_spec(ALL_STAGES, steps=20)], tmp_path)
    runner.run()
    assert outcomes(runner) == [JobState.DONE]
    statuses = log.statuses()
    for index in range(3):  # the upscale stage (extras) is not polled
        assert len([s for s in statuses if s.stage_index == index]) >= 2, f"stage {index + 1}"
    assert_monotonic(log.statuses(None))
    assert log.one("job_finished")["status"].job_progress == 1.0
    record = manifest(tmp_path)
    assert record["outcome"] == "done"
    assert [(s["stage"], s["images"], s["partial"]) for s in record["stages"]] == [
        ("txt2img", ["01-txt2img/001.png"], False),
        ("img2img", ["02-img2img/001.png"], False),
        ("adetailer", ["03-adetailer/001.png"], False),
        ("upscale", ["04-upscale/001.png"], False),
    ]


THREE_IMAGES = JobSpec.from_mapping(
    {
        "name": "three",
        "prompt": "a lighthouse",
        "seed": 1234,
        "settings": {"steps": 8, "width": 64, "height": 64},
        "stages": [{"type": "txt2img", "n_iter": 3}, {"type": "img2img", "denoising_strength": 0.5}],
    }
)


def at_step_one_of(stage: int, image: int):
    """Progress calls showing step 1 of ``image`` in ``stage`` (both 0-based stage, 1-based image)."""
    return lambda kwargs: (kwargs["status"].stage_index, kwargs["status"].image, kwargs["status"].step) == (
        stage, image, 1
    )


@pytest.mark.parametrize("sim_settings", [STEPPING])
def test_a_stage_of_three_images_says_which_one_its_steps_belong_to(webui_sim, webui_client, tmp_path):
    runner, log = make_runner(webui_client, [THREE_IMAGES], tmp_path)
    running = Background(runner.run)
    # releases to step 1 of each image in turn: txt2img samples 8 steps an image (one request), img2img 5 (one each)
    for (stage, image), steps in zip(itertools.product((0, 1), (1, 2, 3)), (2, 8, 8, 8, 5, 5), strict=True):
        webui_sim.release(steps)
        assert log.wait_for("progress", at_step_one_of(stage, image)), f"stage {stage + 1}, image {image}"
    webui_sim.release(5 - 2)
    running.join()
    assert outcomes(runner) == [JobState.DONE]
    for stage in (0, 1):
        shown = [(status.image, status.images) for status in log.statuses() if status.stage_index == stage]
        assert shown == sorted(shown) and {images for _, images in shown} == {3}, shown


# -- cancels ----------------------------------------------------------------------------


def start_in_stage_two(sim, client, out_dir, specs=None):
    """Run a four-stage job (or ``specs``) until stage 2 shows its second step; return (runner, log, thread)."""
    runner, log = make_runner(client, specs or [job_spec(ALL_STAGES)], out_dir)
    running = Background(runner.run)
    sim.release(8 + 2)  # the 8 steps of stage 1, then 2 of stage 2
    assert log.wait_for("progress", lambda kwargs: kwargs["status"].stage_index == 1 and kwargs["status"].step == 1)
    return runner, log, running


@pytest.mark.parametrize("sim_settings", [STEPPING])
def test_cancel_now_mid_stage_ends_cleanly_and_keeps_the_partial_images(webui_sim, webui_client, tmp_path):
    runner, log, running = start_in_stage_two(webui_sim, webui_client, tmp_path)
    cancelled_at = time.monotonic()
    Background(runner.cancel, CancelMode.NOW).join()  # from a thread other than the runner's
    running.join()  # no step released: only the interrupt made the POST return

    assert outcomes(runner) == [JobState.CANCELLED]
    finished = log.one("job_finished")
    assert finished["outcome"] is JobState.CANCELLED and finished["error"] is None
    result = log.calls[log.find("stage_finished", in_stage(1))][1]["result"]
    assert result.partial and len(result.images) == 1 and result.images[0].is_file()
    record = manifest(tmp_path)
    assert record["outcome"] == "cancelled"
    assert [s["partial"] for s in record["stages"]] == [False, True]
    # the cut is recorded where the image's parameters still say the steps asked for ("Steps: 8": 5 at denoising 0.5)
    cut = {"pass": "main", "face": None, "step": 1, "steps": 5}
    assert read_provenance(result.images[0].read_bytes())["cut"] == cut
    assert "Steps: 8," in read_parameters(result.images[0].read_bytes())
    assert [s["cut"] for s in record["stages"]] == [None, {**cut, "images": ["02-img2img/001.png"]}]
    assert "cut" not in read_provenance((result.images[0].parent.parent / "01-txt2img" / "001.png").read_bytes())
    assert interrupts(webui_sim) == 1
    assert requests_to(webui_sim, GENERATION_PATHS, after=cancelled_at) == []
    assert requests_to(webui_sim, PROGRESS_PATHS, after=log.time_of("job_finished")) == []
    assert log.names()[-2:] == ["job_finished", "queue_drained"]


@pytest.mark.parametrize("sim_settings", [STEPPING, SimSettings(stepping=True, ui=False)], ids=["task", "global"])
def test_cancel_before_the_first_sample_still_interrupts_our_job(webui_sim, webui_client, tmp_path):
    # The poller's first sample is one interval in; a Ctrl-C before it must still stop the render.
    runner, log = make_runner(webui_client, [job_spec()], tmp_path, settings=JobSettings(poll_interval=2.0))
    running = Background(runner.run)
    assert webui_sim.wait_for(lambda s: s.job_count > 0 and s.awaiting_release)
    runner.cancel(CancelMode.NOW)
    running.join()
    assert outcomes(runner) == [JobState.CANCELLED]
    assert interrupts(webui_sim) == 1
    assert log.statuses() == []  # no sample had come in


@pytest.mark.parametrize("sim_settings", [SimSettings(stepping=True, ui=False, progress_latency=30.0)])
def test_a_progress_endpoint_that_hangs_never_holds_up_the_request_or_a_cancel(webui_sim, webui_client, tmp_path):
    settings = JobSettings(poll_interval=0.25, probe_timeout=0.2)
    runner, log = make_runner(webui_client, [job_spec()], tmp_path, settings=settings)
    running = Background(runner.run)
    # The baseline sample hangs; the request goes out once its short wait is over.
    assert webui_sim.wait_for(lambda s: s.job_count > 0 and s.awaiting_release)
    runner.cancel(CancelMode.NOW)
    running.join(timeout=5.0)  # the progress endpoint would answer only after 30 s
    assert outcomes(runner) == [JobState.CANCELLED]
    assert interrupts(webui_sim) == 0  # no sample ever said the running job was ours


@pytest.mark.parametrize("sim_settings", [STEPPING])
def test_cancel_of_a_request_queued_behind_another_clients_job_does_not_interrupt_theirs(
    webui_sim, webui_client, tmp_path
):
    theirs = Background(webui_client.txt2img, {"prompt": "theirs", "steps": 4, "width": 64, "height": 64})
    assert webui_sim.wait_for(lambda s: s.job_count > 0)
    runner, log = make_runner(webui_client, [job_spec()], tmp_path)
    running = Background(runner.run)
    assert webui_sim.wait_for(lambda s: len(s.pending_tasks) == 1)  # ours waits in the server's queue
    runner.cancel(CancelMode.NOW)
    running.join()
    assert outcomes(runner) == [JobState.CANCELLED]
    assert interrupts(webui_sim) == 0
    webui_sim.release(1000)
    assert len(theirs.join().images) == 1  # their job ran to the end


@pytest.mark.parametrize("sim_settings", [STEPPING])
@pytest.mark.parametrize("preview", [True, False])
def test_the_live_preview_reaches_the_status_only_when_asked(webui_sim, webui_client, tmp_path, preview):
    settings = JobSettings(poll_interval=0.01, preview=preview)
    runner, log = make_runner(webui_client, [job_spec(steps=30)], tmp_path, settings=settings)
    running = Background(runner.run)
    webui_sim.release(12)  # A1111 makes a preview every 10 steps
    shown = log.wait_for("progress", lambda kwargs: kwargs["status"].step == 11)
    webui_sim.release(100)
    running.join()
    assert shown
    previews = [status.preview for status in log.statuses() if status.preview]
    if preview:
        assert previews and base64.b64decode(previews[-1]).startswith(b"\x89PNG")
    else:
        assert previews == []


@pytest.mark.parametrize("sim_settings", [STEPPING])
def test_cancel_after_stage_lets_the_stage_finish_and_sends_no_more(webui_sim, webui_client, tmp_path):
    runner, log, running = start_in_stage_two(webui_sim, webui_client, tmp_path)
    runner.cancel(CancelMode.AFTER_STAGE)
    webui_sim.release(100)
    running.join()
    assert outcomes(runner) == [JobState.CANCELLED]
    assert [s["partial"] for s in manifest(tmp_path)["stages"]] == [False, False]
    assert len(requests_to(webui_sim, ["/sdapi/v1/img2img"])) == 1  # stage 3 (adetailer) never sent
    assert interrupts(webui_sim) == 0


@pytest.mark.parametrize("sim_settings", [STEPPING])
def test_cancel_after_stage_during_the_last_stage_ends_done(webui_sim, webui_client, tmp_path):
    specs = [job_spec(("txt2img", "img2img"))]
    runner, log, running = start_in_stage_two(webui_sim, webui_client, tmp_path, specs)
    runner.cancel(CancelMode.AFTER_STAGE)
    webui_sim.release(100)
    running.join()
    assert outcomes(runner) == [JobState.DONE]
    assert manifest(tmp_path)["outcome"] == "done"


@pytest.mark.parametrize("sim_settings", [STEPPING])
def test_cancel_with_rest_runs_no_further_job(webui_sim, webui_client, tmp_path):
    runner, log = make_runner(webui_client, [job_spec(name="sea"), job_spec(name="sky")], tmp_path)
    running = Background(runner.run)
    assert log.wait_for("progress")
    runner.cancel(CancelMode.NOW, rest=True)
    running.join()
    assert outcomes(runner) == [JobState.CANCELLED]
    assert runner.stopped
    assert log.names().count("job_queued") == 2 and log.names().count("job_started") == 1
    assert log.one("queue_drained")["outcomes"] == runner.outcomes
    assert len(requests_to(webui_sim, GENERATION_PATHS)) == 1


# -- failures -------------------------------------------------------------------------


@pytest.mark.parametrize("sim_settings", [SimSettings(step_time=0.001, generation_error="CUDA out of memory")])
def test_a_server_error_fails_the_job_naming_the_stage_and_the_message(webui_client, tmp_path):
    runner, log = make_runner(webui_client, [job_spec(ALL_STAGES)], tmp_path)
    runner.run()
    assert outcomes(runner) == [JobState.FAILED]
    error = log.one("job_finished")["error"]
    assert error.startswith("stage 1/4 (txt2img): ") and "CUDA out of memory" in error
    assert manifest(tmp_path)["error"] == error


@pytest.mark.parametrize("sim_settings", [SimSettings(step_time=0.001, drop_connection_at_step=6)])
def test_a_connection_dropped_at_every_try_fails_the_job_once_the_wait_is_spent(
    webui_sim, webui_client, tmp_path
):
    spec = DROPPED_IN_STAGE_TWO  # every img2img request drops at its 6th step
    runner, log = make_runner(webui_client, [spec], tmp_path, settings=attrs.evolve(FAST, wait_for_webui=2.0))
    runner.run()
    assert outcomes(runner) == [JobState.FAILED]
    error = log.one("job_finished")["error"]
    assert error.startswith("stage 2/2 (img2img): the WebUI stayed unreachable for 2 s: ") and "closed the connection" in error
    posts = [path for _, _, path in requests_to(webui_sim, GENERATION_PATHS)]
    assert posts[:3] == ["/sdapi/v1/txt2img", "/sdapi/v1/img2img", "/sdapi/v1/img2img"]  # sent again
    told = log.statuses("webui_unreachable")
    assert told and {status.stage_index for status in told} == {1}
    assert [(s["stage"], s["partial"], s["images"]) for s in manifest(tmp_path)["stages"]] == [
        ("txt2img", False, ["01-txt2img/001.png"]),
        ("img2img", True, []),
    ]
    assert log.names().count("stage_started") == 2  # the stage went on; it did not start again


def test_a_server_that_answers_nonsense_fails_each_job_without_crashing_the_run(canned_server, tmp_path):
    # Every route answers a 200 "generation" whose image is not a PNG: the lists make no sense
    # and the image cannot be written.  Each job fails on its own; the run goes on to the end.
    url = canned_server(200, {"images": [base64.b64encode(b"not a png").decode()], "info": "{}"})
    with WebUIClient(url, retries=0) as client:
        runner, log = make_runner(client, [job_spec(name="one"), job_spec(name="two")], tmp_path)
        runner.run()
    assert outcomes(runner) == [JobState.FAILED, JobState.FAILED]
    errors = [kwargs["error"] for name, kwargs in log.calls if name == "job_finished"]
    assert len(errors) == 2 and all("expected an array, got an object" in error for error in errors)
    assert log.names()[-1] == "queue_drained"


def test_an_unexpected_error_fails_the_job_naming_it_and_the_next_job_runs(webui_client, tmp_path):
    class BrokenPoller:
        def stop(self):
            raise RuntimeError("the poller's thread is gone")

    class PollsBrokenlyInTheFirstJob:
        def __init__(self):
            self.first_job = True

        @hookimpl(tryfirst=True)
        def sdjobs_start_polling(self, request):
            return BrokenPoller() if self.first_job else None  # None: the built-in poller takes over

        @hookimpl
        def sdjobs_job_finished(self):
            self.first_job = False

    specs = [job_spec(name="one"), job_spec(name="two")]
    runner, log = make_runner(webui_client, specs, tmp_path, plugins=[PollsBrokenlyInTheFirstJob()])
    runner.run()
    assert outcomes(runner) == [JobState.FAILED, JobState.DONE]
    first = next(kwargs for name, kwargs in log.calls if name == "job_finished")
    assert first["error"] == "stage 1/1 (txt2img): RuntimeError: the poller's thread is gone"


def test_a_server_that_stays_down_fails_one_job_after_the_wait_and_starts_no_other(closed_port_url, tmp_path):
    settings = attrs.evolve(FAST, wait_for_webui=1.5)
    with WebUIClient(closed_port_url, retries=0) as client:
        runner, log = make_runner(client, [job_spec(name="one"), job_spec(name="two")], tmp_path, settings=settings)
        runner.run()  # no exception
    assert outcomes(runner) == [JobState.FAILED] and runner.webui_down
    error = log.one("job_finished")["error"]
    assert error.startswith("the WebUI stayed unreachable for 1.5 s: ") and f"cannot reach {closed_port_url}" in error


def test_a_server_that_comes_up_later_is_followed_by_task_id(closed_port_url, tmp_path):
    port = int(closed_port_url.rsplit(":", 1)[1])
    with WebUIClient(closed_port_url, retries=0) as client:
        down, _ = make_runner(client, [job_spec()], tmp_path / "down", settings=attrs.evolve(FAST, wait_for_webui=0.5))
        down.run()
        with SimulatedWebUI(SimSettings(step_time=0.002, first_step_time=0.002), port=port) as sim:
            up, _ = make_runner(client, [job_spec()], tmp_path / "up")
            up.run()
    assert outcomes(down) == [JobState.FAILED] and outcomes(up) == [JobState.DONE]
    [job_id] = up.outcomes
    assert f"sdjobs-{job_id}-1-1" in {state.current_task for _, state in sim.state_changes}


@pytest.mark.parametrize(
    ("spec", "named"),
    [
        (job_spec(sampler_name="Nope"), "stage 1 (txt2img): sampler_name 'Nope' is not on the server; choose one of: "),
        (
            JobSpec.from_mapping(
                {
                    "name": "bad upscaler",
                    "prompt": "a lighthouse",
                    "seed": 1,
                    "stages": [{"type": "txt2img"}, {"type": "upscale", "upscaler": "Nope", "scale": 2}],
                }
            ),
            "stage 2 (upscale): upscaler 'Nope' is not on the server; choose one of: ",
        ),
    ],
    ids=["sampler", "upscaler"],
)
def test_preflight_fails_a_job_with_an_unknown_name_before_any_request(webui_sim, webui_client, tmp_path, spec, named):
    runner, log = make_runner(webui_client, [spec], tmp_path)
    runner.run()
    assert outcomes(runner) == [JobState.FAILED]
    error = log.one("job_finished")["error"]
    assert named in error
    choices = error.split("choose one of: ")[1].split(", ")
    assert "Euler a" in choices or "Lanczos" in choices
    assert requests_to(webui_sim, GENERATION_PATHS) == []
    assert log.names() == ["job_queued", "job_started", "job_finished", "queue_drained"]


def test_a_failed_job_does_not_stop_the_next(webui_client, tmp_path):
    specs = [job_spec(name="bad", sampler_name="Nope"), job_spec(name="good")]
    runner, log = make_runner(webui_client, specs, tmp_path)
    runner.run()
    assert outcomes(runner) == [JobState.FAILED, JobState.DONE]
    assert not runner.stopped


# -- seeds and files ----------------------------------------------------------------------


class PayloadLog:
    """Keeps a copy of every payload sent, by stage type."""

    def __init__(self) -> None:
        self.payloads: list[tuple[str, dict]] = []

    @hookimpl
    def sdjobs_amend_payload(self, payload, stage):
        self.payloads.append((stage.type, dict(payload)))


def test_a_random_seed_is_drawn_before_the_first_request_and_carried_through(webui_client, tmp_path):
    spec = job_spec(ALL_STAGES, seed=-1)
    assert spec.seed >= 0
    payloads = PayloadLog()
    runner, log = make_runner(webui_client, [spec], tmp_path, plugins=[payloads])
    runner.run()
    assert outcomes(runner) == [JobState.DONE]
    assert log.one("job_started")["status"].seed == spec.seed
    generation = [(kind, payload["seed"]) for kind, payload in payloads.payloads if kind != "upscale"]
    assert generation == [("txt2img", spec.seed), ("img2img", spec.seed), ("adetailer", spec.seed)]
    for status in log.statuses("stage_finished"):
        assert status.seed == spec.seed
    job_id = log.one("job_started")["status"].job_id
    [job_folder] = tmp_path.glob(f"*-{job_id[:8]}")
    for stage, folder in enumerate(["01-txt2img", "02-img2img", "03-adetailer", "04-upscale"]):
        png = (job_folder / folder / "001.png").read_bytes()
        assert read_provenance(png) == {
            "job_id": job_id,
            "stage": ALL_STAGES[stage],
            "stage_index": stage,
            "seed": spec.seed,
        }
        assert f"Seed: {spec.seed}" in read_parameters(png)  # the upscaled image too


# -- plugins -------------------------------------------------------------------------------


def test_a_raising_observer_is_logged_by_name_and_the_job_goes_on(webui_client, tmp_path, caplog):
    runner, log = make_runner(webui_client, [job_spec(("txt2img", "img2img"))], tmp_path)
    runner.hooks.pm.register(RaisingObserver(), name="raising-observer")
    with caplog.at_level(logging.ERROR, logger="sdjobs.hooks"):
        runner.run()
    assert outcomes(runner) == [JobState.DONE]
    assert "plugin 'raising-observer' failed in sdjobs_stage_finished; the job goes on" in caplog.messages
    assert log.names().count("stage_finished") == 2  # the other observers still saw it


class RaisingAmender:
    @hookimpl
    def sdjobs_amend_payload(self, payload):
        raise KeyError("lora")


def test_a_raising_payload_plugin_fails_the_job_naming_it(webui_sim, webui_client, tmp_path):
    runner, log = make_runner(webui_client, [job_spec()], tmp_path)
    runner.hooks.pm.register(RaisingAmender(), name="my-amender")
    runner.run()
    assert outcomes(runner) == [JobState.FAILED]
    error = log.one("job_finished")["error"]
    assert error == "stage 1/1 (txt2img): plugin 'my-amender' failed in sdjobs_amend_payload: 'lora'"
    assert requests_to(webui_sim, GENERATION_PATHS) == []


class LoraTag:
    @hookimpl
    def sdjobs_amend_payload(self, payload, stage):
        if stage.type == "txt2img":
            payload["prompt"] += " <lora:film-grain:0.6>"


def test_a_payload_plugin_reaches_the_server(webui_client, tmp_path):
    runner, log = make_runner(webui_client, [job_spec()], tmp_path, plugins=[LoraTag()])
    runner.run()
    [result] = [kwargs["result"] for name, kwargs in log.calls if name == "stage_finished"]
    parameters = read_parameters(result.images[0].read_bytes())
    assert parameters.startswith("a lighthouse at dusk <lora:film-grain:0.6>\n")


# -- stalls --------------------------------------------------------------------------------

STUCK = SimSettings(step_time=0.01, first_step_time=0.01, progress_stuck=True, ui=False)


class StallAlarm:
    def __init__(self) -> None:
        self.rang = threading.Event()

    @hookimpl
    def sdjobs_job_stalled(self):
        self.rang.set()


@pytest.mark.parametrize("sim_settings", [STUCK])
def test_a_stalled_stage_is_reported_once(webui_sim, webui_client, tmp_path):
    alarm = StallAlarm()
    settings = JobSettings(poll_interval=0.02, stall_after=0.3)
    runner, log = make_runner(webui_client, [job_spec(steps=2000)], tmp_path, plugins=[alarm], settings=settings)
    running = Background(runner.run)
    assert alarm.rang.wait(5.0)
    runner.cancel(CancelMode.NOW)
    running.join()
    assert log.names().count("job_stalled") == 1
    assert log.one("job_stalled")["seconds"] >= 0.3
    assert outcomes(runner) == [JobState.CANCELLED]


@pytest.mark.parametrize("sim_settings", [STUCK])
def test_a_long_stall_is_interrupted_and_fails_the_job(webui_sim, webui_client, tmp_path):
    settings = JobSettings(poll_interval=0.02, stall_after=0.2, stall_interrupt_after=0.4)
    runner, log = make_runner(webui_client, [job_spec(steps=2000)], tmp_path, settings=settings)
    Background(runner.run).join()  # 2000 steps would take 20 s
    assert outcomes(runner) == [JobState.FAILED]
    assert log.one("job_finished")["error"] == "stage 1/1 (txt2img): stalled; interrupted"
    assert interrupts(webui_sim) == 1
    assert log.names().count("job_stalled") == 1
    assert manifest(tmp_path)["stages"][0]["partial"] is True
