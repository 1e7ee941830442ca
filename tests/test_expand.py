"""One job file, many jobs: prompt lists, wildcards, the matrix, repetitions and seeds."""

from __future__ import annotations

import itertools
import math
import random
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sdjobs.expand import load_jobs
from sdjobs.spec import JobFileError, JobSpec, load_job

STAGES = '[[stages]]\ntype = "txt2img"\n\n[[stages]]\ntype = "img2img"\ndenoising_strength = 0.4\n'


def write(folder: Path, text: str, name: str = "job.toml") -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def job_file(folder: Path, head: str, matrix: str = "") -> Path:
    return write(folder, f'name = "lighthouse"\n{head}\n{STAGES}\n{matrix}')


def error(path: Path, **kwargs) -> str:
    with pytest.raises(JobFileError) as caught:
        load_jobs(path, **kwargs)
    return str(caught.value)


def test_a_prompt_list_a_two_value_matrix_and_three_seeds_make_24_named_jobs(tmp_path):
    path = job_file(
        tmp_path,
        'prompts = ["a lighthouse", "a harbour", "a cliff", "a boat"]\nseed = 100\ncount = 3',
        "[matrix]\ncfg_scale = [5, 7]\n",
    )
    jobs = load_jobs(path)
    assert len(jobs) == 24
    assert len({job.name for job in jobs}) == 24
    named = {job.name: job for job in jobs}
    job = named["lighthouse #2 cfg_scale=7 r3"]
    assert (job.prompt, job.seed) == ("a harbour", 102)
    assert [stage.settings["cfg_scale"] for stage in job.stages] == [7, 7]
    assert named["lighthouse #2 cfg_scale=5 r3"].seed == 102  # both values see the same seeds
    assert {job.seed for job in jobs} == {100, 101, 102}


def test_a_plain_file_is_one_job_named_as_written(tmp_path):
    path = job_file(tmp_path, 'prompt = "a lighthouse"\nseed = 3')
    (job,) = load_jobs(path)
    assert job == load_job(path)


def test_a_prompts_file_skips_blank_lines_and_comments(tmp_path):
    write(tmp_path, "# the harbour set\na lighthouse\n\n  a boat  \n#a cliff\n", "prompts.txt")
    path = job_file(tmp_path, 'prompts_file = "prompts.txt"\nseed = 1')
    assert [(job.name, job.prompt) for job in load_jobs(path)] == [("lighthouse #1", "a lighthouse"), ("lighthouse #2", "a boat")]


def test_wildcards_nest_and_a_rerun_draws_the_same(tmp_path):
    write(tmp_path / "wildcards", "__colour__ lighthouse\n__colour__ boat\n", "thing.txt")
    write(tmp_path / "wildcards", "red\nblue\ngreen\n", "colour.txt")
    path = job_file(tmp_path, 'prompt = "a __thing__ at dusk"\nseed = 7\ncount = 12', "[matrix]\ncfg_scale = [5, 7]\n")
    jobs = load_jobs(path)
    prompts = [job.prompt for job in jobs]
    assert all(re.fullmatch(r"a (red|blue|green) (lighthouse|boat) at dusk", prompt) for prompt in prompts)
    assert len(set(prompts)) > 1
    assert prompts[:12] == prompts[12:]  # the matrix's values share their prompts
    assert [job.prompt for job in load_jobs(path)] == prompts


def test_wildcards_come_from_the_folder_the_file_names(tmp_path):
    write(tmp_path / "lists", "lighthouse\n", "thing.txt")
    path = job_file(tmp_path, 'prompt = "a __thing__"\nwildcards = "lists"\nseed = 1')
    assert load_jobs(path)[0].prompt == "a lighthouse"


def test_a_missing_wildcard_names_the_file_the_prompt_and_the_likely_one(tmp_path):
    write(tmp_path / "wildcards", "red\n", "colour.txt")
    path = job_file(tmp_path, 'prompts = ["a boat", "a __color__ boat"]\nseed = 1')
    message = error(path)
    assert message.startswith(f"{path}: prompts[2]: wildcard __color__: no file {tmp_path / 'wildcards' / 'color.txt'}")
    assert message.endswith("(did you mean 'colour'?)")


