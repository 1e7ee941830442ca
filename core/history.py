"""What a server's history says of its speed, before a run shows it.

Every finished stage a worker records in the store carries what its requests
showed (`StageResult.timing`): seconds per step at each size, the warm-up before
the first step, the tail after the last (decode, save), ADetailer's detection
time and faces per image.  `ServerHistory.load` learns a `CostModel` from the
latest jobs run on one server (its URL), one per checkpoint, and:

- prices a job before it starts (`sdjobs check`, `sdjobs queue list`): each
  stage's requests, pass by pass, times the median ratio of what stages took to
  what the model priced them at (which takes in what the parts miss: the HTTP
  round trips, encoding images), plus what a job spends between its stages;
- is the `Prior` of a running stage's tracker, for what the request has not shown
  yet (its own timed steps, tails and detections always win).

Step cost is neither constant nor proportional to pixels (a launch-bound floor on
a fast GPU, faster than pixels past it), so no curve is assumed: the model
interpolates between the sizes it has seen (log-log), and beyond them follows the
slope of the nearest two.  It learns only from what it observed.
"""

from __future__ import annotations

import math
import re
import statistics
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import attrs

from sdjobs.progress import PassShape, RequestShape
from sdjobs.spec import JobSpec, StagePlan, StageSpec
from sdjobs.status import JobState, StageResult
from sdjobs.store import JobRecord, Store

__all__ = ["HISTORY_JOBS", "CostModel", "Estimate", "Planned", "ServerHistory", "plan_queue", "queue_end"]

#: The latest jobs of a server its history learns from.
HISTORY_JOBS = 50

#: How a step's (or a decode's) cost grows with the work in it beyond the one size seen:
#: as work to this power (the in-run tracker's own assumption for steps; a decode is linear).
_STEP_EXPONENT = 0.5
_TAIL_EXPONENT = 1.0

#: What a part too quick to measure counts as (seconds).
_LEAST_SECONDS = 0.001

#: The steepest and flattest growth with work the model extrapolates with.
_SLOPES = (0.0, 2.0)

#: Below this many stages learned from, or for a size outside those seen by more than
#: `_EXTRAPOLATED` times, an estimate is a range of ± `_UNSURE` of its value.  Until ADetailer
#: has looked at `_SURE_IMAGES` images here, the fewest faces it may find is none.
_SURE_STAGES = 3
_SURE_IMAGES = 3
_EXTRAPOLATED = 2.0
_UNSURE = 0.3


def _work(pixels: float, batch: float) -> float:
    return max(float(pixels), 1.0) * max(float(batch), 1.0)


def _curve(points: Iterable[tuple[float, float]]) -> tuple[tuple[float, float], ...]:
    """`(work, median value)` per distinct work, sorted by work; non-positive values left out."""
    by_work: dict[float, list[float]] = defaultdict(list)
    for work, value in points:
        if value > 0 and math.isfinite(value):
            by_work[work].append(value)
    return tuple(sorted((work, statistics.median(values)) for work, values in by_work.items()))


def _along(curve: Sequence[tuple[float, float]], work: float, exponent: float) -> float | None:
    """The curve's value at `work`: log-log between the points around it; beyond them, the
    slope of the nearest two (within `_SLOPES`; above them, at least `exponent`: past the sizes
    seen a GPU leaves its launch-bound floor, and a flat, noisy stretch must not price a pass
    four times the size like those seen), or `exponent` with only one point."""
    if not curve:
        return None
    if len(curve) == 1:
        (x, y), slope = curve[0], exponent
    else:
        i = min(max(next((k for k, (x, _) in enumerate(curve) if x >= work), len(curve)), 1), len(curve) - 1)
        (x0, y0), (x, y) = curve[i - 1], curve[i]
        slope = math.log(y / y0) / math.log(x / x0)
        if work < x0:
            (x, y), slope = (x0, y0), min(max(slope, _SLOPES[0]), _SLOPES[1])
        elif work > x:
            slope = min(max(slope, exponent), _SLOPES[1])
    return y * (work / x) ** slope


