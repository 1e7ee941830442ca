"""The request body of each stage, and the check that ADetailer really ran."""

from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path

import pytest
from PIL import Image

from sdjobs.payloads import adetailer_applied, build_payload, image_size
from sdjobs.spec import JobSpec

TRACES = Path(__file__).parent / "data" / "traces"


def png(width: int = 64, height: int = 48) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), "grey").save(buffer, "PNG")
    return buffer.getvalue()


def spec(*stages: dict, **top) -> JobSpec:
    data = {"name": "t", "prompt": "a cat", "negative_prompt": "blurry", "seed": 1234, **top}
    return JobSpec.from_mapping({**data, "stages": [{"type": "txt2img"}, *stages]})


def test_txt2img_sends_prompt_seed_and_settings_and_asks_for_images_back():
    job = spec(settings={"steps": 8, "width": 64, "height": 64, "sampler_name": "Euler a"})
    assert build_payload(job, 0, None) == {
        "prompt": "a cat",
        "negative_prompt": "blurry",
        "seed": 1234,
        "save_images": False,
        "send_images": True,
        "steps": 8,
        "width": 64,
        "height": 64,
        "sampler_name": "Euler a",
    }


def test_img2img_sends_the_previous_image_at_its_size_with_the_same_prompt_and_seed():
    image = png(64, 48)
    body = build_payload(spec({"type": "img2img", "denoising_strength": 0.5}), 1, image)
    assert base64.b64decode(body["init_images"][0]) == image
    assert (body["width"], body["height"]) == (64, 48)
    assert (body["prompt"], body["seed"], body["denoising_strength"]) == ("a cat", 1234, 0.5)


def test_a_stage_that_sets_its_own_size_keeps_it():
    body = build_payload(spec({"type": "img2img", "width": 128}), 1, png(64, 48))
    assert (body["width"], body["height"]) == (128, 48)


def test_adetailer_is_img2img_with_adetailer_enabled_and_img2img_skipped():
    job = spec(
        {"type": "adetailer", "ad_model": "face_yolov8n.pt", "ad_steps": 4, "alwayson_scripts": {"Other": {"args": [1]}}}
    )
    body = build_payload(job, 1, png())
    assert body["alwayson_scripts"] == {
        "Other": {"args": [1]},
        "ADetailer": {"args": [True, True, {"ad_use_steps": True, "ad_model": "face_yolov8n.pt", "ad_steps": 4}]},
    }
    assert "init_images" in body


def test_an_extras_upscale_sends_the_image_upscaler_and_factor_only():
    image = png()
    body = build_payload(spec({"type": "upscale", "upscaler": "Lanczos", "scale": 3, "upscaler_2": "Nearest"}), 1, image)
    assert body == {
        "image": base64.b64encode(image).decode(),
        "resize_mode": 0,
        "upscaler_1": "Lanczos",
        "upscaling_resize": 3.0,
        "upscaler_2": "Nearest",
    }


def test_an_img2img_upscale_asks_for_the_scaled_size_with_the_upscaler_as_resizer():
    job = spec({"type": "upscale", "via": "img2img", "upscaler": "R-ESRGAN 4x+", "scale": 1.5, "denoising_strength": 0.2})
    body = build_payload(job, 1, png(72, 64))
    assert (body["width"], body["height"]) == (104, 96)
    assert body["override_settings"] == {"upscaler_for_img2img": "R-ESRGAN 4x+"}


def test_the_job_checkpoint_becomes_an_override_setting_and_a_stage_checkpoint_beats_it():
    job = spec(
        {"type": "img2img", "checkpoint": "other.safetensors"},
        checkpoint="base.safetensors",
        settings={"override_settings": {"CLIP_stop_at_last_layers": 2}},
    )
    assert build_payload(job, 0, None)["override_settings"] == {
        "CLIP_stop_at_last_layers": 2,
        "sd_model_checkpoint": "base.safetensors",
    }
    assert build_payload(job, 1, png())["override_settings"] == {
        "CLIP_stop_at_last_layers": 2,
        "sd_model_checkpoint": "other.safetensors",
    }


def test_the_extra_table_is_merged_last_as_is():
    job = spec({"type": "img2img", "steps": 5, "extra": {"steps": 7, "prompt": "a dog", "my_field": [1]}})
    body = build_payload(job, 1, png())
    assert (body["steps"], body["prompt"], body["my_field"]) == (7, "a dog", [1])


def test_each_payload_is_fresh_and_json_ready():
    job = spec({"type": "img2img"}, settings={"override_settings": {"a": [1, 2]}})
    first = build_payload(job, 0, None)
    first["override_settings"]["a"].append(3)
    assert build_payload(job, 0, None)["override_settings"] == {"a": [1, 2]}
    json.dumps(build_payload(job, 1, png()))


@pytest.mark.parametrize(("index", "image", "named"), [(0, png(), "stage 1 (txt2img)"), (1, None, "stage 2 (img2img)")])
def test_only_the_first_stage_goes_without_an_input_image(index, image, named):
    with pytest.raises(ValueError, match=rf"^{re.escape(named)} needs an input image"):
        build_payload(spec({"type": "img2img"}), index, image)


def test_image_size_reads_the_png_header():
    assert image_size(png(40, 24)) == (40, 24)


def infotexts(trace: str) -> list[str]:
    for line in (TRACES / trace).read_text().splitlines():
        record = json.loads(line)
        if record.get("t_end") is not None:
            return record["body"]["info"]["infotexts"]
    raise AssertionError(f"no request in {trace}")


@pytest.mark.parametrize(
    ("trace", "applied"),
    [
        ("16_txt2img_64_8steps_adetailer_2masks.jsonl", True),
        ("21_txt2img_adetailer_default_confidence_nothing_detected.jsonl", True),
        ("20_txt2img_adetailer_unknown_arg_key.jsonl", False),
        ("22_txt2img_64_8steps_no_adetailer_reference.jsonl", False),
    ],
)
def test_adetailer_applied_reads_the_recorded_infotexts(trace, applied):
    assert [adetailer_applied(text) for text in infotexts(trace)] == [applied]


@pytest.mark.parametrize(
    "infotext",
    [
        "ADetailer model: x\nSteps: 8, Sampler: Euler a, Seed: 1",
        "a cat\nNegative prompt: ADetailer model: x\nSteps: 8, Sampler: Euler a, Seed: 1",
    ],
)
def test_adetailer_applied_ignores_the_words_in_the_prompts(infotext):
    assert not adetailer_applied(infotext)
