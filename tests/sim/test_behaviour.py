"""What the simulated WebUI does, request by request, in stepping mode where states matter."""

from __future__ import annotations

import http.client
import itertools
import json
import threading
from collections.abc import Callable

import pytest
import requests

from sdjobs.sim import SimSettings, SimulatedWebUI, StateSnapshot
from sdjobs.sim.state import sdapi_progress

from .conftest import TXT2IMG, decode_png, get, png_base64, post


def parked(step: int, job_no: int = 0) -> Callable[[StateSnapshot], bool]:
    """A stepping-mode predicate: waiting for a release at this step of this pass."""
    return lambda s: s.awaiting_release and s.sampling_step == step and s.job_no == job_no


def keys(sim: SimulatedWebUI) -> list[tuple[int, int, int, int]]:
    states = [(s.job_count, s.job_no, s.sampling_steps, s.sampling_step) for _, s in sim.state_changes]
    return [k for i, k in enumerate(states) if i == 0 or states[i - 1] != k]


# -- progress ------------------------------------------------------------------


def test_progress_follows_a1111_formula_over_iterations(stepping_sim, background) -> None:
    call = background(post, stepping_sim, "/sdapi/v1/txt2img", {**TXT2IMG, "n_iter": 2})
    seen = []
    for job_no in range(2):
        for step in range(3):  # the last step's callback ends the pass: it is never parked at
            assert stepping_sim.wait_for(parked(step, job_no))
            body = get(stepping_sim, "/sdapi/v1/progress").json()
            assert body["state"]["job"] == f"Batch {job_no + 1} out of 2"
            seen.append(round(body["progress"], 4))
            stepping_sim.release(1 if step else 2)  # the first step's callback shows step 0 again
    assert call.result().status_code == 200
    assert seen == [0.01, 0.135, 0.26, 0.51, 0.635, 0.76]


def test_eta_is_computed_before_clamping() -> None:
    state = StateSnapshot(job_count=1, job_no=1, time_start=100.0)
    progress, eta = sdapi_progress(state, now=110.0)
    assert progress == 1.0
    assert eta == pytest.approx(10 / 1.01 - 10)  # slightly negative, as on the recorded server


def test_idle_state_is_stale(fast_sim) -> None:
    assert get(fast_sim, "/sdapi/v1/progress").json()["state"]["job_timestamp"] == "0"
    post(fast_sim, "/sdapi/v1/txt2img", {**TXT2IMG, "n_iter": 3})
    body = get(fast_sim, "/sdapi/v1/progress").json()
    assert (body["progress"], body["eta_relative"]) == (0.0, 0.0)
    assert body["state"]["job_count"] == 0
    assert (body["state"]["job_no"], body["state"]["sampling_steps"]) == (3, 4)


def test_hires_doubles_job_count_and_returns_the_larger_image(stepping_sim, background) -> None:
    request = {**TXT2IMG, "enable_hr": True, "hr_scale": 2, "hr_upscaler": "Latent", "hr_second_pass_steps": 3, "denoising_strength": 0.5}
    call = background(post, stepping_sim, "/sdapi/v1/txt2img", request)
    stepping_sim.release(100)
    response = call.result()
    assert keys(stepping_sim)[-5:] == [(2, 1, 3, 0), (2, 1, 3, 1), (2, 1, 3, 2), (2, 2, 3, 0), (0, 2, 3, 0)]
    assert decode_png(response.json()["images"][0]).size == (128, 128)
    assert json.loads(response.json()["info"])["width"] == 64


def test_adetailer_raises_job_count_after_the_main_pass(make_sim, background) -> None:
    sim = make_sim(stepping=True, faces=2)
    tab = {"ad_model": "face_yolov8n.pt", "ad_steps": 4, "ad_use_steps": True}
    request = {**TXT2IMG, "alwayson_scripts": {"adetailer": {"args": [True, False, tab]}}}
    call = background(post, sim, "/sdapi/v1/txt2img", request)
    sim.release(100)
    infotext = json.loads(call.result().json()["info"])["infotexts"][0]
    assert (1, 1, 4, 0) in keys(sim) and (3, 1, 2, 1) in keys(sim)  # 1.0, then the drop to 0.343
    assert "ADetailer model: face_yolov8n.pt" in infotext and "ADetailer version: 25.3.0" in infotext