def test_a_wildcard_that_refers_to_itself_is_an_error(tmp_path):
    write(tmp_path / "wildcards", "a __loop__\n", "loop.txt")
    path = job_file(tmp_path, 'prompt = "__loop__"\nseed = 1')
    assert "wildcards nest deeper than 10 (__loop__ left)" in error(path)


def test_an_empty_wildcard_file_is_named(tmp_path):
    empty = write(tmp_path / "wildcards", "# nothing yet\n", "colour.txt")
    path = job_file(tmp_path, 'prompt = "__colour__"\nseed = 1')
    assert error(path) == f"{empty}: no lines to choose from for __colour__"


def test_a_matrix_varies_checkpoints_and_one_stages_key(tmp_path):
    path = job_file(
        tmp_path,
        'prompt = "p"\nseed = 1',
        '[matrix]\ncheckpoint = ["a.ckpt", "b.ckpt"]\n"stages[2].denoising_strength" = [0.3, 0.5]\n',
    )
    jobs = load_jobs(path)
    assert [job.name for job in jobs] == [
        "lighthouse checkpoint=a.ckpt stages[2].denoising_strength=0.3",
        "lighthouse checkpoint=a.ckpt stages[2].denoising_strength=0.5",
        "lighthouse checkpoint=b.ckpt stages[2].denoising_strength=0.3",
        "lighthouse checkpoint=b.ckpt stages[2].denoising_strength=0.5",
    ]
    assert [(job.checkpoint, job.stages[1].settings["denoising_strength"]) for job in jobs] == [
        ("a.ckpt", 0.3), ("a.ckpt", 0.5), ("b.ckpt", 0.3), ("b.ckpt", 0.5),
    ]  # fmt: skip
    assert "denoising_strength" not in jobs[0].stages[0].settings


@pytest.mark.parametrize(
    ("matrix", "message"),
    [
        ("cfg_scal = [5, 7]", "matrix.cfg_scal: not a setting (did you mean 'cfg_scale'?)"),
        ("cfg_scale = [5, -1]", "matrix.cfg_scale: must be greater than 0, got -1"),
        ("cfg_scale = 7", "matrix.cfg_scale: must be an array of values, at least one"),
        ("cfg_scale = []", "matrix.cfg_scale: must be an array of values, at least one"),
        ("cfg_scale = [7, 7]", "matrix.cfg_scale: the same value is listed twice"),
        ('"stages[3].steps" = [5]', 'matrix."stages[3].steps": no such stage: the file has 2'),
        ('"stages[2].denoise" = [0.3]', 'matrix."stages[2].denoise": unknown key (did you mean'),
        ('sampler_name = ["Euler", 3]', "matrix.sampler_name: must be a string, got 3"),
    ],
)
def test_a_bad_matrix_key_or_value_is_named_by_its_matrix_key(tmp_path, matrix, message):
    path = job_file(tmp_path, 'prompt = "p"\nseed = 1', f"[matrix]\n{matrix}\n")
    assert error(path).startswith(f"{path}: {message}")


@pytest.mark.parametrize(
    ("head", "message"),
    [
        ('prompt = "p"\nprompts = ["q"]', "prompts: a file sets one of prompt, prompts and prompts_file"),
        ("prompts = []", "prompts: must not be empty"),
        ('prompts = ["p", 3]', "prompts[2]: must be a string"),
        ('prompts_file = "none.txt"', "prompts_file: no such file"),
        ("count = 0", "count: must be at least 1, got 0"),
        ('count = "3"', "count: must be an integer, at least 1"),
        ('seed_policy = "incremental"', "seed_policy: unknown policy 'incremental' (did you mean 'increment'?)"),
    ],
)
def test_a_bad_expansion_key_is_named(tmp_path, head, message):
    path = job_file(tmp_path, f"seed = 1\n{head}")
    assert error(path).startswith(f"{path}: {message}")


def test_the_stages_are_checked_once_with_their_own_keys(tmp_path):
    path = write(tmp_path, 'prompts = ["a", "b"]\n[[stages]]\ntype = "txt2img"\nstep = 3\n')
    assert error(path) == f"{path}: stages[1].step: unknown key (did you mean 'steps'?); pass other request fields in a [stages.extra] table"


