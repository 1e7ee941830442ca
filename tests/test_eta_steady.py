"""The ETA on a steady server: one whose every phase (a step at a size, a warm-up, the lead
before a later pass, a decode, ADetailer's detection) takes the same time whenever it recurs.

What a stage's first request shows, the tracker must then predict exactly: in the requests
after it the ETA at every sample is the time really left.  With a prior that knows the server,
it is exact from the first sample.  The server here is built from the documented meaning of
each phase (`Prior`, `_Learned`), not from the tracker's code.
"""

from __future__ import annotations

import attrs
import pytest

from sdjobs.progress import PassShape, RequestShape, StageTracker
from sdjobs.status import ProgressInfo
from sdjobs.testing import idle_sample, sample

BASE = 512 * 512


@attrs.frozen
class Steady:
    """A server's fixed timings.  A step's cost grows with its work (pixels x batch) more
    steeply than the tracker's guess for an unseen size, so only evidence gives it exactly."""

    step: float = 0.4  # seconds a step at 512 x 512, batch 1
    warmup: float = 1.3  # the first pass (job 0): from the first sample to its first steps, beyond their own time
    leads: dict = attrs.field(factory=lambda: {"main": 0.2, "hires": 0.9, "face": 0.6})
    handoff: float = 0.3  # after a pass whose image goes on to hires, per 512 x 512 of work
    between: float = 0.7  # a decode before another pass, likewise
    final: float = 1.1  # the decode, save and answer after the request's last step, likewise
    detection: float = 0.8  # ADetailer looking for one image's faces

    def rate(self, shape: PassShape) -> float:
        return self.step * (shape.work / BASE) ** 0.8

    def tail(self, shape: PassShape, kind: str) -> float:
        return getattr(self, kind) * shape.work / BASE

    def request(self, shape: RequestShape, start: float, faces: int = 1) -> tuple[list[tuple[float, ProgressInfo]], float]:
        """The samples one request shows, each at the moment it first shows (a step, a new pass,
        the faces counted), and when it answers.

        The server counts `len(passes) x iterations` passes; once ADetailer has looked at an
        image (after its last pass, while the count shows that pass done), the count rises by
        the faces found and the first face pass begins.
        """
        plan: list[tuple[PassShape, bool]] = []
        for _ in range(shape.iterations):
            plan += [(one, False) for one in shape.passes]
            if shape.face is not None:
                plan += [(shape.face, i == 0) for i in range(faces)]
        count = len(shape.passes) * shape.iterations
        samples: list[tuple[float, ProgressInfo]] = []
        now, before = start, None
        for job_no, (one, detect) in enumerate(plan):
            if before is not None:
                kind = "handoff" if before.handoff else "between"
                now += self.tail(before, kind)
            if detect:
                samples.append((now, sample(0, 1, job_no=job_no, job_count=count)))
                now += self.detection
                count += faces
            if not one.steps:  # ADetailer's skipped img2img: counted, nothing sampled, no time, no decode after
                samples.append((now, sample(0, 1, job_no=job_no, job_count=count)))
                before = None
                continue
            lead = self.warmup if job_no == 0 else self.leads[one.kind]
            samples.append((now, sample(0, one.steps, job_no=job_no, job_count=count)))
            begun = now
            for step in range(1, one.steps):
                now = begun + lead + (step + 1) * self.rate(one)
                samples.append((now, sample(step, one.steps, job_no=job_no, job_count=count)))
            now, before = begun + lead + one.steps * self.rate(one), one
        # the server counts the last pass done while it decodes and saves: job_no == job_count
        samples.append((now + self.tail(before, "final") / 2, sample(0, 1, job_no=len(plan), job_count=count)))
        return samples, now + self.tail(before, "final")


class KnowingPrior:
    """A history that knows the steady server exactly."""

    def __init__(self, server: Steady) -> None:
        self.server = server

    def seconds_per_step(self, pixels: int, batch: int) -> float:
        return self.server.rate(PassShape(1, pixels, batch))

    def warmup(self) -> float:
        return self.server.warmup

    def tail(self, pixels: int, batch: int, *_images: int) -> float:
        return self.server.tail(PassShape(1, pixels, batch), "final")

    def detection(self) -> float:
        return self.server.detection

    def lead(self, kind: str) -> float:
        return self.server.leads[kind]


@attrs.frozen
class Seen:
    request: int
    job_no: int
    eta: float | None
    left: float


