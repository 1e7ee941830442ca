"""The words shared by every front end."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sdjobs.frontends.formatting import (
    drained_line,
    format_duration,
    format_eta,
    format_image,
    outcome_line,
    stage_finished_line,
    status_line,
)
from sdjobs.status import JobState, RuntimeStatus, StageResult


def running(**changes) -> RuntimeStatus:
    values = dict(job_id="j", name="lighthouse", stage="img2img", stage_index=1, stage_count=4, seed=1234567890)
    return RuntimeStatus(**(values | changes))


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(None, "calculating..."), (0, "0s"), (0.4, "0s"), (45, "45s"), (59.6, "1m 00s"), (65, "1m 05s"),
     (3599, "59m 59s"), (3725, "1h 02m"), (-3, "0s")],
)  # fmt: skip
def test_eta_text(seconds, text):
    assert format_eta(seconds) == text


@given(st.floats(0, 10**6), st.floats(0, 10**6))
def test_a_longer_duration_never_reads_shorter(a, b):
    def parsed(text: str) -> int:
        units = {"h": 3600, "m": 60, "s": 1}
        return sum(int(part[:-1]) * units[part[-1]] for part in text.split())

    low, high = sorted((a, b))
    assert parsed(format_duration(low)) <= parsed(format_duration(high))


def test_the_status_line_says_stage_step_percent_eta_and_seed():
    status = running(progress=0.4, step=12, steps=30, eta=65)
    assert status_line(status) == "Stage 2/4 img2img · step 12/30 · 40% · ETA 1m 05s · seed 1234567890"


def test_the_status_line_says_which_image_of_several_the_step_belongs_to():
    status = running(progress=0.7, image=1, images=3, step=3, steps=25, eta=4)
    assert status_line(status) == "Stage 2/4 img2img · image 1/3 · step 3/25 · 70% · ETA 4s · seed 1234567890"
    assert format_image(status) == "1/3"
    assert format_image(running(step=3, steps=25)) is None


@pytest.mark.parametrize(("fields", "shown"), [
    ({"pass_kind": "hires", "step": 2, "steps": 14}, "hires 2/14"),
    ({"pass_kind": "hires", "step": 0, "steps": 28}, "hires"),
    ({"pass_kind": "face", "face": (1, 2), "step": 3, "steps": 9}, "ADetailer face 1/2 · step 3/9"),
    ({"pass_kind": "face", "face": (2, 2)}, "ADetailer face 2/2"),
    ({"pass_kind": "face", "step": 3, "steps": 9}, "ADetailer · step 3/9"),
])  # fmt: skip
def test_the_status_line_names_a_hires_or_adetailer_pass(fields, shown):
    status = running(stage_index=0, stage="txt2img", progress=0.5, eta=4, **fields)
    assert status_line(status) == f"Stage 1/4 txt2img · {shown} · 50% · ETA 4s · seed 1234567890"


@pytest.mark.parametrize(("step", "steps"), [(None, None), (0, None), (0, 30), (12, None)])
def test_the_status_line_leaves_out_a_step_until_both_figures_are_known_and_calculates_the_eta(step, steps):
    assert status_line(running(stage_index=0, stage="txt2img", step=step, steps=steps)) == (
        "Stage 1/4 txt2img · 0% · ETA calculating... · seed 1234567890"
    )


def test_the_status_line_says_when_the_server_holds_the_request_in_its_queue():
    status = running(queue_position=(1, 2), step=3, steps=30)
    assert status_line(status) == (
        "Stage 2/4 img2img · waiting in the server's queue 1/2 · 0% · ETA calculating... · seed 1234567890"
    )


def test_a_finished_stage_names_its_time_and_images():
    result = StageResult("img2img", 1, images=(Path("out/a.png"), Path("out/b.png")), elapsed=12.2)
    assert stage_finished_line(running(), result) == (
        "Stage 2/4 img2img finished in 12s · 2 images in out: a.png, b.png"
    )
    cut = StageResult("img2img", 1, images=(Path("out/a.png"),), elapsed=3, partial=True)
    assert stage_finished_line(running(), cut) == "Stage 2/4 img2img cut short after 3s · 1 partial image: out/a.png"
    apart = StageResult("img2img", 1, images=(Path("out/a.png"), Path("more/b.png")))
    assert stage_finished_line(running(), apart).endswith(" · 2 images: out/a.png, more/b.png")


def test_outcome_lines():
    whole = StageResult("txt2img", 0, images=(Path("a.png"), Path("b.png")))
    cut = StageResult("img2img", 1, images=(Path("c.png"),), partial=True)
    assert outcome_line("sea", JobState.DONE, None, 65, (whole,)) == "sea: done in 1m 05s · 2 images"
    assert outcome_line("sea", JobState.FAILED, "HTTP 500: CUDA out of memory", 5, ()) == (
        "sea: failed after 5s · 0 images: HTTP 500: CUDA out of memory"
    )
    assert outcome_line("sea", JobState.CANCELLED, None, 9, (whole, cut)) == (
        "sea: cancelled after 9s · 3 images (the stage's partial images are kept)"
    )


def test_the_drained_line_counts_outcomes_and_jobs_never_run():
    outcomes = {"a": JobState.DONE, "b": JobState.CANCELLED, "c": JobState.DONE}
    assert drained_line(outcomes, queued=4) == "4 jobs: 2 done, 1 cancelled, 1 not run"
    assert drained_line({"a": JobState.FAILED}, queued=1) == "1 job: 1 failed"
