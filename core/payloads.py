"""The JSON body of each stage's request, built from a `JobSpec`.

One function per question the runner has: what to send for a stage
(`build_payload`), and whether ADetailer really ran (`adetailer_applied`),
since ADetailer answers 200 and does nothing when it dislikes its arguments.
"""

from __future__ import annotations

import base64
from typing import Any

from sdjobs.spec import JobSpec, StageSpec, image_size, multiple_of_8, thaw

#: The key of ADetailer's script in `alwayson_scripts`.
ADETAILER_SCRIPT = "ADetailer"


def build_payload(job: JobSpec, index: int, init_image: bytes | None) -> dict[str, Any]:
    """The request body for stage `index` (0-based) of `job`.

    `init_image` is the image the stage works on, one per request: the previous
    stage's PNG, or for a job's first stage one of its `inputs`; None for a
    txt2img stage.  The result is a fresh dict the caller (and the
    `sdjobs_amend_payload` hook) may change.

    Generation stages send the job's prompt, negative prompt and seed, the
    checkpoint (stage's, else job's) as `override_settings.sd_model_checkpoint`,
    and a later stage takes the size of `init_image` unless it sets its own.
    The stage's `[stages.extra]` table is merged last, as is.
    """
    stage = job.stages[index]
    if (init_image is None) != (stage.type == "txt2img"):
        raise ValueError(f"stage {index + 1} ({stage.type}) needs an input image exactly when it is not txt2img")
    if stage.endpoint == "extra-single-image":
        body = _extras(stage, init_image)
    else:
        body = _generation(job, stage, init_image)
    body.update(thaw(stage.extra))
    return body


def _extras(stage: StageSpec, image: bytes) -> dict[str, Any]:
    return {
        "image": _base64(image),
        "resize_mode": 0,
        "upscaler_1": stage.upscaler,
        "upscaling_resize": stage.scale,
        **thaw(stage.settings),
    }


def _generation(job: JobSpec, stage: StageSpec, init_image: bytes | None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "prompt": job.prompt,
        "negative_prompt": job.negative_prompt,
        "seed": job.seed,
        "save_images": False,
        "send_images": True,
        **thaw(stage.settings),
    }
    override = dict(body.get("override_settings") or {})
    if checkpoint := stage.checkpoint or job.checkpoint:
        override["sd_model_checkpoint"] = checkpoint
    if init_image is not None:
        body["init_images"] = [_base64(init_image)]
        width, height = image_size(init_image)
        if stage.type == "upscale":
            width, height = multiple_of_8(width * stage.scale), multiple_of_8(height * stage.scale)
            if stage.upscaler:
                override["upscaler_for_img2img"] = stage.upscaler
        body.setdefault("width", width)
        body.setdefault("height", height)
    if override:
        body["override_settings"] = override
    if stage.type == "adetailer":
        # args: enable, skip_img2img (so only the faces are repainted), one tab.
        ad_args = [True, True, thaw(stage.adetailer)]
        body["alwayson_scripts"] = {**(body.get("alwayson_scripts") or {}), ADETAILER_SCRIPT: {"args": ad_args}}
    return body


def adetailer_applied(infotext: str) -> bool:
    """True when an image's infotext shows that ADetailer ran on it.

    ADetailer adds `ADetailer model: ...` (and its other settings) to the
    parameters line, the infotext's last line, whenever it was enabled with a
    valid tab, faces found or not.  A tab it rejected leaves no trace.
    """
    return "ADetailer model" in infotext.rpartition("\n")[2]


def _base64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
