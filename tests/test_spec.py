"""Job files: reading, checking, merging settings, resolving the seed, planning."""

from __future__ import annotations

import json
import random
from pathlib import Path

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st
from sdjobs.expand import load_jobs
from sdjobs.spec import JobFileError, JobSpec, StageSpec, load_job
from sdjobs.webui_fields import FIELDS

EXAMPLES = Path(__file__).parent.parent / "examples"


def job(*stages: dict, **top) -> dict:
    """A job mapping with a name and the given stages (txt2img alone by default)."""
    return {"name": "test", **top, "stages": list(stages) or [{"type": "txt2img"}]}


def error_of(data: object, source: str | None = "jobs/x.toml") -> str:
    with pytest.raises(JobFileError) as caught:
        JobSpec.from_mapping(data, source=source, rng=random.Random(0))
    return str(caught.value)


# --------------------------------------------------------------------------
# The examples
# --------------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.toml")), ids=lambda path: path.name)
def test_every_example_loads(path):
    for spec in load_jobs(path, rng=random.Random(1)):
        assert spec.source == path
        assert (spec.stages[0].type == "txt2img") == (not spec.inputs)


def test_the_prompt_pack_is_24_jobs_named_by_variation():
    jobs = load_jobs(EXAMPLES / "prompt-pack.toml")
    assert len({job.name for job in jobs}) == 24
    assert "prompt pack #2 cfg_scale=7 r3" in {job.name for job in jobs}
    assert not any("__" in job.prompt for job in jobs)


def test_demo_runs_the_four_stage_types_in_order():
    spec = load_job(EXAMPLES / "demo.toml", rng=random.Random(1))
    assert [stage.type for stage in spec.stages] == ["txt2img", "img2img", "adetailer", "upscale"]
    assert [stage.endpoint for stage in spec.stages] == ["txt2img", "img2img", "img2img", "extra-single-image"]
    assert spec.stages[0].settings["width"] == 128


def test_the_demo_is_short():
    """The README's demo runs in well under two minutes at the simulator's 0.15 s a step."""
    plan = load_job(EXAMPLES / "demo.toml", rng=random.Random(1)).plan()
    assert sum(stage.cost for stage in plan) * 0.15 < 60


# --------------------------------------------------------------------------
# Settings, stages, seed
# --------------------------------------------------------------------------


def test_job_settings_apply_to_every_generation_stage_unless_the_stage_sets_them():
    spec = JobSpec.from_mapping(
        job(
            {"type": "txt2img"},
            {"type": "img2img", "steps": 9},
            {"type": "upscale", "upscaler": "Lanczos"},
            settings={"steps": 20, "sampler_name": "Euler a"},
        )
    )
    txt2img, img2img, upscale = spec.stages
    assert txt2img.settings == {"steps": 20, "sampler_name": "Euler a"}
    assert img2img.settings == {"steps": 9, "sampler_name": "Euler a"}
    assert upscale.settings == {}


def test_job_settings_size_only_the_first_stage():
    spec = JobSpec.from_mapping(
        job({"type": "txt2img"}, {"type": "img2img"}, settings={"width": 256, "height": 128})
    )
    assert (spec.stages[0].settings["width"], spec.stages[0].settings["height"]) == (256, 128)
    assert "width" not in spec.stages[1].settings and "height" not in spec.stages[1].settings


def test_job_settings_reach_a_stage_only_where_its_endpoint_takes_them():
    spec = JobSpec.from_mapping(
        job({"type": "txt2img"}, {"type": "img2img"}, settings={"enable_hr": True, "mask_blur": 2})
    )
    assert spec.stages[0].settings == {"enable_hr": True}
    assert spec.stages[1].settings == {"mask_blur": 2}


def test_a_random_seed_is_drawn_on_the_client_from_the_given_rng():
    first = JobSpec.from_mapping(job(seed=-1), rng=random.Random(42))
    again = JobSpec.from_mapping(job(), rng=random.Random(42))
    assert first.seed == again.seed >= 0


def test_a_given_seed_is_kept():
    assert JobSpec.from_mapping(job(seed=1234)).seed == 1234


def test_a_name_defaults_to_the_file_name(tmp_path):
    path = tmp_path / "sunset.toml"
    path.write_text('[[stages]]\ntype = "txt2img"\n')
    assert load_job(path).name == "sunset"


def test_an_adetailer_value_turns_on_its_switch_unless_the_file_sets_it():
    spec = JobSpec.from_mapping(
        job(
            {"type": "txt2img"},
            {"type": "adetailer", "ad_model": "face_yolov8n.pt", "ad_steps": 8, "ad_cfg_scale": 5, "ad_use_cfg_scale": False},
        )
    )
    assert spec.stages[1].adetailer == {
        "ad_model": "face_yolov8n.pt",
        "ad_steps": 8,
        "ad_use_steps": True,
        "ad_cfg_scale": 5,
        "ad_use_cfg_scale": False,
    }
    assert "ad_steps" not in spec.stages[1].settings


