"""Jobs that start from images (`init_images`), and reading A1111's infotext from them."""

from __future__ import annotations

import io
import json
import random
import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image, PngImagePlugin
from runner_helpers import make_runner
from sdjobs.expand import load_jobs
from sdjobs.infotext import Infotext
from sdjobs.outputs import MANIFEST, JobFolder, read_parameters
from sdjobs.payloads import build_payload
from sdjobs.sim import SimSettings
from sdjobs.spec import JobFileError, JobSpec, load_job
from sdjobs.status import JobState

EXAMPLES = Path(__file__).parent.parent / "examples"
TRACES = Path(__file__).parent / "data" / "traces"
CAT = "a cat on a mat\nNegative prompt: blurry\nSteps: 8, Sampler: Euler a, CFG scale: 7.0, Seed: 1234, Size: 64x48"
UPSCALE = '[[stages]]\ntype = "upscale"\nupscaler = "Lanczos"\nscale = 2\n'
IMG2IMG = '[[stages]]\ntype = "img2img"\ndenoising_strength = 0.5\nsteps = 4\n'


def png(parameters: str | None = None, size: tuple[int, int] = (64, 48), colour: str = "grey") -> bytes:
    info = PngImagePlugin.PngInfo()
    if parameters is not None:
        info.add_text("parameters", parameters)
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, "PNG", pnginfo=info)
    return buffer.getvalue()


def job_file(folder: Path, head: str, stages: str = UPSCALE) -> Path:
    path = folder / "job.toml"
    path.write_text(f'name = "upscale folder"\n{head}\n{stages}')
    return path


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    """`photos/`: cat.png (with an infotext), dog.png (without), notes.txt (not an image)."""
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "cat.png").write_bytes(png(CAT))
    (folder / "dog.png").write_bytes(png(size=(96, 64), colour="brown"))
    (folder / "notes.txt").write_text("not a picture")
    return folder


def error(load, path: Path) -> str:
    with pytest.raises(JobFileError) as caught:
        load(path)
    return str(caught.value)


# --------------------------------------------------------------------------
# Infotext
# --------------------------------------------------------------------------


def generation_infos() -> list[dict]:
    """The `info` of every generation answer recorded from a real A1111."""
    infos = []
    for trace in sorted(TRACES.glob("*.jsonl")):
        for line in trace.read_text().splitlines():
            body = json.loads(line).get("body")
            info = body.get("info") if isinstance(body, dict) else None  # recorded decoded
            if isinstance(info, dict) and info.get("infotexts"):
                infos.append(info)
    return infos


def test_the_recorded_infotexts_read_back_as_the_server_reported_them():
    infos = generation_infos()
    assert len(infos) >= 10
    for info in infos:
        for index, text in enumerate(info["infotexts"]):
            image = info["index_of_first_image"] + index
            parsed = Infotext.parse(text)
            assert parsed.prompt == info["all_prompts"][image]
            assert parsed.negative_prompt == info["all_negative_prompts"][image]
            assert parsed.seed == info["all_seeds"][image]
            assert parsed.params["Steps"] == str(info["steps"])
            assert parsed.params["Sampler"] == info["sampler_name"]


def quoted(value: str) -> str:
    """A parameter value as A1111 writes it: JSON-quoted when it would break the line."""
    return json.dumps(value, ensure_ascii=False) if any(c in value for c in ",:\n") else value


LINE = st.text(st.characters(codec="utf-8", exclude_characters="\n\r"), min_size=1).map(str.strip).filter(bool)
KEY = st.from_regex(r"[A-Za-z][A-Za-z \-/]{0,15}[A-Za-z]", fullmatch=True)
VALUE = st.text(st.characters(codec="utf-8", exclude_characters="\r"), min_size=1).filter(
    lambda value: value == value.strip() and not value.startswith('"')
)


