"""Progress a person can trust, folded from what the WebUI says.

A real A1111 makes this hard (reference, section 8): `/sdapi/v1/progress` is
global, idle values are stale, back-to-back jobs show no idle gap, `job_count`
is -1 for a moment and grows when ADetailer finds faces, the last step is never
reported, and the server's ETA is wild in the first step.  Here:

- `StageTracker` decides which samples are ours and folds them into a stage's
  progress (never back, within [0, 1], at most 99 % until the stage finishes),
  step x/y, ETA and stall time;
- `JobTracker` weighs the stages into the job's progress and ETA;
- `StallWatch` turns a stall into events, each once.

All of it is pure and step-able: no threads, no I/O, no clock.  Every method
that depends on time takes `now`, in monotonic seconds.

Whose job is running?  With task ids (A1111/Forge >= 1.8 with the UI) the
server says: a sample is ours while `/internal/progress` calls our task active.
The poller asks `/internal/progress` first and `/sdapi/v1/progress` only then, so
the global sample it pairs with an active task is ours; a pair that disagrees
(a step ended between the two calls) gives only the task's own figure.  Without
task ids (`--nowebui`, SD.Next, older servers) ownership is inferred from a
baseline sample taken just before the request was sent: if the server was idle,
the first busy sample afterwards is our job; if it was busy with a job stamped
T, samples stamped T are not ours until the stamp changes, the server goes idle,
or that job visibly starts over (`job_count` -1, or job and step going back: a
new job begun within the same second, since stamps have 1-second resolution).
Once ours is known, a different stamp or an idle server means it has ended.
The limitation: a job another client queued before ours is taken for ours, as
`/sdapi/v1/progress` never names the task.  And a request whose job begins in
the same second as the busy one began, and is never seen starting over, shows
no progress until it returns.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from itertools import accumulate
from typing import Any, Protocol

import attrs
from sdjobs.spec import ASSUMED_FACES, StagePlan, StageSpec, img2img_steps, multiple_of_8
from sdjobs.status import ProgressInfo, TaskProgress

__all__ = [
    "UNFINISHED_CAP",
    "JobTracker",
    "PassShape",
    "Prior",
    "RequestShape",
    "StageTracker",
    "StallEvent",
    "StallWatch",
]

#: The most a stage shows until it finishes: the server never reports its last
#: step, and a 1.0 between passes (before ADetailer) is not completion.
UNFINISHED_CAP = 0.99


def _unit(value: float | None) -> float | None:
    """`value` clamped into [0, 1]; None for None or NaN."""
    if value is None or math.isnan(value):
        return None
    return min(max(value, 0.0), 1.0)


def _seconds(value: float | None) -> float | None:
    """A server's ETA when it is usable at all: finite and not negative."""
    return value if value is not None and math.isfinite(value) and value >= 0 else None


def _position(info: ProgressInfo) -> tuple[int, int, int]:
    """Where a server job is: `(begun, job_no, sampling_step)`; it never goes back within one job.

    `begun` is 0 while `job_count` is -1 (`begin()` has just run), 1 after.
    """
    return int(info.job_count >= 0), max(info.job_no, 0), max(info.current_step or 0, 0)


@attrs.frozen
class _Reading:
    """What one sample of our job says, normalised.

    Attributes:
        fraction: The share of the request done, as the server counts it:
            `job_no/job_count` plus the step's share, no 0.01 offset.  None when
            the sample says nothing about it (the false 1.0 between passes).
        job_no: The pass being sampled.
        job_count: The passes the server knows of; None when unknown.
        step: The sampling step; None when the sample has no step detail.
        steps: The pass's sampling steps (stale while `step` is 0); None when
            the sample has no step detail.
        server_eta: The server's seconds left, when usable.
    """

    fraction: float | None
    job_no: int = 0
    job_count: int | None = None
    step: int | None = None
    steps: int | None = None
    server_eta: float | None = None

    @classmethod
    def of_info(cls, info: ProgressInfo, eta: float | None = None) -> _Reading:
        """Read a global sample; `eta`, when given, replaces its `eta_relative`."""
        count, job_no = info.job_count, max(info.job_no, 0)
        step = info.current_step if info.current_step is not None and info.current_step >= 0 else None
        steps = info.total_steps if info.total_steps is not None and info.total_steps > 0 else None
        if count < 0:  # `begin()` has run, nothing else yet
            fraction: float | None = 0.0
        elif job_no >= count > 0:
            fraction = None
        elif count == 0 or step is None or steps is None:  # no detail: take the server's figure
            fraction = _unit(info.progress)
        else:
            fraction = (job_no + min(step / steps, 1.0)) / count
        return cls(
            fraction=fraction,
            job_no=job_no,
            job_count=count if count > 0 else None,
            step=step,
            steps=steps,
            server_eta=_seconds(info.eta_relative if eta is None else eta),
        )

    @classmethod
    def of_task(cls, task: TaskProgress) -> _Reading:
        """Read our task's own figure, which has no job or step detail."""
        fraction = _unit(task.progress)
        return cls(fraction=None if fraction == 1.0 else fraction, server_eta=_seconds(task.eta))

    def agrees_with(self, task: TaskProgress) -> bool:
        """The task's figure is this sample's: both were read from one server state."""
        if task.progress is None or math.isnan(task.progress):
            return True
        mine = 1.0 if self.fraction is None else self.fraction
        return math.isclose(mine, min(task.progress, 1.0), abs_tol=1e-6)

    @property
    def started(self) -> bool:
        """Past the first step, where the server's ETA stops being wild (A1111 reads 0.01 before)."""
        return self.job_no > 0 or (self.step or 0) >= 1 or (self.fraction or 0.0) > 0.01