def _median(values: Iterable[float]) -> float | None:
    kept = [value for value in values if value >= 0 and math.isfinite(value)]
    return statistics.median(kept) if kept else None


@attrs.frozen
class CostModel:
    """A server's costs with one checkpoint, learned from stages' `timing` (seconds).

    Attributes:
        rates: `(work, seconds per step)`, work being pixels × batch.
        tails: `(work, seconds)` after a request's last step until its answer beyond the decode (as
            between passes): saving and encoding its images, work being the pixels of them all.
        betweens: `(work, seconds)` after an earlier pass until the next began (a decode).
        handoffs: `(work, seconds)` between a pass and its hires pass.
        warmup_s: Before a request's first step, beyond the steps' own time.
        leads: The same before a later pass's first step, by its kind (`PassShape.kind`).
        detection_s: ADetailer's detection of one image's faces.
        faces: Faces ADetailer found per image, on average.
        face_range: The fewest and the most it found in one image (the fewest: none until it
            has looked at `_SURE_IMAGES` images).
        stages: Stages it learned from.
    """

    rates: tuple[tuple[float, float], ...]
    tails: tuple[tuple[float, float], ...] = ()
    betweens: tuple[tuple[float, float], ...] = ()
    handoffs: tuple[tuple[float, float], ...] = ()
    warmup_s: float | None = None
    leads: Mapping[str, float] = attrs.field(factory=dict)
    detection_s: float | None = None
    faces: float | None = None
    face_range: tuple[int, int] | None = None
    stages: int = 0

    @classmethod
    def fit(cls, timings: Iterable[Mapping[str, Any]]) -> CostModel | None:
        """Learn from stages' `timing` (`StageTracker.timing`); None when none timed a step."""
        timings = [timing for timing in timings if timing and timing.get("rates")]
        if not timings:
            return None

        def every(key: str) -> list:
            return [entry for timing in timings for entry in timing.get(key) or ()]

        betweens = _curve((_work(p, b), s) for p, b, s in every("betweens"))

        def answer(pixels: float, batch: float, seconds: float, images: float | None = None) -> tuple[float, float]:
            """A request's tail after its last step, less the decode as between passes: what saving and
            encoding its images took, by their pixels."""
            decode = _along(betweens, _work(pixels, batch), _TAIL_EXPONENT) or 0.0
            return _work(pixels, images or batch), max(seconds - decode, _LEAST_SECONDS)

        faces = every("faces")
        leads: dict[str, list[float]] = defaultdict(list)
        for kind, seconds in every("leads"):
            leads[kind].append(seconds)
        return cls(
            rates=_curve((_work(p, b), s) for p, b, s in every("rates")),
            tails=_curve(answer(*tail) for tail in every("tails")),
            betweens=betweens,
            handoffs=_curve((_work(p, b), s) for p, b, s in every("handoffs")),
            warmup_s=_median(every("warmups")),
            leads={kind: median for kind, seconds in leads.items() if (median := _median(seconds)) is not None},
            detection_s=_median(every("detections")),
            faces=statistics.fmean(faces) if faces else None,
            face_range=((min(faces) if len(faces) >= _SURE_IMAGES else 0), max(faces)) if faces else None,
            stages=len(timings),
        )

    # -- the `Prior` of a running stage -------------------------------------------

    def seconds_per_step(self, pixels: int, batch: int) -> float | None:
        return _along(self.rates, _work(pixels, batch), _STEP_EXPONENT)

    def warmup(self) -> float | None:
        return self.warmup_s

    def tail(self, pixels: int, batch: int, images: int) -> float | None:
        answer = _along(self.tails, _work(pixels, images), _TAIL_EXPONENT)
        if answer is None:
            return None
        return answer + (_along(self.betweens, _work(pixels, batch), _TAIL_EXPONENT) or 0.0)

    def detection(self) -> float | None:
        return self.detection_s

    def lead(self, kind: str) -> float | None:
        return self.leads.get(kind)

    def assumed_faces(self) -> int | None:
        """Faces to assume per image before the detection has run: the usual number here."""
        return None if self.faces is None else round(self.faces)

    # -- before a run ------------------------------------------------------------

    def request_seconds(self, shape: RequestShape, faces: float | None = None) -> float:
        """One request of this shape: warm-up, every pass's lead, steps and tail, detection and
        faces (as many per image as usual here, unless given)."""
        if faces is None:
            faces = self.faces if self.faces is not None else shape.faces
        total = self.warmup_s or 0.0
        for image in range(shape.iterations):
            for number, sampled in enumerate(shape.passes):
                total += self._pass_seconds(sampled, first=image == number == 0)
            if shape.face is not None:
                total += (self.detection_s or 0.0) + faces * self._pass_seconds(shape.face, first=False)
        if shape.passes and shape.passes[-1].steps:  # its decode was priced as one between passes: now the answer's
            total += _along(self.tails, _work(shape.passes[-1].pixels, shape.images), _TAIL_EXPONENT) or 0.0
        return total

    def _pass_seconds(self, sampled: PassShape, *, first: bool) -> float:
        steps = sampled.steps or 0
        if not steps:
            return 0.0
        rate = self.seconds_per_step(sampled.pixels, sampled.batch) or 0.0
        after = _along(self.handoffs if sampled.handoff else self.betweens, sampled.work, _TAIL_EXPONENT)
        lead = None if first else self.lead(sampled.kind)
        return (lead or 0.0) + steps * rate + (after or 0.0)

    def covers(self, shape: RequestShape) -> bool:
        """Whether every pass's size lies within (or near) the sizes this model has timed."""
        if not self.rates:
            return False
        low, high = self.rates[0][0] / _EXTRAPOLATED, self.rates[-1][0] * _EXTRAPOLATED
        return all(low <= sampled.work <= high for sampled in shape.passes)


