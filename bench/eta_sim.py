"""Simulated runs for `eta_accuracy.py`: the real `SimulatedWebUI`, in process, with each cost profile.

Each scenario's request is posted to a fresh simulator whose steps are short (about
40 ms at the scenario's base size); every state change the server makes is recorded
with its time (`SimulatedWebUI.state_changes`), and progress samples are read off that
record at a fine poll (`POLL` of a base step), exactly as `/sdapi/v1/progress`
computes them at that moment.  The result is a `Run` replayed like a recorded trace.
"""

from __future__ import annotations

import base64
import io
import time
from bisect import bisect_right
from typing import Any

import requests
from PIL import Image
from sdjobs.sim import SimulatedWebUI
from sdjobs.sim.profiles import PROFILES
from sdjobs.sim.settings import SimSettings
from sdjobs.sim.state import StateSnapshot, sdapi_progress
from sdjobs.status import ProgressInfo

#: A base step's seconds in every scenario, and the poll as a share of it.
BASE_STEP = 0.04
POLL = 0.25

#: Each profile's base image size (the size its steps were measured around).
BASE_SIZE = {"cpu": 64, "h200-sd15": 512, "h200-sdxl": 1024}


def _png(size: int) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (90, 120, 150)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def scenarios(profile: str) -> list[tuple[str, str, dict[str, Any], int]]:
    """`(name, endpoint, request, faces found per image)` for one profile."""
    size = BASE_SIZE[profile]
    base = {"prompt": "a lighthouse", "steps": 20, "width": size, "height": size, "seed": 1, "sampler_name": "Euler a"}
    tab = {"ad_model": "face_yolov8n.pt"}
    adetailer = {"alwayson_scripts": {"ADetailer": {"args": [True, False, tab]}}}
    hires = {"enable_hr": True, "hr_scale": 2, "hr_upscaler": "Latent", "hr_second_pass_steps": 10, "denoising_strength": 0.5}
    out = [
        ("txt2img", "txt2img", base, 0),
        ("hires 2x", "txt2img", {**base, **hires}, 0),
        ("batch 4", "txt2img", {**base, "batch_size": 4}, 0),
        ("n_iter 3", "txt2img", {**base, "n_iter": 3}, 0),
        ("img2img", "img2img", {**base, "init_images": [_png(size)], "denoising_strength": 0.6}, 0),
    ]
    out += [(f"ADetailer {faces} faces", "txt2img", {**base, **adetailer}, faces) for faces in range(4)]
    return out


def _step_time(profile: str) -> float:
    """`step_time` (a 512² step) that makes the profile's base-size step `BASE_STEP`."""
    costs = PROFILES[profile]
    size = BASE_SIZE[profile]
    return BASE_STEP * costs.step_ms(512 * 512, 1) / costs.step_ms(size * size, 1)


def simulate(profile: str, name: str, endpoint: str, request: dict[str, Any], faces: int):
    """Run one request on a fresh simulator; its `Run` (imported late: eta_accuracy imports this)."""
    from eta_accuracy import Run, Sample

    settings = SimSettings(profile=profile, step_time=_step_time(profile), faces=(faces, faces))
    with SimulatedWebUI(settings) as sim:
        wall_offset = time.time() - time.monotonic()
        sent = time.monotonic()
        answer = requests.post(f"{sim.url}/sdapi/v1/{endpoint}", json=request, timeout=300)
        returned = time.monotonic()
        answer.raise_for_status()
        changes = list(sim.state_changes)
    times = [t for t, _ in changes]
    samples = []
    t = sent - 2 * BASE_STEP * POLL
    while t < returned:
        i = bisect_right(times, t)
        state = changes[i - 1][1] if i else StateSnapshot()
        progress, eta = sdapi_progress(state, t + wall_offset)
        body = {"progress": progress, "eta_relative": eta, "state": state.as_dict(), "current_image": None, "textinfo": None}
        samples.append(Sample(t - sent, ProgressInfo.from_response(body)))
        t += BASE_STEP * POLL
    return Run(
        trace=f"sim {profile}: {name}",
        sent=0.0,
        returned=returned - sent,
        request=request,
        endpoint=endpoint,
        task_mode=False,
        baseline=None,
        samples=tuple(samples),
    )


def simulated_runs(profiles: tuple[str, ...] = tuple(BASE_SIZE)) -> list:
    return [simulate(profile, *scenario) for profile in profiles for scenario in scenarios(profile)]