@given(
    prompt=st.lists(LINE, min_size=1, max_size=3).filter(lambda lines: not lines[0].startswith("Negative prompt:")),
    # A1111 starts the negative prompt again at any line so marked: such a line is not what it writes.
    negative=st.lists(LINE.filter(lambda line: not line.startswith("Negative prompt:")), max_size=3),
    seed=st.integers(0, 2**32 - 1),
    extra=st.dictionaries(KEY.filter(lambda key: key not in ("Steps", "Sampler", "Seed")), VALUE, max_size=4),
)
def test_an_infotext_written_as_a1111_writes_it_reads_back(prompt, negative, seed, extra):
    prompt = [line for line in prompt if not line.startswith("Negative prompt:")] or ["a cat"]
    params = {"Steps": "20", "Sampler": "Euler a", "Seed": str(seed), **extra}
    lines = [*prompt, *([f"Negative prompt: {negative[0]}", *negative[1:]] if negative else [])]
    text = "\n".join([*lines, ", ".join(f"{key}: {quoted(value)}" for key, value in params.items())])
    parsed = Infotext.parse(text)
    assert (parsed.prompt, parsed.negative_prompt, parsed.seed) == ("\n".join(prompt), "\n".join(negative), seed)
    assert dict(parsed.params) == params


def test_a_last_line_of_fewer_than_three_parameters_is_part_of_the_prompt():
    parsed = Infotext.parse("a cat\nstyle: oil, mood: calm")
    assert (parsed.prompt, parsed.params, parsed.seed) == ("a cat\nstyle: oil, mood: calm", {}, None)


@pytest.mark.parametrize("seed", ["-1", "4294967296", "twelve", ""])
def test_a_seed_a1111_could_not_have_used_is_no_seed(seed):
    assert Infotext.parse(f"a cat\nSteps: 8, Sampler: Euler, Seed: {seed}").seed is None


# --------------------------------------------------------------------------
# Reading the images
# --------------------------------------------------------------------------


def test_a_folder_makes_a_job_per_image_named_after_it_prompted_by_its_infotext(photos):
    path = job_file(photos.parent, 'init_images = "photos"')
    cat, dog = load_jobs(path, rng=random.Random(1))
    assert (cat.name, dog.name) == ("upscale folder: cat.png", "upscale folder: dog.png")
    assert cat.inputs == ((photos / "cat.png").read_bytes(),)
    assert (cat.prompt, cat.negative_prompt, cat.seed) == ("a cat on a mat", "blurry", 1234)
    assert dog.inputs == ((photos / "dog.png").read_bytes(),)
    assert (dog.prompt, dog.negative_prompt) == ("", "")  # no infotext: nothing to take, a seed drawn
    assert [plan.size for plan in dog.plan()] == [(192, 128)]


def test_what_the_file_sets_beats_the_images_infotext(photos):
    path = job_file(photos.parent, 'init_images = "photos/cat.png"\nprompt = "a lion"\nseed = 7')
    (job,) = load_jobs(path)
    assert (job.prompt, job.negative_prompt, job.seed) == ("a lion", "blurry", 7)
    assert job == load_job(path)


def test_per_image_false_is_one_job_of_every_image_with_the_first_ones_infotext(photos):
    path = job_file(photos.parent, 'init_images = "photos/*.png"\nper_image = false', IMG2IMG)
    (job,) = load_jobs(path)
    assert job.name == "upscale folder"
    assert job.inputs == ((photos / "cat.png").read_bytes(), (photos / "dog.png").read_bytes())
    assert (job.prompt, job.seed) == ("a cat on a mat", 1234)
    (plan,) = job.plan()
    assert (plan.requests, plan.images, plan.size) == (2, 2, (64, 48))
    assert plan.cost == 2 * (int(4 * 0.5) + 1)


def test_an_upscale_after_an_img2img_from_images_is_planned_from_their_count(photos):
    path = job_file(photos.parent, 'init_images = "photos/*.png"\nper_image = false', IMG2IMG + UPSCALE)
    first, second = load_job(path).plan()
    assert (first.requests, second.requests, second.size) == (2, 2, (128, 96))