def run_stage(tracker: StageTracker, server: Steady, shape: RequestShape) -> list[Seen]:
    """Every request of the stage, back to back: at each sample, the ETA and the time truly left."""
    timelines, start = [], 0.0
    for _ in range(tracker.requests):
        samples, end = server.request(shape, start)
        timelines.append((start, samples, end))
        start = end
    seen = []
    for index, (start, samples, end) in enumerate(timelines):
        tracker.request_sent(start, baseline=idle_sample(), task_mode=False)
        for at, answer in samples:
            tracker.fold(answer, None, at)
            seen.append(Seen(index, answer.job_no, tracker.eta(at), timelines[-1][2] - at))
        tracker.request_returned(end)
    return seen


def assert_exact(seen: list[Seen]) -> None:
    assert seen
    assert [one.eta for one in seen] == pytest.approx([one.left for one in seen], rel=1e-9, abs=1e-9)


TXT2IMG = {"steps": 6, "width": 512, "height": 768}
FACE = {"ad_steps": 8, "ad_use_steps": True, "ad_denoising_strength": 0.5}
SHAPES = {
    "txt2img": RequestShape.of("txt2img", TXT2IMG),
    "batch 2 of 2 images": RequestShape.of("txt2img", {**TXT2IMG, "batch_size": 2, "n_iter": 2}),
    "hires": RequestShape.of("txt2img", {**TXT2IMG, "enable_hr": True, "hr_scale": 1.5, "hr_second_pass_steps": 4}),
    "img2img": RequestShape.of("img2img", {**TXT2IMG, "denoising_strength": 0.5}),
    "ADetailer": RequestShape.of("txt2img", TXT2IMG, FACE),
    "hires, ADetailer, 2 images": RequestShape.of(
        "txt2img", {**TXT2IMG, "n_iter": 2, "enable_hr": True, "hr_scale": 2, "hr_second_pass_steps": 3}, FACE
    ),
    "ADetailer stage": RequestShape.of("adetailer", {"steps": 10, "width": 640, "height": 640}, FACE),
    "ADetailer stage, 2 images": RequestShape.of("adetailer", {"steps": 10, "n_iter": 2}, FACE),
    "hires of 2 steps": RequestShape.of("txt2img", {**TXT2IMG, "enable_hr": True, "hr_second_pass_steps": 2}),
}


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES)
def test_after_one_request_the_eta_is_the_time_really_left(shape):
    tracker = StageTracker(requests=3, shape=shape)
    assert_exact([one for one in run_stage(tracker, Steady(), shape) if one.request > 0])


@pytest.mark.parametrize(
    ("steps", "passes", "images"), [(12, 1, 1), (12, 2, 1), (12, 2, 2), (18, 6, 2)], ids=["one pass", "hires", "2 images", "3 passes each"]
)
def test_from_counts_alone_after_one_request_the_eta_is_the_time_really_left(steps, passes, images):
    tracker = StageTracker(requests=2, steps_per_request=steps, passes_per_request=passes, images_per_request=images)
    shape = RequestShape.even(steps, passes, images)
    assert_exact([one for one in run_stage(tracker, Steady(), shape) if one.request > 0])


@pytest.mark.parametrize("name", ["txt2img", "img2img", "ADetailer stage"])
def test_with_a_prior_that_knows_the_server_the_eta_is_exact_from_the_first_sample(name):
    server = Steady()
    tracker = StageTracker(shape=SHAPES[name], prior=KnowingPrior(server))
    assert_exact(run_stage(tracker, server, SHAPES[name]))


def test_with_a_prior_a_hires_pass_is_priced_by_the_servers_sizes_once_the_first_pass_is_timed():
    server, shape = Steady(), SHAPES["hires"]
    tracker = StageTracker(shape=shape, prior=KnowingPrior(server))
    seen = run_stage(tracker, server, shape)
    hires = next(i for i, one in enumerate(seen) if one.job_no == 1)
    assert_exact(seen[hires:])