def test_an_upscale_through_img2img_posts_to_img2img():
    spec = JobSpec.from_mapping(
        job({"type": "txt2img"}, {"type": "upscale", "via": "img2img", "scale": 1.5, "denoising_strength": 0.2})
    )
    stage = spec.stages[1]
    assert (stage.endpoint, stage.via, stage.scale, stage.upscaler) == ("img2img", "img2img", 1.5, None)
    assert stage.settings == {"denoising_strength": 0.2}


def test_the_extra_table_is_kept_as_is():
    spec = JobSpec.from_mapping(job({"type": "txt2img", "extra": {"anything": {"goes": [1, 2]}}}))
    assert spec.stages[0].extra == {"anything": {"goes": (1, 2)}}


def test_a_spec_cannot_be_changed_once_built():
    spec = JobSpec.from_mapping(job(settings={"override_settings": {"CLIP_stop_at_last_layers": 2}}))
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        spec.seed = 1  # type: ignore[misc]
    with pytest.raises(TypeError):
        spec.stages[0].settings["steps"] = 3  # type: ignore[index]
    with pytest.raises(TypeError):
        spec.settings["override_settings"]["CLIP_stop_at_last_layers"] = 1  # type: ignore[index]


def test_a_spec_reads_back_as_plain_json():
    spec = load_job(EXAMPLES / "portrait.toml")
    data = json.loads(json.dumps(spec.to_dict()))
    assert data["seed"] == 1234
    assert data["stages"][2]["extra"] == {"upscaling_crop": False}
    assert data["source"] == str(EXAMPLES / "portrait.toml")


def test_a_spec_built_directly_must_start_with_its_only_txt2img():
    with pytest.raises(ValueError, match="txt2img"):
        JobSpec("x", "", "", 1, stages=(StageSpec("img2img"),))


