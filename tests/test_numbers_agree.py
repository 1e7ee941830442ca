"""What `sdjobs check` announces, what the run shows, and what the files record, agree.

A real run against the simulated WebUI: hires fix, img2img, ADetailer finding two faces.
"""

from __future__ import annotations

import pytest
from runner_helpers import make_runner

from sdjobs.sim import SimSettings
from sdjobs.spec import JobSpec

#: Two images with hires fix, one img2img each, then ADetailer on their faces.
PORTRAIT = JobSpec.from_mapping(
    {
        "name": "portrait",
        "prompt": "portrait of an old sailor",
        "seed": 1234,
        "settings": {"steps": 8, "width": 64, "height": 64, "sampler_name": "Euler a"},
        "stages": [
            {"type": "txt2img", "n_iter": 2, "enable_hr": True, "hr_scale": 2, "hr_upscaler": "Latent",
             "hr_second_pass_steps": 6, "denoising_strength": 0.5},
            {"type": "img2img", "denoising_strength": 0.5},
            {"type": "adetailer", "ad_model": "face_yolov8n.pt", "ad_steps": 10, "ad_denoising_strength": 0.4},
        ],
    }
)  # fmt: skip


@pytest.fixture
def sim_settings() -> SimSettings:
    """Steps slow enough that every pass shows several samples; two faces in every image."""
    return SimSettings(step_time=0.02, first_step_time=0.02, faces=2)


def test_each_pass_shows_the_steps_check_announced_and_its_label(webui_client, tmp_path):
    runner, log = make_runner(webui_client, [PORTRAIT], tmp_path)
    runner.run()
    assert log.one("job_finished")["outcome"] == "done"
    for index, plan in enumerate(PORTRAIT.plan()):
        shown = {(status.pass_kind or "main", status.steps) for status in log.statuses() if status.stage_index == index and status.step}
        assert shown == set(plan.shown_steps), f"stage {index + 1} ({plan.type})"
    # A poll may land while ADetailer detects, before the server has counted the faces: no count yet.
    counted = [status.face for status in log.statuses() if status.pass_kind == "face" and status.face is not None]
    assert counted[0] == (1, 2) and set(counted) == {(1, 2), (2, 2)}
    assert all(status.face is None for status in log.statuses() if status.pass_kind != "face")
