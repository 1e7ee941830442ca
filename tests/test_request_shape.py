"""The passes a request is expected to run, as A1111 runs them (defaults, hires sizes, img2img
steps, ADetailer's faces), worked out by hand from A1111's rules rather than from the code."""

from __future__ import annotations

import pytest

from sdjobs.progress import PassShape, RequestShape
from sdjobs.spec import StagePlan, StageSpec

BASE = 512 * 512


@pytest.mark.parametrize(
    ("settings", "passes", "iterations"),
    [
        ({}, (PassShape(50, BASE, 1),), 1),  # A1111's defaults: 512 x 512, 50 steps, one image
        (
            {"width": 640, "height": 384, "steps": 20, "batch_size": 3, "n_iter": 2},
            (PassShape(20, 640 * 384, 3),),
            2,
        ),
        (  # hires at the default scale (2) and, without its own steps, the first pass's
            {"steps": 12, "enable_hr": True},
            (PassShape(12, BASE, 1, handoff=True), PassShape(12, 1024 * 1024, 1, "hires")),
            1,
        ),
        (
            {"width": 512, "height": 768, "steps": 20, "batch_size": 2, "enable_hr": True, "hr_scale": 1.5, "hr_second_pass_steps": 10},
            (PassShape(20, 512 * 768, 2, handoff=True), PassShape(10, 768 * 1152, 2, "hires")),
            1,
        ),
        (  # a hires width alone keeps the aspect; sizes round down to multiples of 8
            {"width": 512, "height": 768, "steps": 8, "enable_hr": True, "hr_resize_x": 1000},
            (PassShape(8, 512 * 768, 1, handoff=True), PassShape(8, 1000 * 1496, 1, "hires")),
            1,
        ),
        (
            {"width": 512, "height": 768, "steps": 8, "enable_hr": True, "hr_resize_y": 600},
            (PassShape(8, 512 * 768, 1, handoff=True), PassShape(8, 400 * 600, 1, "hires")),
            1,
        ),
        (
            {"steps": 8, "enable_hr": True, "hr_resize_x": 1001, "hr_resize_y": 603, "hr_scale": 4},
            (PassShape(8, BASE, 1, handoff=True), PassShape(8, 1000 * 600, 1, "hires")),
            1,
        ),
        ({"steps": 8, "enable_hr": False, "hr_scale": 4}, (PassShape(8, BASE, 1),), 1),
    ],
)
def test_a_txt2img_request_runs_its_passes_at_their_sizes(settings, passes, iterations):
    assert RequestShape.of("txt2img", settings) == RequestShape(passes, iterations)


@pytest.mark.parametrize(
    ("settings", "steps"),
    [
        ({"steps": 20}, 16),  # denoising 0.75 by default: int(20 * 0.75) + 1
        ({"steps": 20, "denoising_strength": 0.5}, 11),
        ({"steps": 20, "denoising_strength": 0}, 1),
        ({"steps": 20, "denoising_strength": 1.0}, 20),  # never one more than asked for
    ],
)
def test_an_img2img_request_samples_the_denoised_share_of_its_steps(settings, steps):
    shape = RequestShape.of("img2img", {**settings, "width": 64, "height": 32, "enable_hr": True, "batch_size": 3})
    assert shape == RequestShape((PassShape(steps, 64 * 32, 3),))


@pytest.mark.parametrize(
    ("tab", "face_steps"),
    [
        ({}, 9),  # the request's 20 steps at ADetailer's denoising 0.4: int(8.0) + 1
        ({"ad_steps": 10}, 9),  # its own steps count only when it is told to use them
        ({"ad_use_steps": True}, 12),  # then 28 by default: int(0.4 * 28) + 1
        ({"ad_use_steps": True, "ad_steps": 10, "ad_denoising_strength": 0.5}, 6),
        ({"ad_use_steps": True, "ad_denoising_strength": 0.99}, 28),  # int(0.99 * 28) + 1
    ],
)
def test_adetailer_adds_one_pass_per_face_of_one_image_at_the_final_size(tab, face_steps):
    settings = {"steps": 20, "width": 64, "height": 64, "batch_size": 4, "enable_hr": True, "hr_scale": 2}
    shape = RequestShape.of("txt2img", settings, tab)
    assert shape.face == PassShape(face_steps, 128 * 128, 1, "face")
    assert shape.passes == (PassShape(20, 64 * 64, 4, handoff=True), PassShape(20, 128 * 128, 4, "hires"))