def test_adetailer_skip_img2img_runs_only_the_inpaint_passes(make_sim, background) -> None:
    sim = make_sim(stepping=True, faces=1)
    tab = {"ad_model": "face_yolov8n.pt", "ad_denoising_strength": 0.5}
    request = {**TXT2IMG, "steps": 8, "init_images": [png_base64()], "alwayson_scripts": {"ADetailer": {"args": [True, True, tab]}}}
    call = background(post, sim, "/sdapi/v1/img2img", request)
    sim.release(100)
    assert call.result().status_code == 200
    assert {k[2] for k in keys(sim) if k[3]} == {5}  # only int(8*0.5)+1-step passes ran
    assert (2, 1, 5, 0) in keys(sim)


def test_adetailer_tab_with_an_unknown_key_is_ignored(fast_sim) -> None:
    tab = {"ad_model": "face_yolov8n.pt", "ad_mask_k_largest": 1}
    request = {**TXT2IMG, "alwayson_scripts": {"ADetailer": {"args": [True, False, tab]}}}
    info = json.loads(post(fast_sim, "/sdapi/v1/txt2img", request).json()["info"])
    assert info["extra_generation_params"] == {}
    assert max(s.job_count for _, s in fast_sim.state_changes) == 1


# -- interrupt and skip ----------------------------------------------------------


def test_interrupt_returns_the_images_made_so_far(stepping_sim, background) -> None:
    call = background(post, stepping_sim, "/sdapi/v1/txt2img", {**TXT2IMG, "n_iter": 3})
    stepping_sim.release(6)
    assert stepping_sim.wait_for(parked(1, job_no=1))
    assert post(stepping_sim, "/sdapi/v1/interrupt").json() == {}
    response = call.result()
    assert response.status_code == 200
    assert len(response.json()["images"]) == 2
    assert "Batch 3 out of 3" not in {s.job for _, s in stepping_sim.state_changes}
    assert stepping_sim.snapshot().interrupted  # stale until the next job begins


def test_interrupt_during_the_first_hires_pass_returns_the_small_image(stepping_sim, background) -> None:
    request = {**TXT2IMG, "enable_hr": True, "hr_upscaler": "Latent", "denoising_strength": 0.5}
    call = background(post, stepping_sim, "/sdapi/v1/txt2img", request)
    stepping_sim.release(2)
    assert stepping_sim.wait_for(parked(1))
    post(stepping_sim, "/sdapi/v1/interrupt")
    images = call.result().json()["images"]
    assert [decode_png(image).size for image in images] == [(64, 64)]
    assert not any(k[1] == 1 and k[3] for k in keys(stepping_sim))  # the hires pass never stepped


def test_interrupt_and_skip_while_idle_do_not_touch_the_next_job(fast_sim) -> None:
    post(fast_sim, "/sdapi/v1/interrupt")
    assert post(fast_sim, "/sdapi/v1/skip").json() is None
    response = post(fast_sim, "/sdapi/v1/txt2img", TXT2IMG)
    assert len(response.json()["images"]) == 1
    assert max(k[3] for k in keys(fast_sim)) == 3  # every step ran
    assert not fast_sim.snapshot().interrupted


def test_skip_ends_only_the_current_iteration(stepping_sim, background) -> None:
    call = background(post, stepping_sim, "/sdapi/v1/txt2img", {**TXT2IMG, "n_iter": 2})
    stepping_sim.release(2)
    assert stepping_sim.wait_for(parked(1))
    post(stepping_sim, "/sdapi/v1/skip")
    assert stepping_sim.wait_for(parked(0, job_no=1))
    assert not stepping_sim.snapshot().skipped  # cleared as the next iteration starts
    stepping_sim.release(100)
    assert len(call.result().json()["images"]) == 2
    assert (2, 1, 4, 3) in keys(stepping_sim)


# -- queue and tasks -------------------------------------------------------------


def test_requests_run_one_at_a_time_in_arrival_order(stepping_sim, background) -> None:
    def internal(task: str) -> dict:
        return post(stepping_sim, "/internal/progress", {"id_task": task}).json()

    calls = [background(post, stepping_sim, "/sdapi/v1/txt2img", {**TXT2IMG, "force_task_id": "a"})]
    assert stepping_sim.wait_for(lambda s: s.current_task == "a" and s.awaiting_release)
    for task in ("b", "c"):
        calls.append(background(post, stepping_sim, "/sdapi/v1/txt2img", {**TXT2IMG, "force_task_id": task}))
        assert stepping_sim.wait_for(lambda s: task in s.pending_tasks)
    assert [internal(t)["textinfo"] for t in "abc"] == [None, "In queue: 1/2", "In queue: 2/2"]
    assert internal("a")["active"] and internal("b")["queued"]
    stepping_sim.release(100)
    for call in calls:
        assert call.result().status_code == 200
    started = [s.current_task for _, s in stepping_sim.state_changes if s.current_task]
    assert [t for i, t in enumerate(started) if i == 0 or started[i - 1] != t] == ["a", "b", "c"]
    assert all(internal(t)["completed"] for t in "abc")