@attrs.define
class _GlobalOwnership:
    """Tells, without task ids, whether a global sample is our request's job.

    Attributes:
        busy: Another job ran when we sent, and has not visibly ended.
        stamp: `job_timestamp` of that other job, then of ours.
        position: The last `_position` of the other job.
        ours: Our job has been seen.
        ended: Our job has been seen and is over: nothing later is ours.
    """

    busy: bool = False
    stamp: str | None = None
    position: tuple[int, int, int] = (0, 0, 0)
    ours: bool = False
    ended: bool = False

    @classmethod
    def after(cls, baseline: ProgressInfo | None) -> _GlobalOwnership:
        """Start from a sample taken just before the request was sent (None: unknown, as idle)."""
        if baseline is None or baseline.idle:
            return cls()
        return cls(busy=True, stamp=baseline.job_timestamp, position=_position(baseline))

    def claim(self, info: ProgressInfo) -> bool:
        """Whether `info` describes our job; learns from it either way."""
        if self.ended:
            return False
        if info.idle:
            self.ended, self.busy = self.ours, False
            return False
        same = info.job_timestamp == self.stamp
        if self.ours:
            self.ended = not same
            return same
        restarted = _position(info) < self.position
        self.position = _position(info)
        if self.busy and same and not restarted:
            return False
        self.ours, self.stamp = True, info.job_timestamp
        return True


#: How a step's cost grows with the work in it (pixels × batch) until the run or a prior
#: shows it: as its square root.  Measured growth for 4× the pixels spans 1.4× (a CPU at
#: 64²) to 3.3× and more (a GPU past 1 Mpx); the square root (2×) is the middle of that
#: range in ratio terms, and a hires pass replaces it with its own rate from its second
#: timed step on.
_WORK_EXPONENT = 0.5

#: The rate follows the steps of the last this-many steps of a pass (or all, when fewer).
_RECENT_STEPS = 4

#: What is left of a phase (a step, a decode) that has run past its expected length, as a
#: share of that length: it is late, so not nearly done, but its end cannot be far.
_OVERDUE_SHARE = 0.25

#: The tail after a pass's last step, in steps of that pass, until the stage has shown one:
#: a decode costs from a sixth of a step (a CPU at 64²) to two (a GPU at 1024² and up).
_UNSEEN_TAIL_STEPS = 0.5

#: A quiet phase (a decode and save after a pass's last step, ADetailer's detection) is a
#: stall only once it has run this many times its expected length.
_QUIET_ALLOWANCE = 2.0

MAIN, HIRES, FACE, EXTRA = "main", "hires", "face", "extra"

#: What follows a pass's last step: the hand-over to hires, a decode before the next pass,
#: or the request's end (decode, save, encode the answer).
HANDOFF, BETWEEN, FINAL = "handoff", "between", "final"


def _tail_kind(shape: PassShape, *, final: bool) -> str:
    return HANDOFF if shape.handoff else FINAL if final else BETWEEN


@attrs.frozen
class PassShape:
    """One sampling pass a request is expected to run (what the server counts as one job).

    Attributes:
        steps: Its sampling steps; 0 for a pass the server counts but samples nothing in
            (ADetailer's skipped img2img); None when unknown (it will show them).
        pixels: Pixels of one image it samples.
        batch: Images it samples together.
        kind: `main`, `hires`, `face` (ADetailer's inpaint of one face) or `extra` (a
            pass the server added that no plan knew of).
        handoff: The image goes on to another pass (hires) instead of being decoded and saved.
    """

    steps: int | None
    pixels: int = 512 * 512
    batch: int = 1
    kind: str = MAIN
    handoff: bool = False

    @property
    def work(self) -> float:
        return float(max(self.pixels, 1) * max(self.batch, 1))