def test_a_glob_with_a_matrix_and_count_multiplies_and_keeps_each_images_seed(photos):
    path = photos.parent / "job.toml"
    path.write_text(f'name = "up"\ninit_images = "photos/c*.png"\ncount = 2\n{UPSCALE}[matrix]\n"stages[1].scale" = [2, 4]\n')
    jobs = load_jobs(path)
    assert [(job.name, job.seed, job.stages[0].scale) for job in jobs] == [
        ("up: cat.png stages[1].scale=2 r1", 1234, 2.0),
        ("up: cat.png stages[1].scale=2 r2", 1235, 2.0),
        ("up: cat.png stages[1].scale=4 r1", 1234, 4.0),
        ("up: cat.png stages[1].scale=4 r2", 1235, 4.0),
    ]
    assert {job.prompt for job in jobs} == {"a cat on a mat"}


@pytest.mark.parametrize(
    ("head", "message"),
    [
        ('init_images = "photos/*.txt"', "init_images: {photos}/notes.txt is not an image Pillow can read"),
        ('init_images = "photos/*.jpg"', "init_images: no file matches '{photos}/*.jpg'"),
        ('init_images = "empty"', "init_images: the folder {empty} holds no images (.png, .jpg, .jpeg, .webp)"),
        ("init_images = 3", "init_images: must be a file, a glob or a folder (relative to the job file), got 3"),
        ('per_image = false', "per_image: only means something with init_images"),
        ('init_images = "photos/cat.png"\n[settings]\nwidth = 512', "settings.width: not used: a job from init_images takes their size"),
    ],
)
def test_a_bad_init_images_is_one_line_naming_the_file_and_key_and_nothing_is_loaded(photos, head, message):
    (photos.parent / "empty").mkdir()
    path = job_file(photos.parent, head)
    expected = f"{path}: " + message.format(photos=photos, empty=photos.parent / "empty")
    for load in (load_jobs, load_job):
        assert error(load, path).startswith(expected)


def test_a_png_that_is_not_an_image_is_named(photos):
    (photos / "broken.png").write_bytes(png(CAT)[:60])
    path = job_file(photos.parent, 'init_images = "photos"')
    assert re.fullmatch(rf"{re.escape(str(path))}: init_images: {re.escape(str(photos / 'broken.png'))} is not an image .*", error(load_jobs, path))


@pytest.mark.parametrize(
    ("stages", "message"),
    [
        ('[[stages]]\ntype = "txt2img"\n', "stages[1].type: a job from init_images starts with img2img, adetailer or upscale, not txt2img"),
        (UPSCALE + '[[stages]]\ntype = "txt2img"\n', "stages[2].type: txt2img can only be a job's first stage"),
    ],
)
def test_a_job_from_images_has_no_txt2img_stage(photos, stages, message):
    path = job_file(photos.parent, 'init_images = "photos/cat.png"', stages)
    assert error(load_jobs, path) == f"{path}: {message}"


def test_a_job_without_images_still_starts_with_txt2img(tmp_path):
    path = job_file(tmp_path, 'prompt = "a cat"')
    assert error(load_job, path) == f"{path}: stages[1].type: a job starts with a txt2img stage, or from images named by init_images"


def test_one_job_reader_refuses_a_job_per_image_of_several_and_says_what_does(photos):
    path = job_file(photos.parent, 'init_images = "photos"')
    assert error(load_job, path) == (
        f"{path}: init_images: names 2 images, a job each, which this reader does not expand"
        " (sdjobs.expand.load_jobs does); per_image = false makes one job of them all"
    )