# --------------------------------------------------------------------------
# Mistakes: one clear line each
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "message"),
    [
        pytest.param(
            job({"type": "txt2img"}, {"type": "img2img", "denoise": 0.3}),
            "jobs/x.toml: stages[2].denoise: unknown key (did you mean 'denoising_strength'?); "
            "pass other request fields in a [stages.extra] table",
            id="unknown-key",
        ),
        pytest.param(
            job({"type": "txt2img"}, {"type": "upscal"}),
            "jobs/x.toml: stages[2].type: unknown stage 'upscal' (did you mean 'upscale'?); "
            "choose one of: txt2img, img2img, adetailer, upscale",
            id="unknown-stage",
        ),
        pytest.param(
            job({"type": "txt2img", "steps": "20"}),
            "jobs/x.toml: stages[1].steps: must be an integer, got '20'",
            id="wrong-type",
        ),
        pytest.param(
            job({"type": "txt2img", "enable_hr": 1}),
            "jobs/x.toml: stages[1].enable_hr: must be true or false, got 1",
            id="int-for-bool",
        ),
        pytest.param(
            job({"type": "txt2img", "steps": True}),
            "jobs/x.toml: stages[1].steps: must be an integer, got true",
            id="bool-for-int",
        ),
        pytest.param(
            job(settings={"width": 65}),
            "jobs/x.toml: settings.width: must be a positive multiple of 8, got 65",
            id="width",
        ),
        pytest.param(
            job({"type": "txt2img"}, {"type": "img2img", "denoising_strength": 1.5}),
            "jobs/x.toml: stages[2].denoising_strength: must be between 0 and 1, got 1.5",
            id="denoising",
        ),
        pytest.param(
            job({"type": "txt2img", "steps": 0}),
            "jobs/x.toml: stages[1].steps: must be at least 1, got 0",
            id="steps",
        ),
        pytest.param(
            job({"type": "txt2img", "cfg_scale": float("nan")}),
            "jobs/x.toml: stages[1].cfg_scale: must be a finite number, got nan",
            id="nan",
        ),
        pytest.param(job(seed=-2), "jobs/x.toml: seed: must be between -1 and 4294967295, got -2", id="seed"),
        pytest.param(
            job({"type": "txt2img"}, {"type": "upscale", "upscaler": "Lanczos", "scale": 0}),
            "jobs/x.toml: stages[2].scale: must be greater than 0, got 0",
            id="scale",
        ),
        pytest.param(
            {"name": "x", "stages": []},
            "jobs/x.toml: stages: must be an array of tables ([[stages]]), at least one",
            id="no-stages",
        ),
        pytest.param({"name": "x"}, "jobs/x.toml: stages: missing: a job needs at least one [[stages]] table", id="missing-stages"),
        pytest.param(
            job({"type": "img2img"}),
            "jobs/x.toml: stages[1].type: a job starts with a txt2img stage, or from images named by init_images",
            id="txt2img-not-first",
        ),
        pytest.param(
            job({"type": "txt2img"}, {"type": "txt2img"}),
            "jobs/x.toml: stages[2].type: txt2img can only be a job's first stage",
            id="second-txt2img",
        ),
        pytest.param(
            job({"steps": 3}),
            "jobs/x.toml: stages[1].type: missing; choose one of: txt2img, img2img, adetailer, upscale",
            id="missing-type",
        ),
        pytest.param(
            job({"type": "txt2img", "seed": 5}),
            "jobs/x.toml: stages[1].seed: not allowed here: set it at the top of the job file; every stage uses the job's seed",
            id="managed-key",
        ),
        pytest.param(
            job({"type": "txt2img"}, {"type": "img2img", "ad_model": "face_yolov8n.pt"}),
            "jobs/x.toml: stages[2].ad_model: ADetailer settings belong in an adetailer stage",
            id="ad-key-elsewhere",
        ),
        pytest.param(
            job({"type": "txt2img"}, {"type": "adetailer"}),
            "jobs/x.toml: stages[2].ad_model: missing: an adetailer stage needs a detection model",
            id="adetailer-without-model",
        ),
        pytest.param(
            job({"type": "txt2img"}, {"type": "adetailer", "ad_model": "m", "ad_confidence": "high"}),
            "jobs/x.toml: stages[2].ad_confidence: must be a number, got 'high'",
            id="adetailer-type",
        ),
        pytest.param(
            job({"type": "txt2img"}, {"type": "upscale", "scale": 2}),
            "jobs/x.toml: stages[2].upscaler: missing: an extras upscale needs an upscaler",
            id="extras-without-upscaler",
        ),
        pytest.param(
            job({"type": "txt2img"}, {"type": "upscale", "upscaler": "Lanczos", "checkpoint": "x"}),
            "jobs/x.toml: stages[2].checkpoint: not allowed here: an extras upscale uses no checkpoint",
            id="checkpoint-on-extras",
        ),
        pytest.param(
            job({"type": "txt2img", "two\nlines": 1}),
            'jobs/x.toml: stages[1]."two\\nlines": unknown key; pass other request fields in a [stages.extra] table',
            id="quoted-key",
        ),
        pytest.param(
            job({"type": "txt2img"}, {"type": "upscale", "upscaler": "Lanczos", "via": "latent"}),
            "jobs/x.toml: stages[2].via: must be one of: extras, img2img; got 'latent'",
            id="upscale-via",
        ),
        pytest.param(
            job({"type": "txt2img", "scale": 2}),
            "jobs/x.toml: stages[1].scale: unknown key (did you mean 'hr_scale'?); "
            "pass other request fields in a [stages.extra] table",
            id="scale-outside-upscale",
        ),
        pytest.param(
            job(promt="a cat"),
            "jobs/x.toml: promt: unknown key (did you mean 'prompt'?)",
            id="unknown-top-level",
        ),
        pytest.param(
            job(steps=3),
            "jobs/x.toml: steps: unknown key here; WebUI settings go in [settings] or in a stage",
            id="setting-at-top-level",
        ),
        pytest.param(job(name=" "), "jobs/x.toml: name: must not be empty", id="empty-name"),
        pytest.param(job(settings=[1]), "jobs/x.toml: settings: must be a table, got an array", id="settings-type"),
    ],
)
def test_each_mistake_is_one_line_naming_file_key_and_problem(data, message):
    assert error_of(data) == message


def test_a_mapping_without_a_file_names_only_the_key():
    assert error_of(job({"type": "txt2img", "steps": 0}), source=None) == "stages[1].steps: must be at least 1, got 0"
    assert error_of({"stages": [{"type": "txt2img"}]}, source=None) == "name: missing: a job needs a name"


def test_a_toml_syntax_error_names_the_file_and_line(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text('name = "x"\nsteps 20\n')
    with pytest.raises(JobFileError) as caught:
        load_job(path)
    assert str(caught.value).startswith(f"{path}: not valid TOML: ")
    assert "line 2" in str(caught.value)


def test_a_missing_file_is_a_job_file_error(tmp_path):
    with pytest.raises(JobFileError, match="no such file"):
        load_job(tmp_path / "nope.toml")


def test_a_file_that_is_not_utf8_is_a_job_file_error(tmp_path):
    path = tmp_path / "latin1.toml"
    path.write_bytes('name = "caf\xe9"\n'.encode("latin-1"))
    with pytest.raises(JobFileError, match="latin1.toml"):
        load_job(path)


_KEYS = st.sampled_from(
    ["name", "prompt", "seed", "checkpoint", "settings", "stages", "type", "extra", "upscaler", "scale", "via",
     "ad_model", "ad_steps", "steps", "width", "denoising_strength", "enable_hr", "override_settings", "n_iter"]
) | st.text(max_size=8)  # fmt: skip
_SCALARS = (
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8)
    | st.sampled_from(["txt2img", "img2img", "adetailer", "upscale", "extras", "img2img"])
)  # fmt: skip
_VALUES = st.recursive(
    _SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_KEYS, inner, max_size=5),
    max_leaves=20,
)