def test_live_preview_every_n_steps(stepping_sim, background) -> None:
    post(stepping_sim, "/sdapi/v1/options", {"show_progress_every_n_steps": 2})
    background(post, stepping_sim, "/sdapi/v1/txt2img", {**TXT2IMG, "force_task_id": "p"})
    request = {"id_task": "p", "id_live_preview": -1, "live_preview": True}
    assert stepping_sim.wait_for(parked(0))
    assert post(stepping_sim, "/internal/progress", request).json()["live_preview"] is None
    stepping_sim.release(3)
    assert stepping_sim.wait_for(parked(2))
    answer = post(stepping_sim, "/internal/progress", request).json()
    assert answer["live_preview"].startswith("data:image/png;base64,") and answer["id_live_preview"] == 1
    assert get(stepping_sim, "/sdapi/v1/progress", params={"skip_current_image": "false"}).json()["current_image"]
    assert get(stepping_sim, "/sdapi/v1/progress", params={"skip_current_image": "true"}).json()["current_image"] is None
    stepping_sim.release(100)


# -- results -------------------------------------------------------------------


def test_png_carries_the_infotext_and_extras_add_postprocessing(fast_sim) -> None:
    body = post(fast_sim, "/sdapi/v1/txt2img", {**TXT2IMG, "negative_prompt": "blurry", "seed": -1, "batch_size": 2}).json()
    info = json.loads(body["info"])
    assert info["seed"] != -1 and info["all_seeds"] == [info["seed"], info["seed"] + 1]
    first = decode_png(body["images"][0])
    assert first.text["parameters"] == info["infotexts"][0]
    assert "\nNegative prompt: blurry\n" in first.text["parameters"]
    extras = post(fast_sim, "/sdapi/v1/extra-single-image", {"image": body["images"][0], "upscaler_1": "Lanczos", "upscaling_resize": 2}).json()
    upscaled = decode_png(extras["image"])
    assert upscaled.size == (128, 128)
    assert upscaled.text["postprocessing"] == "Postprocess upscale by: 2.0, Postprocess upscaler: Lanczos"
    assert upscaled.text["parameters"] == info["infotexts"][0]


def test_same_seed_and_prompt_give_the_same_pixels(fast_sim) -> None:
    first, second = (decode_png(post(fast_sim, "/sdapi/v1/txt2img", TXT2IMG).json()["images"][0]) for _ in range(2))
    other = decode_png(post(fast_sim, "/sdapi/v1/txt2img", {**TXT2IMG, "seed": 1}).json()["images"][0])
    assert first.tobytes() == second.tobytes() != other.tobytes()


def test_extras_read_one_throughout(stepping_sim) -> None:
    post(stepping_sim, "/sdapi/v1/extra-single-image", {"image": png_base64(), "upscaler_1": "Lanczos"})
    assert ("Upscale", 1, 1) in [(s.job, s.job_count, s.job_no) for _, s in stepping_sim.state_changes]
    assert stepping_sim.snapshot().current_task is None  # extras have no task id


# -- errors, options, auth ---------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "body", "status", "detail", "errors"),
    [
        ("/sdapi/v1/options", {"no_such_option": 1}, 500, "", "'no_such_option'"),
        ("/sdapi/v1/options", {"sd_model_checkpoint": "nope"}, 500, "", "model 'nope' not found"),
        ("/sdapi/v1/txt2img", {"override_settings": {"nope": 1}}, 500, "", "'nope'"),
        ("/sdapi/v1/img2img", {"init_images": []}, 500, "", "Expected 3D (unbatched) or 4D (batched) input to conv2d, but got input of size: [0]"),
        ("/sdapi/v1/txt2img", {"alwayson_scripts": {"nope": {"args": []}}}, 422, "always on script nope not found", ""),
        ("/sdapi/v1/extra-single-image", {"image": png_base64(), "upscaler_1": "nope"}, 500, "", "could not find upscaler named nope"),
    ],
)
def test_a1111_error_bodies(fast_sim, path, body, status, detail, errors) -> None:
    response = post(fast_sim, path, {**TXT2IMG, **body} if "txt2img" in path or "img2img" in path else body)
    assert response.status_code == status
    assert response.json() == {"error": response.json()["error"], "detail": detail, "body": "", "errors": errors}


