"""ADetailer (v25.3.0) as an API client meets it: its args, its tabs, its infotext.

`alwayson_scripts["ADetailer"]["args"]` is `[enable?, skip_img2img?, tab, tab, ...]`.
Each tab dict is checked against ADetailer's pydantic model (`extra=forbid`): one that
fails is skipped with nothing but a line on the server's stderr.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs

from .catalog import Catalog
from .validation import RequestValidationError, validate

# (argument, infotext label) in ADetailer's order (`adetailer/args.py`, ALL_ARGS).
_LABELS = {
    "ad_model": "ADetailer model",
    "ad_model_classes": "ADetailer model classes",
    "ad_prompt": "ADetailer prompt",
    "ad_negative_prompt": "ADetailer negative prompt",
    "ad_confidence": "ADetailer confidence",
    "ad_mask_filter_method": "ADetailer method to decide top k masks",
    "ad_mask_k": "ADetailer mask only top k",
    "ad_mask_min_ratio": "ADetailer mask min ratio",
    "ad_mask_max_ratio": "ADetailer mask max ratio",
    "ad_dilate_erode": "ADetailer dilate erode",
    "ad_x_offset": "ADetailer x offset",
    "ad_y_offset": "ADetailer y offset",
    "ad_mask_merge_invert": "ADetailer mask merge invert",
    "ad_mask_blur": "ADetailer mask blur",
    "ad_denoising_strength": "ADetailer denoising strength",
    "ad_inpaint_only_masked": "ADetailer inpaint only masked",
    "ad_inpaint_only_masked_padding": "ADetailer inpaint padding",
    "ad_use_inpaint_width_height": "ADetailer use inpaint width height",
    "ad_inpaint_width": "ADetailer inpaint width",
    "ad_inpaint_height": "ADetailer inpaint height",
    "ad_use_steps": "ADetailer use separate steps",
    "ad_steps": "ADetailer steps",
    "ad_use_cfg_scale": "ADetailer use separate CFG scale",
    "ad_cfg_scale": "ADetailer CFG scale",
    "ad_use_checkpoint": "ADetailer use separate checkpoint",
    "ad_checkpoint": "ADetailer checkpoint",
    "ad_use_vae": "ADetailer use separate VAE",
    "ad_vae": "ADetailer VAE",
    "ad_use_sampler": "ADetailer use separate sampler",
    "ad_sampler": "ADetailer sampler",
    "ad_scheduler": "ADetailer scheduler",
    "ad_use_noise_multiplier": "ADetailer use noise multiplier",
    "ad_noise_multiplier": "ADetailer noise multiplier",
    "ad_use_clip_skip": "ADetailer use separate CLIP skip",
    "ad_clip_skip": "ADetailer CLIP skip",
    "ad_restore_face": "ADetailer restore face",
    "ad_controlnet_model": "ADetailer ControlNet model",
    "ad_controlnet_module": "ADetailer ControlNet module",
    "ad_controlnet_weight": "ADetailer ControlNet weight",
    "ad_controlnet_guidance_start": "ADetailer ControlNet guidance start",
    "ad_controlnet_guidance_end": "ADetailer ControlNet guidance end",
}

# A flag (or value) and the arguments that leave the infotext when it is off (or equal).
_SWITCHES: tuple[tuple[str, Any, tuple[str, ...]], ...] = (
    ("ad_model_classes", "", ("ad_model_classes",)),
    ("ad_prompt", "", ("ad_prompt",)),
    ("ad_negative_prompt", "", ("ad_negative_prompt",)),
    ("ad_mask_k", 0, ("ad_mask_filter_method", "ad_mask_k")),
    ("ad_mask_min_ratio", 0.0, ("ad_mask_min_ratio",)),
    ("ad_mask_max_ratio", 1.0, ("ad_mask_max_ratio",)),
    ("ad_x_offset", 0, ("ad_x_offset",)),
    ("ad_y_offset", 0, ("ad_y_offset",)),
    ("ad_mask_merge_invert", "None", ("ad_mask_merge_invert",)),
    ("ad_inpaint_only_masked", False, ("ad_inpaint_only_masked", "ad_inpaint_only_masked_padding")),
    ("ad_use_inpaint_width_height", False, ("ad_use_inpaint_width_height", "ad_inpaint_width", "ad_inpaint_height")),
    ("ad_use_steps", False, ("ad_use_steps", "ad_steps")),
    ("ad_use_cfg_scale", False, ("ad_use_cfg_scale", "ad_cfg_scale")),
    ("ad_use_checkpoint", False, ("ad_use_checkpoint", "ad_checkpoint")),
    ("ad_use_vae", False, ("ad_use_vae", "ad_vae")),
    ("ad_use_sampler", False, ("ad_use_sampler", "ad_sampler", "ad_scheduler")),
    ("ad_use_noise_multiplier", False, ("ad_use_noise_multiplier", "ad_noise_multiplier")),
    ("ad_use_clip_skip", False, ("ad_use_clip_skip", "ad_clip_skip")),
    ("ad_restore_face", False, ("ad_restore_face",)),
    ("ad_controlnet_model", "None", tuple(k for k in _LABELS if k.startswith("ad_controlnet"))),
)

_ORDINALS = {1: "st", 2: "nd", 3: "rd"}


@attrs.frozen
class AdetailerTab:
    """One valid ADetailer tab, every argument filled in."""

    args: Mapping[str, Any]

    def inpaint_steps(self, main_steps: int) -> int:
        """Sampling steps of one mask's inpaint: an img2img pass, `int(steps*denoise)+1`."""
        steps = self.args["ad_steps"] if self.args["ad_use_steps"] else main_steps
        return int(min(self.args["ad_denoising_strength"], 0.999) * steps) + 1

    def infotext_params(self, index: int) -> dict[str, Any]:
        """The tab's infotext fields, suffixed " 2nd", " 3rd"... after the first tab."""
        params = dict(self.args)
        for switch, off, removed in _SWITCHES:
            if params.get(switch) == off:
                for key in removed:
                    params.pop(key, None)
        suffix = "" if index == 0 else f" {index + 1}{_ORDINALS.get(index + 1, 'th')}"
        return {_LABELS[key] + suffix: value for key, value in params.items() if key in _LABELS}