def test_a_fixed_seed_policy_repeats_the_seed(tmp_path):
    path = job_file(tmp_path, 'prompt = "p"\nseed = 5\ncount = 3\nseed_policy = "fixed"')
    assert [job.seed for job in load_jobs(path)] == [5, 5, 5]


def test_a_random_seed_policy_draws_one_per_job_from_the_given_generator(tmp_path):
    path = job_file(tmp_path, 'prompt = "p"\ncount = 4\nseed_policy = "random"', "[matrix]\nsteps = [10, 20]\n")
    seeds = [job.seed for job in load_jobs(path, rng=random.Random(3))]
    assert len(set(seeds)) == 8
    assert [job.seed for job in load_jobs(path, rng=random.Random(3))] == seeds


def test_an_increment_near_the_top_wraps_around(tmp_path):
    path = job_file(tmp_path, f'prompt = "p"\nseed = {2**32 - 1}\ncount = 2')
    assert [job.seed for job in load_jobs(path)] == [2**32 - 1, 0]


def test_more_jobs_than_the_limit_asks_for_yes(tmp_path):
    path = job_file(tmp_path, 'prompt = "p"\nseed = 1\ncount = 50', "[matrix]\ncfg_scale = [5, 6, 7]\n")
    assert error(path, limit=100) == f"{path}: expands to 150 jobs, more than 100; pass --yes to queue them all"
    assert len(load_jobs(path, limit=150)) == 150


def test_the_one_job_reader_refuses_a_file_of_many(tmp_path):
    path = job_file(tmp_path, 'prompt = "p"\ncount = 3')
    with pytest.raises(JobFileError, match="count: makes a file of many jobs"):
        load_job(path)


def test_expanded_jobs_round_trip_through_the_store_format(tmp_path):
    path = job_file(tmp_path, 'prompts = ["a", "b"]\nseed = 1\ncount = 2', '[matrix]\nsampler_name = ["Euler", "Euler a"]\n')
    for job in load_jobs(path):
        assert JobSpec.from_dict(job.to_dict()) == job


#: Settings a matrix may vary, each with values that make a valid job.
POOL = {
    "cfg_scale": st.floats(1, 30, allow_nan=False).map(lambda v: round(v, 1)),
    "steps": st.integers(1, 150),
    "sampler_name": st.sampled_from(["Euler", "Euler a", "DDIM", "DPM++ 2M", "LMS"]),
    "width": st.sampled_from([256, 512, 768, 1024]),
    "checkpoint": st.sampled_from(["a.ckpt", "b [x].safetensors", "c"]),
    "stages[2].denoising_strength": st.floats(0, 1, allow_nan=False).map(lambda v: round(v, 2)),
}


@st.composite
def files(draw):
    keys = draw(st.lists(st.sampled_from(sorted(POOL)), unique=True, max_size=4))
    matrix = {key: draw(st.lists(POOL[key], min_size=1, max_size=3, unique_by=str)) for key in keys}
    prompts = draw(st.lists(st.text("abc xyz,", min_size=1, max_size=8), min_size=1, max_size=3))
    return prompts, matrix, draw(st.integers(1, 3))


def toml_value(value) -> str:
    return f'"{value}"' if isinstance(value, str) else repr(value)


@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(files())
def test_a_file_expands_to_the_product_of_its_axes_with_unique_names(tmp_path, drawn):
    prompts, matrix, count = drawn
    lines = [f'"{key}" = [{", ".join(map(toml_value, values))}]' for key, values in matrix.items()]
    head = f"prompts = [{', '.join(map(toml_value, prompts))}]\nseed = 9\ncount = {count}"
    path = job_file(tmp_path, head, "[matrix]\n" + "\n".join(lines) + "\n")
    jobs = load_jobs(path)
    assert len(jobs) == len(prompts) * count * math.prod(len(values) for values in matrix.values())
    assert len({job.name for job in jobs}) == len(jobs)
    combinations = {tuple(value_of(job, key) for key in matrix) for job in jobs}
    assert combinations == set(itertools.product(*matrix.values()))


def value_of(job: JobSpec, key: str):
    """The value a matrix key set in `job`."""
    if key == "checkpoint":
        return job.checkpoint
    stage = int(key[len("stages[")]) - 1 if key.startswith("stages[") else 0
    return job.stages[stage].settings[key.rpartition(".")[2]]