def test_options_round_trip(fast_sim) -> None:
    assert post(fast_sim, "/sdapi/v1/options", {"send_seed": False, "sd_model_checkpoint": "empty"}).json() is None
    options = get(fast_sim, "/sdapi/v1/options").json()
    assert options["send_seed"] is False and options["sd_model_checkpoint"] == "empty"


def test_every_response_has_x_process_time(fast_sim) -> None:
    for response in (get(fast_sim, "/nope"), get(fast_sim, "/sdapi/v1/samplers"), post(fast_sim, "/sdapi/v1/txt2img", {"steps": "x"})):
        assert float(response.headers["X-Process-Time"]) >= 0


def test_api_auth_guards_every_sdapi_route_and_no_other(make_sim) -> None:
    sim = make_sim(api_auth="me:secret")
    get_routes = ["samplers", "upscalers", "sd-models", "options", "cmd-flags", "scripts", "script-info", "progress", "memory"]
    for route in get_routes:
        response = get(sim, f"/sdapi/v1/{route}")
        assert (response.status_code, response.json()["detail"]) == (401, "Not authenticated"), route
        assert get(sim, f"/sdapi/v1/{route}", auth=("me", "secret")).status_code == 200
    for route in ("txt2img", "img2img", "extra-single-image", "interrupt", "skip", "options"):
        assert post(sim, f"/sdapi/v1/{route}", {}, auth=("me", "wrong")).json()["detail"] == "Incorrect username or password"
    for path in ("/internal/ping", "/internal/pending-tasks", "/adetailer/v1/ad_model"):
        assert get(sim, path).status_code == 200
    assert "secret" not in repr(sim)


def test_nowebui_has_no_internal_routes(make_sim) -> None:
    sim = make_sim(ui=False)
    assert post(sim, "/internal/progress", {"id_task": "x"}).status_code == 404
    assert get(sim, "/sdapi/v1/progress").status_code == 200


# -- faults --------------------------------------------------------------------


def test_progress_errors(make_sim) -> None:
    sim = make_sim(progress_error_rate=1.0)
    response = get(sim, "/sdapi/v1/progress")
    assert response.status_code == 500
    assert response.json()["errors"] == "simulated progress failure"


def test_progress_stuck_at_one_percent(make_sim, background) -> None:
    sim = make_sim(stepping=True, progress_stuck=True)
    call = background(post, sim, "/sdapi/v1/txt2img", TXT2IMG)
    sim.release(3)
    assert sim.wait_for(parked(2))
    body = get(sim, "/sdapi/v1/progress").json()
    assert (body["progress"], body["state"]["sampling_step"]) == (0.01, 0)
    sim.release(100)
    assert call.result().status_code == 200


def test_dropped_connection(make_sim) -> None:
    sim = make_sim(step_time=0.0, first_step_time=0.0, drop_connection_at_step=2)
    with pytest.raises(requests.ConnectionError):
        post(sim, "/sdapi/v1/txt2img", TXT2IMG)
    assert sim.snapshot().sampling_step == 1 and sim.snapshot().job_count == 0


def test_generation_error(make_sim) -> None:
    sim = make_sim(generation_error="CUDA out of memory")
    response = post(sim, "/sdapi/v1/txt2img", TXT2IMG)
    assert response.status_code == 500
    assert response.json() == {"error": "RuntimeError", "detail": "", "body": "", "errors": "CUDA out of memory"}
    assert sim.snapshot().job_timestamp != "0"


# -- life cycle ----------------------------------------------------------------


def test_stop_lets_blocked_requests_go_and_leaves_no_thread(background) -> None:
    before = set(threading.enumerate())
    sim = SimulatedWebUI(SimSettings(stepping=True)).start()
    running = background(post, sim, "/sdapi/v1/txt2img", TXT2IMG)
    queued_ready = sim.wait_for(lambda s: s.awaiting_release)
    queued = background(post, sim, "/sdapi/v1/txt2img", TXT2IMG)
    assert queued_ready
    sim.stop()
    for call in (running, queued):
        with pytest.raises(requests.ConnectionError):
            call.result()
    assert set(threading.enumerate()) == before


