"""What each WebUI endpoint accepts: its request fields and their TOML types.

From A1111's request models (`modules/api/models.py`, ≈1.8 to 1.10) and
ADetailer's `ADetailerArgs` (v25.3.0).  Job files are checked against these, so a
typo in a setting is caught when the file is read, not by a silent 200 later.
"""

from __future__ import annotations

from collections.abc import Mapping

_GENERATION_FIELDS: dict[str, type] = {
    "styles": list, "subseed": int, "subseed_strength": float,
    "seed_resize_from_h": int, "seed_resize_from_w": int,
    "sampler_name": str, "scheduler": str, "sampler_index": str,
    "batch_size": int, "n_iter": int, "steps": int, "cfg_scale": float,
    "width": int, "height": int, "denoising_strength": float,
    "restore_faces": bool, "tiling": bool, "do_not_save_samples": bool, "do_not_save_grid": bool,
    "eta": float, "s_min_uncond": float, "s_churn": float, "s_tmax": float, "s_tmin": float,
    "s_noise": float,
    "override_settings": dict, "override_settings_restore_afterwards": bool,
    "refiner_checkpoint": str, "refiner_switch_at": float, "disable_extra_networks": bool,
    "firstpass_image": str, "comments": dict, "script_name": str, "script_args": list,
    "alwayson_scripts": dict, "infotext": str,
}  # fmt: skip

#: Request fields per endpoint, less those sdjobs sets itself (`MANAGED_FIELDS`).
FIELDS: Mapping[str, Mapping[str, type]] = {
    "txt2img": _GENERATION_FIELDS | {
        "enable_hr": bool, "hr_scale": float, "hr_upscaler": str, "hr_second_pass_steps": int,
        "hr_resize_x": int, "hr_resize_y": int, "hr_checkpoint_name": str,
        "hr_sampler_name": str, "hr_scheduler": str, "hr_prompt": str, "hr_negative_prompt": str,
        "firstphase_width": int, "firstphase_height": int,
    },
    "img2img": _GENERATION_FIELDS | {
        "resize_mode": int, "image_cfg_scale": float, "mask": str, "mask_blur": int,
        "mask_blur_x": int, "mask_blur_y": int, "mask_round": bool, "inpainting_fill": int,
        "inpaint_full_res": bool, "inpaint_full_res_padding": int, "inpainting_mask_invert": int,
        "initial_noise_multiplier": float, "latent_mask": str, "include_init_images": bool,
    },
    "extra-single-image": {
        "resize_mode": int, "show_extras_results": bool, "gfpgan_visibility": float,
        "codeformer_visibility": float, "codeformer_weight": float,
        "upscaling_resize_w": int, "upscaling_resize_h": int, "upscaling_crop": bool,
        "upscaler_2": str, "extras_upscaler_2_visibility": float, "upscale_first": bool,
    },
}  # fmt: skip

#: Request fields a job file may not set, and why.
MANAGED_FIELDS: Mapping[str, str] = {
    "prompt": "set it at the top of the job file (or in [stages.extra] for one stage)",
    "negative_prompt": "set it at the top of the job file (or in [stages.extra] for one stage)",
    "seed": "set it at the top of the job file; every stage uses the job's seed",
    "init_images": "sdjobs sends the previous stage's image",
    "image": "sdjobs sends the previous stage's image",
    "send_images": "sdjobs always asks for the images",
    "save_images": "sdjobs writes the images itself",
    "force_task_id": "sdjobs sets it to follow progress",
    "upscaler_1": "use 'upscaler'",
    "upscaling_resize": "use 'scale'",
}

#: ADetailer's fields (v25.3.0), used to type-check a job file and, where the
#: server has no `/adetailer/v1/schema`, to check a stage's `ad_*` keys.
ADETAILER_FIELDS: Mapping[str, type] = {
    "ad_model": str, "ad_model_classes": str, "ad_tab_enable": bool,
    "ad_prompt": str, "ad_negative_prompt": str, "ad_confidence": float,
    "ad_mask_filter_method": str, "ad_mask_k": int, "ad_mask_min_ratio": float,
    "ad_mask_max_ratio": float, "ad_dilate_erode": int, "ad_x_offset": int, "ad_y_offset": int,
    "ad_mask_merge_invert": str, "ad_mask_blur": int, "ad_denoising_strength": float,
    "ad_inpaint_only_masked": bool, "ad_inpaint_only_masked_padding": int,
    "ad_use_inpaint_width_height": bool, "ad_inpaint_width": int, "ad_inpaint_height": int,
    "ad_use_steps": bool, "ad_steps": int, "ad_use_cfg_scale": bool, "ad_cfg_scale": float,
    "ad_use_checkpoint": bool, "ad_checkpoint": str, "ad_use_vae": bool, "ad_vae": str,
    "ad_use_sampler": bool, "ad_sampler": str, "ad_scheduler": str,
    "ad_use_noise_multiplier": bool, "ad_noise_multiplier": float,
    "ad_use_clip_skip": bool, "ad_clip_skip": int, "ad_restore_face": bool,
    "ad_controlnet_model": str, "ad_controlnet_module": str, "ad_controlnet_weight": float,
    "ad_controlnet_guidance_start": float, "ad_controlnet_guidance_end": float,
}  # fmt: skip