@given(
    top=st.dictionaries(_KEYS, _VALUES, max_size=6),
    stages=st.lists(st.dictionaries(_KEYS, _VALUES, max_size=6), max_size=4),
)
def test_any_mapping_either_builds_a_spec_or_raises_one_job_file_error(top, stages):
    data = {**top, "stages": [{"type": "txt2img"}, *stages]} if stages else top
    try:
        spec = JobSpec.from_mapping(data, source="x.toml", rng=random.Random(0))
    except JobFileError as error:
        assert "\n" not in str(error) and str(error).startswith("x.toml: ")
    else:
        assert spec.seed >= 0
        assert all(key in FIELDS[stage.endpoint] for stage in spec.stages for key in stage.settings)
        assert len(spec.plan()) == len(spec.stages)


# --------------------------------------------------------------------------
# The plan
# --------------------------------------------------------------------------


def plan_of(*stages: dict, **settings) -> tuple:
    return JobSpec.from_mapping(job(*stages, settings=settings)).plan()


def test_later_stages_run_once_per_image_of_the_stage_before():
    plan = plan_of(
        {"type": "txt2img", "n_iter": 2, "batch_size": 3},
        {"type": "img2img"},
        {"type": "upscale", "upscaler": "Lanczos"},
    )
    assert [(stage.requests, stage.iterations, stage.images) for stage in plan] == [(1, 2, 6), (6, 1, 6), (6, 1, 6)]


def test_n_iter_multiplies_steps_and_passes_and_batch_size_only_images():
    (stage,) = plan_of({"type": "txt2img", "n_iter": 3, "batch_size": 2}, steps=10)
    assert (stage.iterations, stage.steps, stage.passes, stage.images, stage.cost) == (3, 30, 3, 6, 30.0)


def test_hires_fix_adds_a_second_pass_and_scales_the_size():
    (stage,) = plan_of({"type": "txt2img", "enable_hr": True, "hr_scale": 1.5, "hr_second_pass_steps": 5}, steps=10, width=512, height=768)
    assert (stage.steps, stage.passes, stage.size) == (15, 2, (768, 1152))


def test_hires_fix_without_second_pass_steps_repeats_the_steps():
    (stage,) = plan_of({"type": "txt2img", "enable_hr": True, "hr_resize_x": 100}, steps=10, width=64, height=32)
    assert (stage.steps, stage.passes, stage.size) == (20, 2, (96, 48))


def test_img2img_samples_steps_scaled_by_denoising_plus_one():
    _, stage = plan_of({"type": "txt2img"}, {"type": "img2img", "denoising_strength": 0.5}, steps=8)
    assert (stage.steps, stage.passes) == (5, 1)


def test_adetailer_samples_one_step_then_each_assumed_face():
    """Like the recorded ADetailer run: 4 ad_steps at denoising 0.4 inpaint 2 steps a face."""
    _, stage = plan_of({"type": "txt2img"}, {"type": "adetailer", "ad_model": "m", "ad_steps": 4}, steps=8)
    assert (stage.steps, stage.passes) == (1 + 2, 2)


def test_adetailer_without_its_own_steps_uses_the_stage_steps():
    _, stage = plan_of({"type": "txt2img"}, {"type": "adetailer", "ad_model": "m", "ad_denoising_strength": 0.5}, steps=10)
    assert stage.steps == 1 + 6


def test_an_extras_upscale_samples_nothing_but_still_costs_a_little():
    _, stage = plan_of({"type": "txt2img"}, {"type": "upscale", "upscaler": "Lanczos", "scale": 2.5}, width=64, height=64)
    assert (stage.steps, stage.passes, stage.size, stage.endpoint) == (0, 1, (160, 160), "extra-single-image")
    assert 0 < stage.cost < 2


def test_an_img2img_upscale_asks_for_a_multiple_of_8():
    _, stage = plan_of({"type": "txt2img"}, {"type": "upscale", "via": "img2img", "scale": 1.5, "denoising_strength": 0.25}, width=72, height=64, steps=8)
    assert (stage.size, stage.steps) == ((104, 96), 3)


def test_a_later_stage_keeps_the_size_unless_it_sets_its_own():
    _, keeps, resizes = plan_of({"type": "txt2img"}, {"type": "img2img"}, {"type": "img2img", "width": 96}, width=64, height=64)
    assert (keeps.size, resizes.size) == ((64, 64), (96, 64))