def _checkpoint_key(name: str | None) -> str | None:
    """A checkpoint as a job names it or as the server reports it, reduced to compare the two:
    `"sub/Model_v1.safetensors [6ce0161689]"` and `"Model_v1"` are both `"model_v1"`."""
    if not name:
        return None
    name = re.sub(r"\s*\[[0-9a-fA-F]+\]$", "", name.strip())
    name = name.replace("\\", "/").rsplit("/", 1)[-1]
    return re.sub(r"\.(safetensors|ckpt|pt|bin|gguf)$", "", name, flags=re.IGNORECASE).lower() or None


def _stage_checkpoint(spec: JobSpec, index: int, result: StageResult | None = None) -> str | None:
    """The checkpoint a stage names (its own, else the job's), else the one the server reported using."""
    stage = spec.stages[index]
    named = stage.checkpoint or spec.checkpoint
    if named is None and result is not None and result.infos:
        named = result.infos[0].get("sd_model_name")
    return _checkpoint_key(named)


@attrs.frozen
class Estimate:
    """An expected duration in seconds; `low` < `high` when the model is unsure (few samples,
    ADetailer's faces)."""

    seconds: float
    low: float
    high: float

    @property
    def sure(self) -> bool:
        return self.low == self.high

    def __add__(self, other: Estimate) -> Estimate:
        return Estimate(self.seconds + other.seconds, self.low + other.low, self.high + other.high)