def test_an_adetailer_stage_samples_nothing_before_the_faces():
    shape = RequestShape.of("adetailer", {"steps": 20, "width": 64, "height": 48, "n_iter": 2, "batch_size": 2})
    assert shape == RequestShape((PassShape(0, 64 * 48, 2),), 2, PassShape(9, 64 * 48, 1, "face"))
    tab = {"ad_use_steps": True, "ad_steps": 10, "ad_denoising_strength": 0.5}
    assert RequestShape.of("adetailer", {"steps": 20}, tab).face == PassShape(6, 512 * 512, 1, "face")


def test_a_stage_after_the_first_is_sampled_at_the_size_of_its_input():
    first = StageSpec("txt2img", settings={"width": 512, "height": 768, "steps": 20})
    upscale = StageSpec("upscale", settings={"steps": 20, "denoising_strength": 0.5}, upscaler="Lanczos", scale=2.0, via="img2img")
    faces = StageSpec("adetailer", settings={"steps": 20}, adetailer={"ad_denoising_strength": 0.5})
    extras = StageSpec("upscale", upscaler="Lanczos", scale=2.0, via="extras")
    plans = [StagePlan.of(first, None)]
    for stage in (upscale, faces, extras):
        plans.append(StagePlan.of(stage, plans[-1]))
    assert RequestShape.for_stage(first, plans[0]) == RequestShape((PassShape(20, 512 * 768, 1),))
    # an upscale through img2img samples the denoised share of its steps at twice the size
    assert RequestShape.for_stage(upscale, plans[1]) == RequestShape((PassShape(11, 1024 * 1536, 1),))
    assert RequestShape.for_stage(faces, plans[2]) == RequestShape(
        (PassShape(0, 1024 * 1536, 1),), face=PassShape(11, 1024 * 1536, 1, "face")
    )
    assert RequestShape.for_stage(extras, plans[3]) is None  # extras sample nothing: not polled
    hires = StageSpec("txt2img", settings={"width": 512, "height": 512, "steps": 10, "enable_hr": True, "hr_scale": 2})
    # a first stage is sampled at its own size, not at the size it ends with
    assert RequestShape.for_stage(hires, StagePlan.of(hires, None)).passes[0] == PassShape(10, 512 * 512, 1, handoff=True)


def test_the_sequence_uses_the_faces_counted_and_assumes_them_for_the_rest():
    main, hires, face = PassShape(10, handoff=True), PassShape(5, kind="hires"), PassShape(3, kind="face")
    shape = RequestShape((main, hires), iterations=2, face=face, faces=2)
    # the first image's three faces are known; the second's detection is still to come
    assert shape.sequence([3]) == [
        (main, False), (hires, False), (face, False), (face, False), (face, False),
        (main, False), (hires, False), (face, True), (face, False),
    ]  # fmt: skip
    assert shape.sequence([0, 1]) == [(main, False), (hires, False), (main, False), (hires, False), (face, False)]
    assert RequestShape((main,), iterations=3).sequence([]) == [(main, False)] * 3


@pytest.mark.parametrize(
    ("steps", "passes", "iterations", "expected"),
    [
        (20, 4, 2, RequestShape((PassShape(5, 1, handoff=True), PassShape(5, 1)), 2)),
        (7, 1, 3, RequestShape((PassShape(2, 1),), 3)),  # fewer passes than images: one each
        (None, 2, 1, RequestShape((PassShape(None, 1, handoff=True), PassShape(None, 1)), 1)),
        (1, 3, 1, RequestShape((PassShape(1, 1, handoff=True), PassShape(1, 1, handoff=True), PassShape(1, 1)), 1)),
    ],
)
def test_a_shape_from_counts_alone_shares_the_steps_evenly(steps, passes, iterations, expected):
    assert RequestShape.even(steps, passes, iterations) == expected


@pytest.mark.parametrize("bad", [{"passes": ()}, {"passes": (PassShape(10),), "iterations": 0}], ids=["no pass", "no iteration"])
def test_a_request_samples_at_least_one_pass_once(bad):
    with pytest.raises(ValueError, match="passes|iterations"):
        RequestShape(**bad)
