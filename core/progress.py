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
from itertools import accumulate

import attrs

from sdjobs.status import ProgressInfo, TaskProgress

__all__ = ["UNFINISHED_CAP", "JobTracker", "StageTracker", "StallEvent", "StallWatch"]

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
        steps = info.total_steps if info.total_steps and info.total_steps > 0 else None
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

    busy: bool
    stamp: str | None = None
    position: tuple[int, int, int] = (0, 0, 0)
    ours: bool = False
    ended: bool = False

    @classmethod
    def after(cls, baseline: ProgressInfo | None) -> _GlobalOwnership:
        """Start from a sample taken just before the request was sent (None: unknown, as idle)."""
        if baseline is None or baseline.idle:
            return cls(busy=False)
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


@attrs.define
class _StepRate:
    """Seconds per sampling step, timed from one seen step to a later one of the same pass.

    The time to a pass's first step is never counted: it hides the model's
    warm-up (3-4 s against 1.5 s a step on the recorded server).
    """

    _mark: tuple[int, int, float] | None = None
    _seconds: float = 0.0
    _steps: int = 0

    def observe(self, job_no: int, step: int, now: float) -> None:
        """`step` (>= 1) of pass `job_no` was first seen at `now`."""
        if self._mark is not None and self._mark[0] == job_no and step > self._mark[1]:
            self._seconds += now - self._mark[2]
            self._steps += step - self._mark[1]
        self._mark = (job_no, step, now)

    def restart(self) -> None:
        """A new request: its first step is timed from nothing before it."""
        self._mark = None

    @property
    def per_step(self) -> float | None:
        """None until two steps have been seen."""
        return self._seconds / self._steps if self._steps else None


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
        steps_before: Steps run in the passes before this one.
        at: `(job_no, step)` last seen, and `at_since`, when first seen.
        server_eta: The server's ETA and when it was read, once past its start.
        signature: What the last reading showed, and `moved_at`, when that changed.
    """

    done: float = 0.0
    anchor: tuple[float, float] = (0.0, 0.0)
    passes: int | None = None
    job_count: int | None = None
    last: _Reading | None = None
    job_no: int = 0
    raw_steps: int = 0
    steps_before: int = 0
    at: tuple[int, int] | None = None
    at_since: float = 0.0
    server_eta: tuple[float, float] | None = None
    signature: tuple | None = None
    moved_at: float = 0.0


def _at_least(low: int):
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
    """

    requests: int = attrs.field(default=1, validator=_at_least(1))
    steps_per_request: int | None = attrs.field(default=None, validator=_at_least(1))
    passes_per_request: int = attrs.field(default=1, validator=_at_least(1))
    images_per_request: int = attrs.field(default=1, validator=_at_least(1))

    progress: float = attrs.field(default=0.0, init=False)
    step: int | None = attrs.field(default=None, init=False)
    steps: int | None = attrs.field(default=None, init=False)
    queue_position: tuple[int, int] | None = attrs.field(default=None, init=False)
    running: bool = attrs.field(default=False, init=False)

    _in_flight: bool = attrs.field(default=False, init=False)
    _finished: bool = attrs.field(default=False, init=False)
    _task_mode: bool = attrs.field(default=False, init=False)
    _owner: _GlobalOwnership | None = attrs.field(default=None, init=False)
    _blind: bool = attrs.field(default=False, init=False)
    _sent_at: float = attrs.field(default=0.0, init=False)
    _durations: list[float] = attrs.field(factory=list, init=False)
    _returned: int = attrs.field(default=0, init=False)
    _request: _Request = attrs.field(factory=_Request, init=False)
    _pass_steps: int | None = attrs.field(default=None, init=False)
    _rate: _StepRate = attrs.field(factory=_StepRate, init=False)

    # -- events ---------------------------------------------------------------

    def request_sent(self, now: float, *, baseline: ProgressInfo | None, task_mode: bool) -> None:
        """A request is about to go out; only samples folded after this can be ours.

        `baseline` is a global sample taken just before (global mode; None when
        it failed, taken as idle); in task mode the server names our task.
        """
        self._in_flight, self._task_mode, self.running = True, task_mode, False
        self._owner = None if task_mode else _GlobalOwnership.after(baseline)
        self._sent_at = now
        self._request = _Request(moved_at=now)
        self._rate.restart()

    def fold(self, info: ProgressInfo | None, task: TaskProgress | None, now: float) -> bool:
        """Fold one sample; True if anything shown (progress, step x/y, queue) changed.

        `info` is the global sample, `task` our task's (task mode).  Either may
        be None (idle, error, timeout): a sample with nothing in it changes nothing.
        """
        if not self._in_flight:
            return False
        shown = (self.progress, self.step, self.steps, self.queue_position)
        reading = self._ours(info, task)
        if reading is not None:
            self._apply(reading, now)
        return (self.progress, self.step, self.steps, self.queue_position) != shown

    def request_returned(self, now: float) -> None:
        """The request in flight answered: its share counts as done."""
        if not self._in_flight:
            return
        self._in_flight, self.running, self.queue_position = False, False, None
        self._durations.append(now - self._sent_at)
        self._returned = min(self._returned + 1, self.requests)
        self._raise_progress(self._returned / self.requests)

    def finish(self, now: float) -> None:
        """The stage is complete (a request still out counts as returned at `now`)."""
        self.request_returned(now)
        self._finished, self.progress = True, 1.0

    # -- what the outside reads -------------------------------------------------

    @property
    def seconds_per_step(self) -> float | None:
        """Observed seconds per sampling step; None until two steps have been seen."""
        return self._rate.per_step

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

    def eta(self, now: float) -> float | None:
        """Seconds left in this stage; None ("calculating...") while nothing sensible is known.

        From the observed step rate once two steps have been seen, counting the
        passes still to come (rest of this pass, hires pass, later iterations,
        ADetailer's faces) and the requests still to send.  The server's own
        figure only when its samples show no steps at all, and only once it is
        past its start (A1111's is wild while the model warms up).
        """
        if self._finished:
            return 0.0
        current = self._request_eta(now)
        if current is None:
            return None
        left = self.requests - self._returned - 1
        if left <= 0:
            return current
        if self._durations:
            per_request = sum(self._durations) / len(self._durations)
        else:
            per_request = now - self._sent_at + current
        return current + left * per_request

    def stalled_for(self, now: float) -> float | None:
        """Seconds our running job has shown neither progress nor a new step or pass.

        None unless the latest sample shows our job running: queued behind
        another job is not a stall, and neither is a poller that gets no answer.
        """
        if not self.running or self._blind:
            return None
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
            if reading.job_no > request.job_no:
                request.steps_before += (reading.job_no - request.job_no) * (self.steps or 0)
            request.job_no, self.steps = reading.job_no, None
        # `sampling_steps` keeps the last pass's value until this pass samples: trust
        # it from the first step on, or once it changes.
        fresh = step >= 1 or request.raw_steps not in (0, reading.steps)
        if fresh and reading.steps:
            self.steps = self._pass_steps = reading.steps
        request.raw_steps = reading.steps or 0
        self.step, request.last = step, reading
        if (reading.job_no, step) != request.at:
            request.at, request.at_since = (reading.job_no, step), now
            if step >= 1:
                self._rate.observe(reading.job_no, step, now)

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
            request.done = max(request.done, min(done, 1.0))
        self._raise_progress((self._returned + request.done) / self.requests)

    def _raise_progress(self, value: float) -> None:
        self.progress = max(self.progress, min(value, UNFINISHED_CAP))

    # -- ETA ------------------------------------------------------------------

    def _request_eta(self, now: float) -> float | None:
        request = self._request
        rate, steps_left = self._rate.per_step, self._steps_left()
        if rate is not None and steps_left is not None:
            return max(0.0, request.at_since + steps_left * rate - now)
        if request.last is None and request.server_eta is not None:  # a server that shows no steps
            eta, at = request.server_eta
            return max(0.0, eta - (now - at))
        return None

    def _steps_left(self) -> int | None:
        """Sampling steps left in the request in flight, as far as the last reading tells."""
        request = self._request
        reading, pass_steps = request.last, self.steps or self._pass_steps
        if reading is None or pass_steps is None:
            return None
        in_pass = reading.job_count is None or reading.job_no < reading.job_count
        current = max(pass_steps - 1 - reading.step, 0) if in_pass else 0  # step N-1 ends a pass
        following = reading.job_no + 1 if in_pass else reading.job_no
        planned = max(self.passes_per_request - following, 0)
        added = max((reading.job_count or 0) - max(self.passes_per_request, following), 0)
        if planned and self.steps_per_request:
            run = request.steps_before + (pass_steps if in_pass else 0)
            planned_steps = max(self.steps_per_request - run, 0)
        else:
            planned_steps = planned * pass_steps
        return current + planned_steps + added * pass_steps


def _costs(instance: object, attribute: attrs.Attribute, costs: tuple[float, ...]) -> None:
    if not costs or not all(math.isfinite(cost) and cost > 0 for cost in costs):
        raise ValueError(f"costs must be one positive number per stage, got {costs!r}")


@attrs.define
class JobTracker:
    """A job's progress and ETA across its stages, each weighed by its expected cost.

    Attributes:
        costs: Each stage's expected cost, in sampling steps (the plan's `cost`).
    """

    costs: tuple[float, ...] = attrs.field(converter=tuple, validator=_costs)
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

        Later stages are timed at the latest observed `seconds_per_step` (a
        stage without steps, such as an upscale, keeps the one before it).
        None while the stage's ETA is unknown, or while later stages are left
        and no step has been timed yet.
        """
        if seconds_per_step is not None and math.isfinite(seconds_per_step) and seconds_per_step > 0:
            self._seconds_per_step = seconds_per_step
        if stage_eta is None:
            return None
        later = self._before[-1] - self._before[stage_index + 1]
        if not later:
            return stage_eta
        if self._seconds_per_step is None:
            return None
        return stage_eta + later * self._seconds_per_step


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