@attrs.frozen
class ServerHistory:
    """What the history of one server says: a cost model per checkpoint, and how its estimates fare.

    Attributes:
        server: The server's URL (no credentials).
        models: A `CostModel` per checkpoint (`_checkpoint_key`); the key None pools them all.
        latest: The checkpoint of the latest stage: the one a job that names none will likely get.
        calibration: The median of what stages took over what the models priced them at.
        extras: `(work, seconds)` of an extras upscale request, by its output size.
        between: Seconds a job spends outside its stages (checks, folders), median.
        stages: Stages learned from (timed or not).
    """

    server: str
    models: Mapping[str | None, CostModel]
    latest: str | None = None
    calibration: float = 1.0
    extras: tuple[tuple[float, float], ...] = ()
    between: float = 0.0
    stages: int = 0

    @classmethod
    def load(cls, store: Store, server: str, *, jobs: int = HISTORY_JOBS) -> ServerHistory | None:
        """Learn from the latest `jobs` jobs that ended on `server`; None when none timed a step."""
        return cls.from_records(server, store.history(server=server, limit=jobs))

    @classmethod
    def from_records(cls, server: str, records: Sequence[Any]) -> ServerHistory | None:
        """Learn from these `JobRecord`s (latest first); None when no stage of theirs timed a step."""
        stages = [(record, result) for record in records for result in record.stages if not result.partial]
        by_checkpoint: dict[str | None, list[Mapping[str, Any]]] = defaultdict(list)
        for record, result in stages:
            if result.timing:
                by_checkpoint[_stage_checkpoint(record.spec, result.stage_index, result)].append(result.timing)
        pooled = CostModel.fit(timing for timings in by_checkpoint.values() for timing in timings)
        if pooled is None:
            return None
        models = {key: model for key, timings in by_checkpoint.items() if (model := CostModel.fit(timings))}
        models[None] = pooled
        timed = next((_stage_checkpoint(r.spec, s.stage_index, s) for r, s in stages if s.timing), None)
        history = cls(server, models, latest=timed, stages=len(stages))
        ratios, extras, between = [], [], []
        for record, result in stages:
            plan = record.spec.plan()[result.stage_index]
            if plan.endpoint == "extra-single-image":
                extras.append((_work(*plan.size), result.elapsed / max(plan.requests, 1)))
                continue
            priced = history._priced(record.spec, result.stage_index, plan, calibrated=False)
            if priced:
                ratios.append(result.elapsed / priced)
        for record in records:
            if record.state is JobState.DONE and record.attempts == 1 and record.started_at and record.ended_at:
                between.append(record.ended_at - record.started_at - sum(result.elapsed for result in record.stages))
        return attrs.evolve(
            history,
            calibration=_median(ratios) or 1.0,
            extras=_curve(extras),
            between=max(_median(between) or 0.0, 0.0),
        )

    def model_for(self, spec: JobSpec, index: int) -> CostModel:
        """The model for stage `index` of `spec`: its checkpoint's, else the latest one's, else all pooled."""
        key = _stage_checkpoint(spec, index) or self.latest
        return self.models.get(key, self.models[None])

    def _priced(
        self, spec: JobSpec, index: int, plan: StagePlan, *, calibrated: bool = True, faces: float | None = None
    ) -> float | None:
        """Seconds stage `index` should take (with `faces` per image when given); None for an extras
        upscale this server has no history of."""
        stage = spec.stages[index]
        if plan.endpoint == "extra-single-image":
            per_request = _along(self.extras, _work(*plan.size), _TAIL_EXPONENT)
            return None if per_request is None else per_request * plan.requests
        shape = RequestShape.for_stage(stage, plan)
        seconds = plan.requests * self.model_for(spec, index).request_seconds(shape, faces)
        return seconds * (self.calibration if calibrated else 1.0)

    def stage_seconds(self, spec: JobSpec, index: int) -> float | None:
        """Seconds stage `index` of `spec` should take, as this server has run such stages."""
        return self._priced(spec, index, spec.plan()[index])

    def estimate(self, spec: JobSpec, *, from_stage: int = 0) -> Estimate:
        """How long `spec` should take on this server from stage `from_stage` on (all of it by default).

        A range when the model is unsure: few stages learned from, a size far from
        those it has timed, or a stage it cannot price (an extras upscale never run
        here), ± `_UNSURE`; and ADetailer's faces, a draw per image: from the fewest to
        the most found in one image here.
        """
        plans = spec.plan()
        total = low = high = self.between if from_stage == 0 else 0.0
        sure = self.stages >= _SURE_STAGES
        for index in range(from_stage, len(plans)):
            seconds = self._priced(spec, index, plans[index])
            if seconds is None:
                sure = False
                continue
            total += seconds
            fewest = most = seconds
            if plans[index].endpoint != "extra-single-image":
                model = self.model_for(spec, index)
                shape = RequestShape.for_stage(spec.stages[index], plans[index])
                sure = sure and model.stages >= _SURE_STAGES and model.covers(shape)
                if shape.face is not None and model.face_range is not None:
                    fewest, most = (self._priced(spec, index, plans[index], faces=n) for n in model.face_range)
            low, high = low + fewest, high + most
        spread = 0.0 if sure else _UNSURE
        return Estimate(total, min(low, total) * (1 - spread), max(high, total) * (1 + spread))


