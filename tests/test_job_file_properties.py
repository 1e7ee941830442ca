"""Job files drawn at random: a valid one builds the job it describes and reads back equal from
the store's JSON; the same file with one mistake fails naming the key.  Valid files are two of
every three examples (the property's job is the valid branch; test_spec.py's hostile mappings
cover the errors)."""

from __future__ import annotations

import json
import random

from hypothesis import event, given
from hypothesis import strategies as st

from sdjobs.spec import JobFileError, JobSpec

#: Request fields every generation stage takes, with values in their valid ranges.
GENERATION = {
    "steps": st.integers(1, 150),
    "cfg_scale": st.floats(1, 30, allow_nan=False),
    "sampler_name": st.sampled_from(["Euler", "Euler a", "DPM++ 2M"]),
    "width": st.integers(1, 128).map(lambda n: 8 * n),
    "height": st.integers(1, 128).map(lambda n: 8 * n),
    "batch_size": st.integers(1, 8),
}
TXT2IMG = {**GENERATION, "n_iter": st.integers(1, 4), "enable_hr": st.booleans(), "hr_scale": st.floats(1, 4)}
IMG2IMG = {**GENERATION, "denoising_strength": st.floats(0, 1)}
TEXT = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=12)


def some_of(fields: dict) -> st.SearchStrategy[dict]:
    return st.fixed_dictionaries({}, optional=fields)


@st.composite
def later_stage(draw) -> dict:
    kind = draw(st.sampled_from(["img2img", "adetailer", "upscale extras", "upscale img2img"]))
    if kind == "img2img":
        return {"type": "img2img", **draw(some_of(IMG2IMG))}
    if kind == "adetailer":
        return {"type": "adetailer", "ad_model": "face_yolov8n.pt", **draw(some_of({"ad_steps": st.integers(1, 50), "steps": st.integers(1, 50)}))}
    scale = {"scale": draw(st.floats(1, 8))}
    if kind == "upscale extras":
        return {"type": "upscale", "upscaler": draw(st.sampled_from(["Lanczos", "R-ESRGAN 4x+"])), **scale}
    return {"type": "upscale", "via": "img2img", **scale, **draw(some_of(IMG2IMG))}


@st.composite
def job_files(draw) -> dict:
    data = {
        "name": draw(TEXT.filter(str.strip)),
        "seed": draw(st.integers(0, 2**32 - 1) | st.just(-1)),
        "settings": draw(some_of(GENERATION)),
        "stages": [{"type": "txt2img", **draw(some_of(TXT2IMG))}, *draw(st.lists(later_stage(), max_size=3))],
    }
    data |= draw(some_of({"prompt": TEXT, "negative_prompt": TEXT, "checkpoint": st.sampled_from(["a.ckpt", "b [1].safetensors"])}))
    return data


def expected_settings(data: dict, index: int) -> dict:
    """What a stage sends, by the documented rules: the job's [settings] on every generation stage
    unless it sets the key itself, width and height on the first stage only, none on an extras upscale."""
    stage = data["stages"][index]
    own = {key: value for key, value in stage.items() if key not in ("type", "upscaler", "scale", "via", "ad_model", "ad_steps")}
    if stage["type"] == "upscale" and stage.get("via") != "img2img":
        return own
    inherited = {k: v for k, v in data["settings"].items() if index == 0 or k not in ("width", "height")}
    return inherited | own


def check_valid(data: dict) -> None:
    spec = JobSpec.from_mapping(data, source="x.toml", rng=random.Random())
    assert (spec.name, spec.prompt, spec.negative_prompt) == (data["name"], data.get("prompt", ""), data.get("negative_prompt", ""))
    assert spec.seed == data["seed"] if data["seed"] != -1 else 0 <= spec.seed < 2**32 - 1
    assert spec.checkpoint == data.get("checkpoint")
    assert [stage.type for stage in spec.stages] == [stage["type"] for stage in data["stages"]]
    for index, (stage, written) in enumerate(zip(spec.stages, data["stages"], strict=True)):
        assert dict(stage.settings) == expected_settings(data, index), f"stage {index + 1}"
        assert stage.upscaler == written.get("upscaler")
        assert stage.scale == (written.get("scale", 2.0) if written["type"] == "upscale" else None)
        if written["type"] == "adetailer":
            assert stage.adetailer["ad_model"] == written["ad_model"]
            assert stage.adetailer.get("ad_use_steps", False) == ("ad_steps" in written)
    assert len(spec.plan()) == len(spec.stages)
    assert JobSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


MISTAKES = {
    "an unknown stage key": lambda data, i: (data["stages"][i].__setitem__("denoise", 0.5), f"stages[{i + 1}].denoise"),
    "a value out of range": lambda data, i: (data["stages"][i].__setitem__("steps", 0), f"stages[{i + 1}].steps"),
    "a value of the wrong type": lambda data, i: (data["settings"].__setitem__("cfg_scale", "7"), "settings.cfg_scale"),
    "a second txt2img": lambda data, i: (data["stages"].append({"type": "txt2img"}), f"stages[{len(data['stages'])}].type"),
}


@given(job_files(), st.sampled_from(["valid", "valid", "broken"]), st.sampled_from(sorted(MISTAKES)), st.data())
def test_a_valid_file_builds_its_job_and_one_mistake_is_named(data, branch, mistake, draw):
    event(branch)
    if branch == "valid":
        check_valid(data)
        return
    index = draw.draw(st.integers(0, len(data["stages"]) - 1))
    _, key = MISTAKES[mistake](data, index)
    try:
        JobSpec.from_mapping(data, source="x.toml")
    except JobFileError as error:
        assert str(error).startswith(f"x.toml: {key}: "), str(error)
        assert "\n" not in str(error)
    else:
        raise AssertionError(f"{mistake} at {key} was accepted")