def test_a_connection_serves_request_after_request_and_stop_closes_it_while_idle(background) -> None:
    """As uvicorn does for A1111: a connection stays open between requests, and the
    simulator's stop does not wait for the client's next request (5 s) to end it."""
    before = set(threading.enumerate())
    sim = SimulatedWebUI(SimSettings(step_time=0.001)).start()
    connection = http.client.HTTPConnection(*sim.url.removeprefix("http://").split(":"), timeout=10)
    sockets = set()
    for path in ("/sdapi/v1/samplers", "/sdapi/v1/progress", "/sdapi/v1/upscalers"):
        connection.request("GET", path)
        answer = connection.getresponse()
        assert answer.status == 200 and json.loads(answer.read()) and not answer.will_close
        sockets.add(connection.sock)
    assert len(sockets) == 1
    stopping = background(sim.stop)
    assert stopping.done.wait(timeout=2.5)
    assert connection.sock.recv(1) == b""  # closed by the server
    connection.close()
    assert set(threading.enumerate()) == before


# -- timing: the decode tail, profiles ---------------------------------------------


def test_a_client_polling_every_few_ms_sees_the_last_step_while_the_image_decodes(make_sim, background) -> None:
    sim = make_sim(step_time=0.05, first_step_time=0.05)  # the 64x64 decode: 46 ms
    call = background(post, sim, "/sdapi/v1/txt2img", TXT2IMG)
    seen = set()
    while not call.done.is_set():
        state = get(sim, "/sdapi/v1/progress").json()["state"]
        if state["job_count"]:
            seen.add(state["sampling_step"])
    assert call.result().status_code == 200
    assert TXT2IMG["steps"] - 1 in seen


def test_profiles_follow_the_measured_costs_scaled_to_the_512_step() -> None:
    sd15 = SimSettings(profile="h200-sd15", step_time=0.025).timing  # its 512x512 step: 25 ms
    assert sd15.step((1024, 1024), 1) == pytest.approx(0.040)
    assert sd15.step((2048, 2048), 1) == pytest.approx(0.309)
    assert sd15.step((512, 512), 4) == pytest.approx(0.030)
    assert sd15.step((1280, 1280), 1) == pytest.approx(0.040 + (0.122 - 0.040) * (1280**2 - 1024**2) / (1536**2 - 1024**2))
    assert sd15.decode((512, 512), 4) == pytest.approx(0.086)  # a batch decodes as its pixels
    assert sd15.step((512, 512), 1, first=True) == pytest.approx(0.075)
    halved = SimSettings(profile="h200-sd15", step_time=0.0125).timing
    assert halved.decode((1536, 1536), 1) == pytest.approx(sd15.decode((1536, 1536), 1) / 2)
    sdxl = SimSettings(profile="h200-sdxl", step_time=0.061).timing  # below 832x1216 it stays at 61 ms
    assert (sdxl.step((1024, 1024), 2), sdxl.step((3072, 3072), 1)) == pytest.approx((0.078, 0.582))
    flat = SimSettings(step_time=0.1).timing
    assert flat.step((2048, 2048), 8) == flat.step((64, 64), 1) == 0.1
    assert flat.decode((64, 64), 1) < flat.decode((1024, 1024), 1) < flat.decode((1024, 1024), 2)


# -- ADetailer's faces, hang ------------------------------------------------------


def _faces_per_detection(sim: SimulatedWebUI) -> list[int]:
    counts = [s.job_count for _, s in sim.state_changes]
    return [b - a for a, b in itertools.pairwise(counts) if a > 0 and b > a]


def test_faces_a_b_draws_a_count_per_image_from_the_fault_seed(make_sim) -> None:
    tab = {"ad_model": "face_yolov8n.pt"}
    request = {**TXT2IMG, "steps": 2, "n_iter": 8, "alwayson_scripts": {"ADetailer": {"args": [True, False, tab]}}}
    drawn = []
    for _ in range(2):
        sim = make_sim(step_time=0.0, first_step_time=0.0, faces="0-3", fault_seed=7)
        assert post(sim, "/sdapi/v1/txt2img", request).status_code == 200
        drawn.append(_faces_per_detection(sim))
    assert drawn[0] == drawn[1]
    assert len(set(drawn[0])) > 1 and set(drawn[0]) <= {1, 2, 3}  # 0 faces adds no job


def test_hang_answers_nothing_until_released_and_stop_returns(make_sim, background) -> None:
    sim = make_sim(hang=True)
    with pytest.raises(requests.ReadTimeout):
        requests.get(sim.url + "/sdapi/v1/progress", timeout=0.3)
    waiting = background(get, sim, "/internal/ping")
    sim.hang(False)
    assert waiting.result().json() == {}
    sim.hang(True)
    with pytest.raises(requests.ReadTimeout):
        requests.get(sim.url + "/internal/ping", timeout=0.3)
    hung = background(get, sim, "/internal/ping")
    stopping = background(sim.stop)
    stopping.result()  # within the join timeout
    with pytest.raises(requests.ConnectionError):
        hung.result()
