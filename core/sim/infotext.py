"""The generation parameters text (`parameters` PNG chunk) and the `info` JSON of a result."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import attrs

from .catalog import Catalog


def _quote(value: Any) -> Any:
    """`generation_parameters_copypaste.quote`: JSON-quote values that would break parsing."""
    text = str(value)
    if "," not in text and "\n" not in text and ":" not in text:
        return text
    return json.dumps(text, ensure_ascii=False)


@attrs.frozen
class GenerationInfo:
    """What a txt2img/img2img request generated, described as A1111 describes it.

    Attributes:
        params: The validated request.
        sampler: The sampler used (`sampler_name or sampler_index`).
        scheduler: The scheduler's label (1.9+; "Automatic" is not written), or None.
        seed, subseed: The resolved seeds of the first image.
        extra: `extra_generation_params` (hires, denoising, ADetailer).
        job_timestamp: The job's `state.job_timestamp`.
    """

    params: Mapping[str, Any]
    sampler: str
    seed: int
    subseed: int
    extra: Mapping[str, Any]
    job_timestamp: str
    catalog: Catalog = attrs.field(repr=False)
    scheduler: str | None = None

    @property
    def image_count(self) -> int:
        return self.params["n_iter"] * self.params["batch_size"]

    def seed_of(self, index: int) -> int:
        return self.seed + index

    def infotext(self, index: int) -> str:
        """The `parameters` text of image `index` (counted over all iterations)."""
        p = self.params
        model = self.catalog.model
        fields: dict[str, Any] = {
            "Steps": p["steps"],
            "Sampler": self.sampler,
            "Schedule type": None if self.scheduler == "Automatic" else self.scheduler,
            "CFG scale": p["cfg_scale"],
            "Image CFG scale": p.get("image_cfg_scale"),
            "Seed": self.seed_of(index),
            "Face restoration": "CodeFormer" if p["restore_faces"] else None,
            "Size": f"{p['width']}x{p['height']}",
            "Model hash": model["hash"],
            "Model": model["model_name"],
            "Variation seed": self.subseed + index if p["subseed_strength"] else None,
            "Variation seed strength": p["subseed_strength"] or None,
            "Tiling": True if p["tiling"] else None,
            **self.extra,
            "Version": self.catalog.version,
        }
        text = ", ".join(
            key if key == value else f"{key}: {_quote(value)}"
            for key, value in fields.items()
            if value is not None
        )
        lines = [p["prompt"]]
        if p["negative_prompt"]:
            lines.append(f"Negative prompt: {p['negative_prompt']}")
        return "\n".join([*lines, text])

    def as_json(self, images: int) -> str:
        """`Processed.js()`: the `info` string of the response, for `images` images made."""
        p = self.params
        model = self.catalog.model
        count = self.image_count
        return json.dumps(
            {
                "prompt": p["prompt"],
                "all_prompts": [p["prompt"]] * count,
                "negative_prompt": p["negative_prompt"],
                "all_negative_prompts": [p["negative_prompt"]] * count,
                "seed": self.seed,
                "all_seeds": [self.seed_of(i) for i in range(count)],
                "subseed": self.subseed,
                "all_subseeds": [self.subseed + i for i in range(count)],
                "subseed_strength": p["subseed_strength"],
                "width": p["width"],
                "height": p["height"],
                "sampler_name": self.sampler,
                "cfg_scale": p["cfg_scale"],
                "steps": p["steps"],
                "batch_size": p["batch_size"],
                "restore_faces": bool(p["restore_faces"]),
                "face_restoration_model": "CodeFormer" if p["restore_faces"] else None,
                "sd_model_name": model["model_name"],
                "sd_model_hash": model["hash"],
                "sd_vae_name": None,
                "sd_vae_hash": None,
                "seed_resize_from_w": p["seed_resize_from_w"],
                "seed_resize_from_h": p["seed_resize_from_h"],
                "denoising_strength": p["denoising_strength"],
                "extra_generation_params": dict(self.extra),
                "index_of_first_image": 0,
                "infotexts": [self.infotext(i) for i in range(images)],
                "styles": list(p["styles"] or []),
                "job_timestamp": self.job_timestamp,
                "clip_skip": 1,
                "is_using_inpainting_conditioning": False,
                "version": self.catalog.version,
            }
        )


def extras_html_info(upscaler: str, scale: float | None, size: Sequence[int] | None) -> str:
    """The `html_info` of extras, also its `postprocessing` PNG text (without the tags)."""
    resize = f"Postprocess upscale by: {scale}" if size is None else (
        f"Postprocess upscale to: {size[0]}x{size[1]}"
    )
    return f"{resize}, Postprocess upscaler: {upscaler}"