def test_what_the_stage_showed_is_kept_for_the_history():
    server, shape = Steady(), SHAPES["hires, ADetailer, 2 images"]
    tracker = StageTracker(requests=2, shape=shape)
    run_stage(tracker, server, shape)
    timing = tracker.timing()
    main, hires = shape.passes
    one = [[main.pixels, main.batch, server.rate(main)], [hires.pixels, hires.batch, server.rate(hires)], [shape.face.pixels, 1, server.rate(shape.face)]]
    assert flat(timing["rates"]) == pytest.approx(flat(one * 4))  # two requests of two images
    assert timing["warmups"] == pytest.approx([server.warmup] * 2)
    leads = [["hires", 0.9], ["face", 0.6], ["main", 0.2], ["hires", 0.9], ["face", 0.6]]
    assert [kind for kind, _ in timing["leads"]] == [kind for kind, _ in leads] * 2
    assert [seconds for _, seconds in timing["leads"]] == pytest.approx([seconds for _, seconds in leads] * 2)
    assert timing["detections"] == pytest.approx([server.detection] * 4)
    assert timing["faces"] == [1, 1, 1, 1]
    _, end = server.request(shape, 0.0)
    assert timing["requests"] == pytest.approx([end, end])
    assert flat(tail[:3] for tail in timing["handoffs"]) == pytest.approx([main.pixels, 1, server.tail(main, "handoff")] * 4)
    betweens = [[hires.pixels, 1, server.tail(hires, "between")], [shape.face.pixels, 1, server.tail(shape.face, "between")]]
    assert flat(timing["betweens"]) == pytest.approx(flat([betweens[0], betweens[1], betweens[0]] * 2))
    assert flat(tail[:3] for tail in timing["tails"]) == pytest.approx([shape.face.pixels, 1, server.tail(shape.face, "final")] * 2)
    assert [tail[3] for tail in timing["tails"]] == [2, 2]  # the images each answer carries


def flat(rows) -> list:
    return [value for row in rows for value in row]


def test_a_phase_running_late_is_expected_to_end_soon_not_now():
    """Past its expected end a phase is late, not done: a quarter of its length is left."""
    server, shape = Steady(), SHAPES["txt2img"]
    tail = server.tail(shape.passes[0], "final")
    samples, end = server.request(shape, 0.0)
    last_step = end + samples[-2][0]  # the second request's last step shows then; its answer comes `tail` later
    tracker = StageTracker(requests=2, shape=shape)
    run_stage_until(tracker, server, shape, last_step)
    assert tracker.eta(last_step + tail / 2) == pytest.approx(tail / 2)
    assert tracker.eta(last_step + 2 * tail) == pytest.approx(tail / 4)


def run_stage_until(tracker: StageTracker, server: Steady, shape: RequestShape, until: float) -> None:
    """The stage's requests back to back, folded up to `until` (the request then in flight stays out)."""
    start = 0.0
    while True:
        samples, end = server.request(shape, start)
        tracker.request_sent(start, baseline=idle_sample(), task_mode=False)
        for at, answer in samples:
            if at > until:
                return
            tracker.fold(answer, None, at)
        if end > until:
            return
        tracker.request_returned(end)
        start = end


def test_steps_too_quick_to_time_are_kept_as_the_whole_request_per_step():
    shape = RequestShape.of("txt2img", TXT2IMG)
    tracker = StageTracker(shape=shape)
    tracker.request_sent(0.0, baseline=idle_sample(), task_mode=False)
    tracker.fold(sample(3, 6), None, 1.0)  # one step seen: no rate
    tracker.request_returned(3.0)
    pass_ = shape.passes[0]
    assert tracker.timing()["rates"] == [[pass_.pixels, pass_.batch, 3.0 / 6]]
    assert tracker.timing()["faces"] == []  # no ADetailer: no faces counted


def test_an_image_adetailer_found_no_face_in_counts_none():
    shape = RequestShape.of("txt2img", TXT2IMG, FACE)
    tracker = StageTracker(shape=shape)
    tracker.request_sent(0.0, baseline=idle_sample(), task_mode=False)
    for step in range(1, 6):
        tracker.fold(sample(step, 6), None, float(step))
    tracker.fold(sample(0, 1, job_no=1, job_count=1), None, 6.0)  # detection; the count never rises
    tracker.request_returned(7.0)
    assert tracker.timing()["faces"] == [0]


@pytest.mark.parametrize("batch", [1, 2])
def test_before_the_run_shows_them_a_hires_pass_and_the_decodes_are_guessed_from_the_main_pass(batch):
    """The guesses: a pass of another size costs the main pass's rate times the square root of its
    work; a decode not yet seen, half a step of its pass; a later pass's lead, none."""
    server = Steady()
    shape = RequestShape.of("txt2img", {**TXT2IMG, "enable_hr": True, "hr_scale": 1.5, "hr_second_pass_steps": 4, "batch_size": batch})
    main, hires = shape.passes
    tracker = StageTracker(shape=shape)
    samples, _ = server.request(shape, 0.0)
    tracker.request_sent(0.0, baseline=idle_sample(), task_mode=False)
    for at, answer in samples[:3]:  # the first sample, then steps 1 and 2 of the main pass
        tracker.fold(answer, None, at)
    rate = server.rate(main)
    hires_rate = rate * (hires.work / main.work) ** 0.5
    left = (main.steps - 1 - 2) * rate + rate / 2 + hires.steps * hires_rate + hires_rate / 2
    assert tracker.eta(samples[2][0]) == pytest.approx(left)