@attrs.frozen
class Planned:
    """A job of the queue with its expected duration (None: unknown), start and end (Unix time;
    None: unknown, or held back: a paused job or queue), and the server it is planned on.

    Attributes:
        record: The job.
        estimate: Its expected duration on that server; None: unknown (no history there).
        start: When it should start (a running job: when it did).
        end: When it should end.
        server: The server's URL; None for a job held back or planned nowhere.
    """

    record: JobRecord
    estimate: Estimate | None
    start: float | None
    end: float | None
    server: str | None = None

    @property
    def runs(self) -> bool:
        """It runs now, or is planned to (not held back, not after jobs of unknown length)."""
        return self.start is not None or self.record.state is JobState.RUNNING


def plan_queue(
    records: Sequence[JobRecord], histories: Mapping[str, ServerHistory | None], *, now: float, paused: bool
) -> list[Planned]:
    """When each job of the queue (`Store.list`, in order) should start and end on the servers of
    `histories` (each URL with its history; None: none yet), each running one job at a time.

    Every job is priced by its own server's history.  A running job ends on the server it
    runs on (else the first) when its start plus its estimate says (at the earliest now; a
    resumed one: now plus its stages left).  Each queued job in turn goes to the server free
    first.  A held job (paused, or every queued one while the queue is paused) gets no start.
    A job of unknown duration leaves its server's free time unknown: no later job is planned
    there, and once no server's is known, no later job has a start.
    """
    free: dict[str, float | None] = dict.fromkeys(histories, now)
    first = next(iter(histories), None)
    ends: dict[str, tuple[Estimate | None, float | None, str | None]] = {}
    for record in records:
        if record.state is JobState.RUNNING:
            server = record.server if record.server in histories else first
            history = None if server is None else histories[server]
            estimate = None if history is None else history.estimate(record.spec, from_stage=record.next_stage)
            end = None if estimate is None else now + estimate.seconds
            if history is not None and record.attempts == 1 and record.started_at is not None:
                end = max(now, record.started_at + history.estimate(record.spec).seconds)
            if server is not None:
                free[server] = None if end is None or free[server] is None else max(free[server], end)
            ends[record.id] = (estimate, end, server)
    planned = []
    for record in records:
        if record.state is JobState.RUNNING:
            estimate, end, server = ends[record.id]
            planned.append(Planned(record, estimate, record.started_at, end, server))
            continue
        known = [server for server, at in free.items() if at is not None]
        if record.paused or paused or not known:
            history = None if first is None else histories[first]
            estimate = None if history is None else history.estimate(record.spec, from_stage=record.next_stage)
            planned.append(Planned(record, estimate, None, None))
            continue
        server = min(known, key=lambda url: free[url])
        history, start = histories[server], free[server]
        estimate = None if history is None else history.estimate(record.spec, from_stage=record.next_stage)
        free[server] = None if estimate is None else start + estimate.seconds
        planned.append(Planned(record, estimate, start, free[server], server))
    return planned


def queue_end(planned: Sequence[Planned]) -> float | None:
    """When the last job that runs should end; None when one's end is unknown, or none runs."""
    ends = [plan.end for plan in planned if plan.runs]
    return max(ends) if ends and None not in ends else None