def test_specs_refuse_inputs_with_txt2img_and_a_later_stage_without_them():
    demo = load_job(EXAMPLES / "demo.toml", rng=random.Random(1))
    with pytest.raises(ValueError, match="inputs"):
        JobSpec(**{**demo.to_dict(), "stages": demo.stages, "source": None, "inputs": (png(),)})
    upscale = load_jobs(EXAMPLES / "upscale-folder.toml")[0]
    with pytest.raises(ValueError, match="inputs"):
        JobSpec(**{**upscale.to_dict(), "stages": upscale.stages, "source": None, "inputs": ()})


# --------------------------------------------------------------------------
# Carried in the spec: store, manifest, repr, payload
# --------------------------------------------------------------------------


def test_the_images_survive_the_store_after_the_folder_changes(photos):
    path = job_file(photos.parent, 'init_images = "photos"')
    stored = [json.dumps(job.to_dict()) for job in load_jobs(path)]
    original = (photos / "cat.png").read_bytes()
    (photos / "cat.png").write_bytes(png(size=(8, 8)))  # the folder changes after queueing
    cat = JobSpec.from_dict(json.loads(stored[0]))
    assert cat.inputs == (original,)
    assert build_payload(cat, 0, cat.inputs[0])["image"] == json.loads(stored[0])["inputs"][0]


def test_the_repr_counts_the_images_and_shows_none_of_their_bytes(photos):
    (job,) = load_jobs(job_file(photos.parent, 'init_images = "photos/*.png"\nper_image = false'))
    assert "inputs=<images: 2>" in repr(job)
    assert "PNG" not in repr(job) and "\\x" not in repr(job)


def test_the_manifest_leaves_the_images_in_the_store(photos, tmp_path):
    (job,) = load_jobs(job_file(photos.parent, 'init_images = "photos/cat.png"'))
    folder = JobFolder.create(tmp_path / "out", "0123456789abcdef")
    manifest = json.loads(folder.write_manifest(job, [], outcome="queued").read_text())
    assert "inputs" not in manifest["spec"]
    assert [path.name for path in folder.path.rglob("*")] == [MANIFEST]


def test_a_first_img2img_stage_sends_its_input_at_its_own_size(photos):
    (job,) = load_jobs(job_file(photos.parent, 'init_images = "photos/dog.png"', IMG2IMG))
    body = build_payload(job, 0, job.inputs[0])
    assert (body["width"], body["height"], body["seed"], len(body["init_images"])) == (96, 64, job.seed, 1)
    with pytest.raises(ValueError, match="input image"):
        build_payload(job, 0, None)


def test_the_example_upscales_a_folder_of_pictures_that_carry_their_prompts():
    jobs = load_jobs(EXAMPLES / "upscale-folder.toml")
    assert [job.name for job in jobs] == [f"upscale folder: {name}" for name in ("cat.png", "harbour.png", "lighthouse.png")]
    assert [job.seed for job in jobs] == [1234, 99, 4242]
    assert jobs[1].prompt == "a harbour at dusk,\noil painting"
    assert all(job.stages[0].endpoint == "extra-single-image" and len(job.inputs) == 1 for job in jobs)


# --------------------------------------------------------------------------
# Running one
# --------------------------------------------------------------------------


@pytest.mark.parametrize("sim_settings", [SimSettings(step_time=0.01, first_step_time=0.01)])
def test_a_job_from_images_runs_each_through_its_stages_and_keeps_their_prompt(webui_sim, webui_client, photos, tmp_path):
    (job,) = load_jobs(job_file(photos.parent, 'init_images = "photos/*.png"\nper_image = false', IMG2IMG + UPSCALE))
    runner, _ = make_runner(webui_client, [job], tmp_path / "out")
    runner.run()
    assert list(runner.outcomes.values()) == [JobState.DONE]
    [folder] = (tmp_path / "out").iterdir()
    images = sorted(folder.glob("02-upscale/*.png"))
    assert [Image.open(image).size for image in images] == [(128, 96), (192, 128)]
    assert all(Infotext.parse(read_parameters(image.read_bytes())).prompt == "a cat on a mat" for image in images)
    assert not list(folder.glob("*/cat.png")) and not list(folder.glob("*/dog.png"))