@attrs.frozen
class AdetailerRun:
    """What ADetailer will do for one request."""

    tabs: tuple[AdetailerTab, ...]
    skip_img2img: bool
    version: str

    def infotext_params(self) -> dict[str, Any]:
        params: dict[str, Any] = {}
        for index, tab in enumerate(self.tabs):
            params.update(tab.infotext_params(index))
        params["ADetailer version"] = self.version
        return params


def adetailer_run(alwayson_scripts: Mapping[str, Any], catalog: Catalog) -> AdetailerRun | None:
    """The ADetailer work a request asks for, or None when ADetailer would do nothing."""
    entry = next(
        (value for key, value in alwayson_scripts.items() if key.lower() == "adetailer"), None
    )
    args = list(entry.get("args", [])) if isinstance(entry, dict) else []
    enabled = skip_img2img = False
    if args and isinstance(args[0], bool):
        enabled, args = args[0], args[1:]
    else:
        enabled = bool(args)
    if args and isinstance(args[0], bool):
        skip_img2img, args = args[0], args[1:]
    tabs = tuple(tab for tab in map(lambda a: _tab(a, catalog), args) if tab is not None)
    if not (enabled and tabs):
        return None
    return AdetailerRun(tabs, skip_img2img, catalog["adetailer_version"]["version"])


def _tab(arg: Any, catalog: Catalog) -> AdetailerTab | None:
    try:
        values = validate(arg, catalog["adetailer_schema"]["properties"], forbid_extra=True)
    except RequestValidationError:
        return None
    if values["ad_model"] == "None" or not values["ad_tab_enable"]:
        return None
    return AdetailerTab(values)