@attrs.frozen
class RequestShape:
    """The passes one request is expected to run, in the server's order.

    Each of `iterations` images runs `passes` (the main pass, then hires); after
    them, when ADetailer is on, a detection, then one `face` pass per face found
    (`faces` assumed until the server counts them).

    Attributes:
        passes: One iteration's sampling passes (at least one).
        iterations: `n_iter` (at least 1).
        face: ADetailer's inpaint pass for one face; None without ADetailer.
        faces: Faces assumed per image until the detection has run.
    """

    passes: tuple[PassShape, ...] = attrs.field(validator=attrs.validators.min_len(1))
    iterations: int = attrs.field(default=1, validator=attrs.validators.ge(1))
    face: PassShape | None = None
    faces: int = ASSUMED_FACES

    @classmethod
    def of(
        cls, kind: str, settings: Mapping[str, Any], adetailer: Mapping[str, Any] | None = None
    ) -> RequestShape:
        """The shape of one `txt2img`, `img2img` or `adetailer` request with these WebUI settings
        (any other kind, such as an upscale stage's, is sent as img2img).

        `adetailer` is ADetailer's tab (`ad_*` keys) when ADetailer runs on it
        (always for an `adetailer` stage); `settings` give the image size as sent.
        """
        get = settings.get
        width, height = int(get("width") or 512), int(get("height") or 512)
        steps, batch = int(get("steps") or 50), int(get("batch_size") or 1)
        size = width * height
        if kind == "adetailer":  # img2img with `skip_img2img`: nothing sampled before the faces
            passes: tuple[PassShape, ...] = (PassShape(0, size, batch),)
            adetailer = adetailer if adetailer is not None else {}
        elif kind == "txt2img" and get("enable_hr"):
            hires = _hires_pixels(width, height, settings)
            second = int(get("hr_second_pass_steps") or steps)
            passes = (PassShape(steps, size, batch, handoff=True), PassShape(second, hires, batch, HIRES))
            size = hires
        elif kind == "txt2img":
            passes = (PassShape(steps, size, batch),)
        else:
            denoising = get("denoising_strength")
            passes = (PassShape(img2img_steps(steps, 0.75 if denoising is None else denoising), size, batch),)
        face = None
        if adetailer is not None:
            ad_steps = int(adetailer.get("ad_steps") or 28) if adetailer.get("ad_use_steps") else steps
            face_steps = img2img_steps(ad_steps, adetailer.get("ad_denoising_strength", 0.4))
            face = PassShape(face_steps, size, 1, FACE)
        return cls(passes, int(get("n_iter") or 1), face)

    @classmethod
    def for_stage(cls, stage: StageSpec, plan: StagePlan) -> RequestShape | None:
        """The passes one request of `stage` samples, priced by their size; None for extras (not polled)."""
        if stage.endpoint == "extra-single-image":
            return None
        settings = dict(stage.settings)
        if stage.type != "txt2img":  # sampled at the size of its input, as the plan says
            settings["width"], settings["height"] = plan.size
        return cls.of(stage.type, settings, stage.adetailer or None)  # an upscale is an img2img request

    @classmethod
    def even(cls, steps: int | None, passes: int, iterations: int) -> RequestShape:
        """A shape from counts alone: `passes` passes of equal size sharing `steps`."""
        per_image = max(passes // iterations, 1)
        each = None if steps is None else max(round(steps / (per_image * iterations)), 1)
        shape = tuple(PassShape(each, 1, handoff=i < per_image - 1) for i in range(per_image))
        return cls(shape, iterations)

    @property
    def images(self) -> int:
        """Images the answer carries (every one encoded after the last step)."""
        return self.passes[-1].batch * self.iterations

    def sequence(self, faces: list[int]) -> list[tuple[PassShape, bool]]:
        """`(pass, detection before it)` by `job_no`, with `faces` known for the first images."""
        out: list[tuple[PassShape, bool]] = []
        for image in range(self.iterations):
            out += [(shape, False) for shape in self.passes]
            if self.face is not None:
                known = image < len(faces)
                out += [(self.face, not known and i == 0) for i in range(faces[image] if known else self.faces)]
        return out


def _hires_pixels(width: int, height: int, settings: Mapping[str, Any]) -> int:
    x, y = int(settings.get("hr_resize_x") or 0), int(settings.get("hr_resize_y") or 0)
    if x and y:
        return multiple_of_8(x) * multiple_of_8(y)
    if x:
        return multiple_of_8(x) * multiple_of_8(x * height / width)
    if y:
        return multiple_of_8(y * width / height) * multiple_of_8(y)
    scale = float(settings.get("hr_scale") or 2.0)
    return multiple_of_8(width * scale) * multiple_of_8(height * scale)


class Prior(Protocol):
    """What is known of a server before a run shows it (from its history); seconds, None: no idea.

    The tracker asks only for what the running request has not shown yet: its
    own timed steps, tails and detections always win.
    """

    def seconds_per_step(self, pixels: int, batch: int) -> float | None:
        """One sampling step at this size."""

    def warmup(self) -> float | None:
        """From a request's first sample to its first step shown, less two steps' time."""

    def tail(self, pixels: int, batch: int, images: int) -> float | None:
        """After the last step of a request's last pass (of this size) until its answer: the
        decode, then saving and encoding the `images` it carries."""

    def detection(self) -> float | None:
        """ADetailer's detection of one image's faces."""

    def lead(self, kind: str) -> float | None:
        """Before the first step of a later pass of this kind (`hires`, `face`, `main` of the next image)."""


@attrs.define
class _Learned:
    """What the stage's requests have shown so far, for the passes still to come.

    Attributes:
        rates: `(work, seconds per step)` of each timed pass, latest last (the pass
            being sampled is updated as its steps come).
        tails: `HANDOFF|BETWEEN|FINAL -> (work, seconds)` of the latest pass ended: after the last
            step showed, until the next pass began (or the request returned).
        lead: Seconds before a later pass's first step beyond its steps (conditioning,
            the hires upscale, a face's mask), the latest seen; `leads` by pass kind.
        warmup: The same for a request's first pass (the model warming up).
        detection: Seconds of ADetailer's detection of one image.
    """

    rates: list[tuple[float, float]] = attrs.field(factory=list)
    tails: dict[str, tuple[float, float]] = attrs.field(factory=dict)
    lead: float | None = None
    leads: dict[str, float] = attrs.field(factory=dict)
    warmup: float | None = None
    detection: float | None = None


@attrs.define
class _Observed:
    """What the stage's requests showed, kept for the server's history (`StageTracker.timing`).

    Attributes:
        rates: `[pixels, batch, seconds per step]` of each pass with two steps seen,
            over all its steps seen.
        warmups: Each request's seconds before its first step, beyond the steps' own time.
        leads: `[kind, seconds]` the same before each later pass's first step.
        tails: `[pixels, batch, seconds, images]` after the request's last pass's last step until
            its answer (decode, save, encode the `images` it carries).
        betweens: The same after an earlier pass until the next one began (a decode).
        handoffs: The same after a pass whose image went on to hires.
        detections: Seconds of each ADetailer detection seen.
        faces: Faces ADetailer found in each image of the requests that answered.
        requests: Seconds from each request sent to its answer.
    """

    rates: list[list[float]] = attrs.field(factory=list)
    warmups: list[float] = attrs.field(factory=list)
    leads: list[list] = attrs.field(factory=list)
    tails: list[list[float]] = attrs.field(factory=list)
    handoffs: list[list[float]] = attrs.field(factory=list)
    betweens: list[list[float]] = attrs.field(factory=list)
    detections: list[float] = attrs.field(factory=list)
    faces: list[int] = attrs.field(factory=list)
    requests: list[float] = attrs.field(factory=list)


@attrs.define
class _PassLog:
    """One pass of the request in flight as seen: when it began, its steps first seen."""

    begun: float
    marks: list[tuple[int, float]] = attrs.field(factory=list)
    steps: int | None = None
    last_at: float | None = None
    rate_index: int | None = None

    def recent_rate(self) -> float | None:
        """Seconds per step over this pass's last `_RECENT_STEPS` steps; None before two marks."""
        if len(self.marks) < 2:
            return None
        last_step, last_t = self.marks[-1]
        for step, t in reversed(self.marks[:-1]):
            if last_step - step >= _RECENT_STEPS:
                break
        return (last_t - t) / (last_step - step)

    def mean_rate(self) -> float | None:
        """Seconds per step over every step seen; None before two marks."""
        if len(self.marks) < 2:
            return None
        (first_step, first_t), (last_step, last_t) = self.marks[0], self.marks[-1]
        return (last_t - first_t) / (last_step - first_step)


def _late(expected_left: float, length: float) -> float:
    """What is left of a phase expected to end in `expected_left` (negative: late)."""
    return max(expected_left, _OVERDUE_SHARE * length, 0.0)


@attrs.define
class _Request:
    """What is known of the request in flight.

    Attributes:
        done: Its share done as shown, 0..1; never goes back.
        anchor: `(server share, shown share)` when the server last changed its
            count of passes: from there the rest of its count maps onto the rest of the bar.
        passes: The passes its share is counted against (the plan's, or more).
        job_count: The server's last `job_count` for it.
        last: The last reading with step detail.
        job_no: The pass being sampled.
        raw_steps: The last `sampling_steps` seen; 0: none.
        at: `(job_no, step)` last seen, and `at_since`, when first seen.
        server_eta: The server's ETA and when it was read, once past its start.
        signature: What the last reading showed, and `moved_at`, when that changed.
        logs: Each pass seen, by `job_no`.
        faces: Faces ADetailer found in its first images, as the server counted them.
        image_end: When the pass before a pending ADetailer detection ended.
        count: The server's latest `job_count`, as it rises.
        sent: When it was sent.
    """

    done: float = 0.0
    anchor: tuple[float, float] = (0.0, 0.0)
    passes: int | None = None
    job_count: int | None = None
    last: _Reading | None = None
    job_no: int = 0
    raw_steps: int = 0
    at: tuple[int, int] | None = None
    at_since: float = 0.0
    server_eta: tuple[float, float] | None = None
    signature: tuple | None = None
    moved_at: float = 0.0
    logs: dict[int, _PassLog] = attrs.field(factory=dict)
    faces: list[int] = attrs.field(factory=list)
    image_end: float | None = None
    sent: float = 0.0
    count: int | None = None


def _at_least(low: int):
    # pragma: no mutate block (it runs once, at import: attrs validators, before mutmut switches a mutant on)
    def check(instance: object, attribute: attrs.Attribute, value: int | None) -> None:
        if value is not None and value < low:
            raise ValueError(f"{attribute.name} must be at least {low}, got {value!r}")

    return check


@attrs.define
class StageTracker:
    """One stage's progress, folded from the samples of its requests (one per input image).

    Drive it as the runner does: `request_sent` before each request, `fold` for
    every sample while it is out, `request_returned` when it answers, `finish`
    when the stage is complete.

    Attributes:
        requests: Requests the stage sends (from the spec's plan).
        steps_per_request: Sampling steps one request is planned to run, all
            passes together; None when unknown.
        passes_per_request: Sampling passes one request is planned to run (the
            `job_count` expected: n_iter, doubled by hires, ADetailer's faces).
        images_per_request: Images one request samples one after another (n_iter;
            a batch sampled together counts as one), its passes split evenly among them.
        progress: 0..1, never goes back; at most `UNFINISHED_CAP` until `finish`.
        step: Sampling step of the current pass, as the server counts it.
        steps: Sampling steps of the current pass; None while not yet known.
        queue_position: `(i, n)` while the server holds our request in its queue.
        running: The latest sample that could tell says our job is the one running.
        shape: The passes one request runs, with their sizes (`RequestShape.of`);
            None: `passes_per_request` passes of equal size sharing `steps_per_request`.
        prior: What the server's history says (`Prior`), used only for what the
            running stage has not shown yet; None: nothing.
    """

    requests: int = attrs.field(default=1, validator=_at_least(1))
    steps_per_request: int | None = attrs.field(default=None, validator=_at_least(1))
    passes_per_request: int = attrs.field(default=1, validator=_at_least(1))
    images_per_request: int = attrs.field(default=1, validator=_at_least(1))
    shape: RequestShape | None = attrs.field(default=None, kw_only=True)
    prior: Prior | None = attrs.field(default=None, kw_only=True)

    progress: float = attrs.field(default=0.0, init=False)
    step: int | None = attrs.field(default=None, init=False)
    steps: int | None = attrs.field(default=None, init=False)
    queue_position: tuple[int, int] | None = attrs.field(default=None, init=False)
    running: bool = attrs.field(default=False, init=False)
    silent: bool = attrs.field(default=False, init=False)

    _in_flight: bool = attrs.field(default=False, init=False)
    _finished: bool = attrs.field(default=False, init=False)
    _task_mode: bool = attrs.field(default=False, init=False)
    _owner: _GlobalOwnership | None = attrs.field(default=None, init=False)
    _blind: bool = attrs.field(default=False, init=False)
    _sent_at: float = attrs.field(default=0.0, init=False)
    _durations: list[float] = attrs.field(factory=list, init=False)
    _returned: int = attrs.field(default=0, init=False)
    _request: _Request = attrs.field(factory=_Request, init=False)
    _learned: _Learned = attrs.field(factory=_Learned, init=False)
    _observed: _Observed = attrs.field(factory=_Observed, init=False)

    @property
    def _shape(self) -> RequestShape:
        if self.shape is not None:
            return self.shape
        return RequestShape.even(self.steps_per_request, self.passes_per_request, self.images_per_request)

    # -- events ---------------------------------------------------------------

    def request_sent(self, now: float, *, baseline: ProgressInfo | None, task_mode: bool) -> None:
        """A request is about to go out; only samples folded after this can be ours.

        `baseline` is a global sample taken just before (global mode; None when
        it failed, taken as idle); in task mode the server names our task.
        """
        self._in_flight, self._task_mode, self.running, self.silent = True, task_mode, False, False
        self._owner = _GlobalOwnership.after(baseline)  # asked in global mode only
        self._sent_at = now
        self._request = _Request(moved_at=now, sent=now)

    def fold(self, info: ProgressInfo | None, task: TaskProgress | None, now: float, *, silent: bool = False) -> bool:
        """Fold one sample; True if anything shown (progress, step x/y, queue) changed.

        `info` is the global sample, `task` our task's (task mode).  Either may
        be None (idle, error, timeout): a sample with nothing in it changes nothing
        shown.  ``silent``: the sample is missing because the server did not answer
        in time, which `stalled_for` counts as a stall.
        """
        if not self._in_flight:
            return False
        self.silent = silent and info is None and task is None
        shown = (self.progress, self.step, self.steps, self.queue_position, self.current_pass)
        reading = self._ours(info, task)
        if reading is not None:
            self._apply(reading, now)
        return (self.progress, self.step, self.steps, self.queue_position, self.current_pass) != shown

    def request_returned(self, now: float) -> None:
        """The request in flight answered: its share counts as done."""
        if not self._in_flight:
            return
        self._end_passes(now, next_pass=None)
        self._observe_request(now)
        self._in_flight, self.running, self.silent, self.queue_position = False, False, False, None
        self._durations.append(now - self._sent_at)
        self._returned = min(self._returned + 1, self.requests)
        self._raise_progress(self._returned / self.requests)

    def finish(self, now: float) -> None:
        """The stage is complete (a request still out counts as returned at `now`)."""
        self.request_returned(now)
        self._finished, self.progress = True, 1.0

    # -- what the outside reads -------------------------------------------------

    def timing(self) -> dict[str, list] | None:
        """What the stage's requests showed, as JSON-ready lists (`_Observed`), for the
        server's history (`sdjobs.history.CostModel`); None when no step was timed."""
        observed = self._observed
        if not observed.rates:
            return None
        return attrs.asdict(observed)

    @property
    def seconds_per_step(self) -> float | None:
        """Seconds per sampling step over the latest steps seen; None until two steps have been seen."""
        rates = self._learned.rates
        return rates[-1][2] if rates else None

    @property
    def image(self) -> tuple[int, int] | None:
        """`(k, n)`: image k (1-based) of the n the stage samples; None when n is 1.

        k counts the requests returned, then the pass of the one in flight as
        the latest sample with step detail tells (hires' second pass belongs to
        its image); it never passes n, and a request not yet sampled is at its first image.
        """
        total = self.requests * self.images_per_request
        if total == 1:
            return None
        within = 0
        if self._in_flight:
            passes_per_image = max(self.passes_per_request // self.images_per_request, 1)
            within = min(self._request.job_no // passes_per_image, self.images_per_request - 1)
        return min(self._returned * self.images_per_request + within + 1, total), total

    @property
    def current_pass(self) -> tuple[str | None, tuple[int, int] | None]:
        """`(kind, face)` of the pass the latest step shown belongs to.

        kind is `hires` (hires fix's second pass), `face` (ADetailer's inpaint
        of one face) or None (the main pass, a pass the server added that no
        plan knew of, or nothing known yet); face is `(k, n)`, face k of the n
        found in that image, once the server has counted them (a `face` pass only).
        """
        request = self._request
        if not self._in_flight or request.last is None:
            return None, None
        sequence, j = self._sequence(), request.job_no
        if j >= len(sequence) or sequence[j][0].kind not in (HIRES, FACE):
            return None, None
        if sequence[j][0].kind == HIRES:
            return HIRES, None
        first = last = j
        while first > 0 and sequence[first - 1][0].kind == FACE:
            first -= 1
        while last + 1 < len(sequence) and sequence[last + 1][0].kind == FACE:
            last += 1
        if sequence[first][1]:  # the faces of this image are not counted yet
            return FACE, None
        return FACE, (j - first + 1, last - first + 1)

    def eta(self, now: float) -> float | None:
        """Seconds left in this stage; None ("calculating...") while nothing sensible is known.

        The request in flight is priced pass by pass (`RequestShape`): the rest
        of the pass being sampled at the rate of its latest steps, then the decode
        and save after its last step (the tail, as long as the last one seen, in
        proportion to the image's pixels; one step until one is seen), then each
        pass still to come (hires, later iterations, ADetailer's detection and
        faces: one assumed per image until the server counts them; passes the
        server adds that no plan knew of, priced as the last one), each at a rate
        timed at its size or scaled from the nearest one timed.  The requests
        still to send are timed by those already done.  A `prior` fills in only
        what the stage has not shown.  The server's own figure only when its
        samples show no steps at all, and only once it is past its start
        (A1111's is wild while the model warms up).
        """
        if self._finished:
            return 0.0
        current = self._request_eta(now)
        if current is None:
            return None
        left = max(self.requests - self._returned - 1, 0)
        if self._durations:
            per_request = sum(self._durations) / len(self._durations)
        else:
            per_request = now - self._sent_at + current
        total = current + left * per_request
        return total if math.isfinite(total) else None  # a server's absurd ETA, times the requests left

    def stalled_for(self, now: float) -> float | None:
        """Seconds our running job has shown neither progress nor a new step or pass.

        A latest sample that timed out (`silent`) is a stall, counted from the last
        movement seen, whoever ran: a hung server shows nothing.  Otherwise None
        unless the latest sample shows our job running: queued behind another job
        is not a stall, and neither is a sample that failed with an answer.
        A quiet phase the run expects (the decode and save after a pass's last
        step, ADetailer's detection) counts only once it has run past
        `_QUIET_ALLOWANCE` times its expected length.
        """
        if not self.silent and (not self.running or self._blind):
            return None
        quiet = self.quiet_for(now)
        return max(quiet - _QUIET_ALLOWANCE * self._quiet_expected(), 0.0)

    def quiet_for(self, now: float) -> float:
        """Seconds since the request in flight last showed a change (or was sent)."""
        return now - self._request.moved_at

    # -- folding ----------------------------------------------------------------

    def _ours(self, info: ProgressInfo | None, task: TaskProgress | None) -> _Reading | None:
        """Our job's reading from a sample, or None; keeps `running` and the queue up to date."""
        if self._task_mode:
            self._blind = task is None
            if task is None:
                return None
            self.running = task.active
            self.queue_position = task.queue_position if task.queued else None
            if not task.active:
                return None
            if info is not None and not info.idle:
                reading = _Reading.of_info(info, eta=task.eta)
                if reading.agrees_with(task):
                    return reading
            return _Reading.of_task(task)
        self._blind = info is None
        if info is None:
            return None
        self.running = self._owner.claim(info)
        return _Reading.of_info(info) if self.running else None

    def _apply(self, reading: _Reading, now: float) -> None:
        request = self._request
        signature = (reading.job_no, reading.job_count, reading.step, reading.fraction)
        if signature != request.signature:
            request.signature, request.moved_at = signature, now
        request.logs.setdefault(request.job_no, _PassLog(begun=now))
        if reading.job_count is not None:
            self._note_count(reading.job_count, now)
        if reading.step is not None and reading.steps is not None:
            self._note_step(reading, now)
        if reading.fraction is not None:
            self._note_fraction(reading.fraction, reading.job_count)
        if reading.started:
            request.server_eta = None if reading.server_eta is None else (reading.server_eta, now)

    def _note_step(self, reading: _Reading, now: float) -> None:
        request = self._request
        step = reading.step
        if request.at is not None and (reading.job_no, step) < request.at:
            return  # a step never goes back within one job: a glitch, ignored like a lower value
        if reading.job_no != request.job_no:
            self._end_passes(now, next_pass=reading.job_no)
            request.job_no, self.steps = reading.job_no, None
            request.logs[reading.job_no] = _PassLog(begun=now)
        # `sampling_steps` keeps the last pass's value until this pass samples: trust
        # it from the first step on, or once it changes.
        fresh = step >= 1 or request.raw_steps not in (0, reading.steps)
        if fresh and reading.steps:
            self.steps = reading.steps
        request.raw_steps = reading.steps or 0
        self.step, request.last = step, reading
        if (reading.job_no, step) != request.at:
            request.at, request.at_since = (reading.job_no, step), now
            if step >= 1:
                self._note_mark(step, now)

    def _note_fraction(self, fraction: float, job_count: int | None) -> None:
        """Move the request's share forward; when the server adds passes, rescale the rest.

        A request's share is the server's fraction against the passes expected
        (the plan's, or more once the server counts more).  When that number
        changes (ADetailer adds its faces), the share from then on maps what is
        left of the server's count onto what is left of the bar, so the display
        keeps moving forward instead of going back or sticking at the top.
        """
        request = self._request
        count = job_count or request.job_count
        if count:
            passes = max(count, self.passes_per_request)
            fraction = fraction * count / passes
            if request.passes is not None and passes != request.passes:
                request.anchor = (fraction, request.done)
            request.passes, request.job_count = passes, count
        start, done_then = request.anchor
        if fraction > start:
            done = done_then + (fraction - start) * (1.0 - done_then) / (1.0 - start)
            request.done = max(request.done, done)  # never past 1, as the server's share never is
        self._raise_progress((self._returned + request.done) / self.requests)

    def _raise_progress(self, value: float) -> None:
        self.progress = max(self.progress, min(value, UNFINISHED_CAP))

    # -- ETA ------------------------------------------------------------------

    def _request_eta(self, now: float) -> float | None:
        request = self._request
        if request.last is None:
            if request.server_eta is not None:  # a server that shows no steps
                eta, at = request.server_eta
                return max(0.0, eta - (now - at))
            return None
        sequence = self._sequence()
        j = request.job_no
        if j >= len(sequence):  # every pass is done: the last one's tail runs until the answer
            if self._rate_at(sequence[-1][0]) is None:
                return None
            last = request.logs.get(len(sequence) - 1)
            tail = self._tail(sequence[-1][0], len(sequence) - 1)
            return _late((last.last_at if last and last.last_at is not None else now) + tail - now, tail)
        shape, detect = sequence[j]
        rate = self._rate_at(shape)
        if rate is None:
            return None
        log = request.logs[j]  # made when the pass was first seen
        steps = self._steps_of(shape, log)
        if detect:  # ADetailer looks for the faces of the image just made, since this pass began
            detection = self._detection()
            left = _late(log.begun + detection - now, detection) + self._pass_cost(shape, j)
        elif log.marks:
            step, seen = log.marks[-1]
            tail = self._tail(shape, j)
            if step < steps - 1:
                left = _late(seen + (steps - 1 - step) * rate - now, rate) + tail
            else:
                left = _late((log.last_at or seen) + tail - now, tail)
        elif steps == 0:
            left = 0.0
        else:
            head = self._lead(j) + min(steps, 2) * rate
            left = _late(log.begun + head - now, rate) + max(steps - 2, 0) * rate + self._tail(shape, j)
        for later, (shape, detect) in enumerate(sequence[j + 1 :], start=j + 1):
            left += (self._detection() if detect else 0.0) + self._pass_cost(shape, later)
        return left

    # -- the passes of the request in flight ---------------------------------------

    def _sequence(self) -> list[tuple[PassShape, bool]]:
        """The request's passes by `job_no`, with the faces counted so far and any passes added."""
        request, shape = self._request, self._shape
        sequence = shape.sequence(request.faces)
        if self.shape is None and self.steps_per_request and request.job_no + 1 < len(sequence):
            # counts alone: the passes still to come share the steps the passes seen left
            j = request.job_no
            seen = sum(self._steps_of(sequence[i][0], request.logs.get(i)) for i in range(j + 1))
            later = len(sequence) - j - 1
            each = max(round((self.steps_per_request - seen) / later), 1)
            sequence = sequence[: j + 1] + [(attrs.evolve(s, steps=each), d) for s, d in sequence[j + 1 :]]
        count = request.job_count or 0
        if count > len(sequence):  # the server added passes no plan knew of
            sequence += [(attrs.evolve(sequence[-1][0], kind=EXTRA, handoff=False), False)] * (count - len(sequence))
        return sequence

    def _observe_request(self, now: float) -> None:
        """Keep what the request that answered at `now` showed: its passes' rates, its faces."""
        request, observed = self._request, self._observed
        observed.requests.append(now - request.sent)
        sequence = self._sequence()
        rates = [(sequence[j][0], log.mean_rate()) for j, log in sorted(request.logs.items()) if j < len(sequence)]
        timed = [[shape.pixels, shape.batch, rate] for shape, rate in rates if rate is not None and rate > 0]
        observed.rates += timed
        steps = sum(self._steps_of(shape, request.logs.get(j)) for j, (shape, _) in enumerate(sequence))
        if not timed and request.last is not None and steps:
            # steps too quick for the polls to time two of one pass: the whole request, per step
            first = sequence[0][0]
            observed.rates.append([first.pixels, first.batch, (now - request.sent) / steps])
        face = self._shape.face
        if face is not None and request.last is not None:  # an image whose count never rose had none
            observed.faces += request.faces + [0] * max(self._shape.iterations - len(request.faces), 0)

    def _note_count(self, count: int, now: float) -> None:
        """The server's count of passes; a rise after an image is ADetailer's faces."""
        request, shape = self._request, self._shape
        before, request.count = request.count, count
        if before is None:  # first seen: more than the passes counted before ADetailer's are faces found
            before = len(shape.passes) * shape.iterations
        if count <= before or shape.face is None or len(request.faces) >= shape.iterations:
            return
        request.faces.append(count - before)
        if request.image_end is not None:
            self._learned.detection = now - request.image_end
            self._observed.detections.append(self._learned.detection)
            request.image_end = None
        request.logs[request.job_no] = _PassLog(begun=now)  # its first face begins now

    def _end_passes(self, now: float, *, next_pass: int | None) -> None:
        """The passes before `next_pass` are over at `now`: learn the tail of the one that ran last.

        `next_pass` None: the request answered.  The last pass's tail runs until the answer (the
        server saves and encodes the images after counting its last pass done), so it is learned then.
        """
        request = self._request
        sequence = self._sequence()
        if next_pass is not None and next_pass >= len(sequence):
            return
        current = min(request.job_no, len(sequence) - 1)
        log = request.logs.get(current)
        if log is not None and log.last_at is not None:
            shape = sequence[current][0]
            kind = _tail_kind(shape, final=next_pass is None)
            self._learned.tails[kind] = (shape.work, now - log.last_at)
            kept = {HANDOFF: self._observed.handoffs, FINAL: self._observed.tails, BETWEEN: self._observed.betweens}[kind]
            kept.append([shape.pixels, shape.batch, now - log.last_at] + ([self._shape.images] if kind == FINAL else []))
        if next_pass is not None and sequence[next_pass][1]:
            request.image_end = now  # ADetailer now looks for the faces of the image just made

    def _note_mark(self, step: int, now: float) -> None:
        """Step `step` (>= 1) of the current pass was first seen at `now`."""
        request, learned = self._request, self._learned
        j = request.job_no
        log = request.logs[j]  # made when the pass was first seen
        sequence = self._sequence()
        if j < len(sequence) and sequence[j][1]:  # sampling where a face was assumed: none was found
            request.faces.append(0)
            request.image_end = None
            sequence = self._sequence()
        shape = sequence[j][0] if j < len(sequence) else PassShape(None)
        log.marks.append((step, now))
        if self.steps:
            log.steps = self.steps
        if log.last_at is None and step >= self._steps_of(shape, log) - 1:
            log.last_at = now
        rate = log.recent_rate()
        if rate is None and j > 0:  # a later pass's first steps, timed from its start
            rate = (now - log.begun - self._lead(j)) / (step + 1)
        if rate is None or rate <= 0:
            return
        entry = (shape.pixels, shape.batch, rate)
        if log.rate_index is None:
            log.rate_index = len(learned.rates)
            learned.rates.append(entry)
        else:
            learned.rates[log.rate_index] = entry
        if len(log.marks) == 2:  # what came before the first steps, beyond their own time
            first_step, first_seen = log.marks[0]
            head = max(first_seen - log.begun - (first_step + 1) * rate, 0.0)
            if j == 0:
                learned.warmup = head
                self._observed.warmups.append(head)
            else:
                learned.lead = learned.leads[shape.kind] = head
                self._observed.leads.append([shape.kind, head])

    def _steps_of(self, shape: PassShape, log: _PassLog | None) -> int:
        if log is not None and log.steps:
            return log.steps
        if shape.steps is not None:
            return shape.steps
        return self.steps or 1

    def _rate_at(self, shape: PassShape) -> float | None:
        """Seconds per step of a pass of this shape: timed at its size, else scaled from the latest timed."""
        rates = self._learned.rates
        if not rates:
            return None if self.prior is None else self.prior.seconds_per_step(shape.pixels, shape.batch)
        same = [rate for pixels, batch, rate in rates if (pixels, batch) == (shape.pixels, shape.batch)]
        if same:
            return same[-1]
        pixels, batch, rate = rates[-1]
        if self.prior is not None:
            there = self.prior.seconds_per_step(pixels, batch)
            here = self.prior.seconds_per_step(shape.pixels, shape.batch)
            if there and here:
                return rate * here / there
        return rate * (shape.work / PassShape(None, pixels, batch).work) ** _WORK_EXPONENT

    def _tail(self, shape: PassShape, job_no: int) -> float:
        """After a pass's last step: the hand-over to hires, the decode before the next pass,
        or (the request's last pass) the decode, save and answer.  As seen in this stage, else
        (the answer's) as the history says, else as the other of the two was seen."""
        kind = _tail_kind(shape, final=job_no >= len(self._sequence()) - 1)
        tails = self._learned.tails
        if kind == FINAL and FINAL not in tails and self.prior is not None:
            prior = self.prior.tail(shape.pixels, shape.batch, self._shape.images)
            if prior is not None:
                return prior
        seen = tails.get(kind) or (None if kind == HANDOFF else tails.get(BETWEEN if kind == FINAL else FINAL))
        if seen is not None:
            work, seconds = seen
            return seconds * shape.work / work
        return _UNSEEN_TAIL_STEPS * (self._rate_at(shape) or 0.0)

    def _lead(self, job_no: int) -> float:
        """Seconds before a pass's first steps beyond their own: warm-up for a request's first."""
        learned = self._learned
        if job_no == 0:
            if learned.warmup is not None:
                return learned.warmup
            prior = None if self.prior is None else self.prior.warmup()
            return prior or 0.0
        sequence = self._sequence()
        kind = sequence[job_no][0].kind if job_no < len(sequence) else EXTRA
        if kind in learned.leads:
            return learned.leads[kind]
        prior = None if self.prior is None else self.prior.lead(kind)
        if prior is not None:
            return prior
        return learned.lead or 0.0

    def _detection(self) -> float:
        learned = self._learned
        if learned.detection is not None:
            return learned.detection
        prior = None if self.prior is None else self.prior.detection()
        if prior is not None:
            return prior
        return self._rate_at(self._shape.passes[0]) or 0.0

    def _pass_cost(self, shape: PassShape, job_no: int) -> float:
        steps = self._steps_of(shape, None)
        if steps == 0:
            return 0.0
        rate = self._rate_at(shape) or 0.0
        return self._lead(job_no) + steps * rate + self._tail(shape, job_no)

    def _quiet_expected(self) -> float:
        """How long the run expects the phase it is in to show nothing: a tail or a detection."""
        request = self._request
        if request.last is None:
            return 0.0
        sequence = self._sequence()
        j = request.job_no
        if j >= len(sequence):  # every pass is done: the answer's decode and save
            return self._tail(sequence[-1][0], len(sequence) - 1)
        shape, detect = sequence[j]
        if detect:
            return self._detection()
        if request.logs[j].last_at is not None:
            return self._tail(shape, j)
        return 0.0


def _costs(instance: object, attribute: attrs.Attribute, costs: tuple[float, ...]) -> None:
    if not costs or not all(math.isfinite(cost) and cost > 0 for cost in costs):
        raise ValueError(f"costs must be one positive number per stage, got {costs!r}")


@attrs.define
class JobTracker:
    """A job's progress and ETA across its stages, each weighed by its expected cost.

    Attributes:
        costs: Each stage's expected cost, in sampling steps (the plan's `cost`).
        seconds: Each stage's expected seconds from the server's history, None
            where it has none; the later stages' part of the ETA comes from here
            when every later stage has a figure.
    """

    costs: tuple[float, ...] = attrs.field(converter=tuple, validator=_costs)
    seconds: tuple[float | None, ...] | None = attrs.field(default=None, converter=attrs.converters.optional(tuple))
    _before: tuple[float, ...] = attrs.field(init=False)
    _highest: float = attrs.field(default=0.0, init=False)
    _seconds_per_step: float | None = attrs.field(default=None, init=False)

    def __attrs_post_init__(self) -> None:
        self._before = (0.0, *accumulate(self.costs))

    def job_progress(self, stage_index: int, stage_progress: float) -> float:
        """The job's progress with stage `stage_index` at `stage_progress`; never goes back.

        Exactly 1.0 once the last stage is at 1.0.
        """
        progress = _unit(stage_progress)
        if progress is not None:
            if progress == 1.0:
                done = self._before[stage_index + 1]
            else:
                done = self._before[stage_index] + self.costs[stage_index] * progress
            self._highest = max(self._highest, min(done / self._before[-1], 1.0))
        return self._highest

    def job_eta(
        self, stage_index: int, stage_eta: float | None, seconds_per_step: float | None = None
    ) -> float | None:
        """Seconds left in the job: this stage's ETA plus the later stages' costs.

        Each later stage takes what the server's history expects of it (`seconds`),
        else its cost timed at the latest observed `seconds_per_step` (a stage
        without steps, such as an upscale, keeps the one before it).
        None while the stage's ETA is unknown, or while a later stage is left
        that neither history nor a timed step prices.
        """
        if seconds_per_step is not None and math.isfinite(seconds_per_step) and seconds_per_step > 0:
            self._seconds_per_step = seconds_per_step
        if stage_eta is None:
            return None
        left = stage_eta
        for index in range(stage_index + 1, len(self.costs)):
            expected = None if self.seconds is None else self.seconds[index]
            if expected is None and self._seconds_per_step is None:
                return None
            left += expected if expected is not None else self.costs[index] * self._seconds_per_step
        return left


class StallEvent(enum.Enum):
    """What a stall asks of the runner."""

    STALLED = "stalled"  # report it (`sdjobs_job_stalled`)
    INTERRUPT = "interrupt"  # ask the server for one interrupt


@attrs.define
class StallWatch:
    """Turns `StageTracker.stalled_for` into events, each once per stall.

    A stall ends when progress is seen again (the stalled time drops); the next
    one is reported anew.  No sample ("no evidence") neither starts nor ends one.

    Attributes:
        stall_after: Seconds without progress before `STALLED`.
        interrupt_after: Seconds without progress before `INTERRUPT`; None: never.
    """

    stall_after: float = 60.0
    interrupt_after: float | None = None
    _last: float = attrs.field(default=0.0, init=False)
    _reported: bool = attrs.field(default=False, init=False)
    _interrupted: bool = attrs.field(default=False, init=False)

    def check(self, stalled_for: float | None) -> tuple[StallEvent, ...]:
        """The events due now, given how long the running job has been stalled."""
        if stalled_for is None:
            return ()
        if stalled_for < self._last:
            self._reported = self._interrupted = False
        self._last = stalled_for
        events: list[StallEvent] = []
        if stalled_for >= self.stall_after and not self._reported:
            self._reported = True
            events.append(StallEvent.STALLED)
        if self.interrupt_after is not None and stalled_for >= self.interrupt_after and not self._interrupted:
            self._interrupted = True
            events.append(StallEvent.INTERRUPT)
        return tuple(events)
