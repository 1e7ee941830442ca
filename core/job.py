"""`Job`: one job's identity and live state, and the step-able core that drives it.

A `Job` never waits on the network and never starts a thread.  The runner feeds
it events, one at a time and on one thread: `begin`, `sample`, `probed`,
`returned`, `failed`, `cancel` and `tick`.  What the job needs done in the
world it asks of its `WebUIPort`, and the answers come back as events: send a
request (`returned` or `failed`), take one progress sample (`probed`),
interrupt.  Tests drive the same core with a fake port and a fake clock, so
every interleaving of events is a test case.
"""

from __future__ import annotations

import time
from collections.abc import Callable
import enum
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import attrs

from sdjobs.client import GenerationResult

from sdjobs.hooks import Hooks, PluginError
from sdjobs.machine import JobMachine
from sdjobs.outputs import JobFolder, read_parameters
from sdjobs.payloads import adetailer_applied, build_payload
from sdjobs.polling import DEFAULT_POLL_INTERVAL, PollRequest, Poller, Report
from sdjobs.progress import JobTracker, StageTracker, StallEvent, StallWatch
from sdjobs.status import CancelMode, JobState, ProgressInfo, RuntimeStatus, StageResult, TaskProgress

if TYPE_CHECKING:
    from sdjobs.client import WebUIClient
    from sdjobs.spec import JobSpec, StagePlan

log = logging.getLogger(__name__)


class WebUIPort(Protocol):
    """What a job asks of the world; the runner's port does it over HTTP."""

    client: WebUIClient
    task_tracking: bool
    report: Report

    def probe(self, task_id: str | None) -> None:
        """Take one progress sample, of our task when ``task_id`` is given, else global;
        it comes back as `Job.probed`.

        Asked before a request is sent in global mode (the baseline: what ran
        before ours) and when a cancel must know whether our request is running.
        """

    def send(self, endpoint: str, payload: dict[str, Any], task_id: str | None) -> None:
        """Start a generation request; its answer comes back as `Job.returned`/`Job.failed`."""

    def interrupt(self) -> None:
        """Ask the server to interrupt what it is running."""


@attrs.frozen
class JobSettings:
    """How a job runs, beyond its spec.

    Attributes:
        poll_interval: Seconds between progress samples.
        stall_after: Seconds without progress before `sdjobs_job_stalled`.
        stall_interrupt_after: Seconds without progress before one interrupt; None: never.
        cancel_grace: Seconds to wait for an interrupted request to return.
        probe_timeout: Seconds to wait for a probe's sample before going on without it.
        preview: Ask for live previews.
    """

    poll_interval: float = DEFAULT_POLL_INTERVAL
    stall_after: float = 60.0
    stall_interrupt_after: float | None = None
    cancel_grace: float = 30.0
    probe_timeout: float = 1.0
    preview: bool = False


class _Wait(enum.Enum):
    """What a job in flight waits for, besides the request's answer."""

    BASELINE = "a baseline sample before sending"
    OWNER = "a sample saying whether our request runs, to cancel it"
    ANSWER = "the interrupted request's answer"


@attrs.define(eq=False)
class Job:
    """One job: its spec, its machine, its progress, its results.

    Attributes:
        spec: The frozen job description.
        job_id: The id, also the name of its output folder.
        folder: Where its images and manifest go.
        hooks: The hooks to fire.
        port: The way out to the WebUI.
        settings: Poll interval, stall and cancel limits.
        clock: Monotonic seconds (a fake one in tests).
        wall_clock: Unix time, for `started_at` stamps.
        outcome: How the job ended; None until it has.
        error: Why it failed, when it did.
        results: Every stage that ended, cut-short ones too.
    """

    spec: JobSpec
    job_id: str
    folder: JobFolder
    hooks: Hooks
    port: WebUIPort
    settings: JobSettings = JobSettings()
    clock: Callable[[], float] = time.monotonic
    wall_clock: Callable[[], float] = time.time

    outcome: JobState | None = attrs.field(default=None, init=False)
    error: str | None = attrs.field(default=None, init=False)
    results: list[StageResult] = attrs.field(factory=list, init=False)

    _machine: JobMachine = attrs.field(init=False)
    _plan: tuple[StagePlan, ...] = attrs.field(init=False)
    _jobs: JobTracker = attrs.field(init=False)
    _status: RuntimeStatus = attrs.field(init=False)
    # the running stage
    _stage: StageTracker | None = attrs.field(default=None, init=False)
    _stalls: StallWatch | None = attrs.field(default=None, init=False)
    _inputs: list[bytes | None] = attrs.field(factory=list, init=False)
    _outputs: list[bytes] = attrs.field(factory=list, init=False)
    _paths: list[Path] = attrs.field(factory=list, init=False)
    _infos: list[dict[str, Any]] = attrs.field(factory=list, init=False)
    _seeds: list[int] = attrs.field(factory=list, init=False)
    _stage_started: float = attrs.field(default=0.0, init=False)
    _stage_started_wall: float = attrs.field(default=0.0, init=False)
    _preview: str | None = attrs.field(default=None, init=False)
    # the request of the running stage
    _input: bytes | None = attrs.field(default=None, init=False)
    _pending: tuple[str, dict[str, Any], str | None] | None = attrs.field(default=None, init=False)
    _task_id: str | None = attrs.field(default=None, init=False)
    _in_flight: bool = attrs.field(default=False, init=False)
    _poller: Poller | None = attrs.field(default=None, init=False)
    _wait: _Wait | None = attrs.field(default=None, init=False)
    _deadline: float | None = attrs.field(default=None, init=False)
    # why the request is being cut short
    _cancel: CancelMode | None = attrs.field(default=None, init=False)
    _stall_interrupted: bool = attrs.field(default=False, init=False)

    def __attrs_post_init__(self) -> None:
        self._machine = JobMachine([stage.type for stage in self.spec.stages])
        self._plan = self.spec.plan()
        self._jobs = JobTracker(costs=tuple(stage.cost for stage in self._plan))
        self._status = RuntimeStatus(
            job_id=self.job_id,
            name=self.spec.name,
            stage=self.spec.stages[0].type,
            stage_index=0,
            stage_count=len(self.spec.stages),
            seed=self.spec.seed,
        )

    # -- what the outside can read -------------------------------------------

    @property
    def machine(self) -> JobMachine:
        """The job's state machine (read its ``state``; only the job fires it)."""
        return self._machine

    @property
    def status(self) -> RuntimeStatus:
        """The latest snapshot, as last handed to hooks."""
        return self._status

    @property
    def finished(self) -> bool:
        """The job has ended: no event changes it any more, no hook fires for it."""
        return self._machine.terminal

    @property
    def awaiting_answer(self) -> bool:
        """A request is out and the job waits for its answer."""
        return self._in_flight

    @property
    def awaiting_probe(self) -> bool:
        """The job asked its port for a sample and waits for `probed`."""
        return self._wait in (_Wait.BASELINE, _Wait.OWNER)

    @property
    def next_deadline(self) -> float | None:
        """When `tick` next has something to do besides stalls (monotonic seconds), if ever."""
        return self._deadline

    # -- events ---------------------------------------------------------------

    def begin(self) -> None:
        """Leave the queue and start the first stage."""
        self._leave_queue()
        self._machine.fire("start")
        self._start_stage(0, inputs=[None])

    def begin_failed(self, error: str) -> None:
        """Leave the queue and fail at once, before any request (preflight found a problem)."""
        self._leave_queue()
        self._end(JobState.FAILED, error)

    def sample(self, info: ProgressInfo | None, task: TaskProgress | None) -> None:
        """Fold a progress sample from the poller; fire `sdjobs_progress` on a change."""
        if self.finished or not self._in_flight or self._cancel is CancelMode.NOW:
            return
        now = self.clock()
        changed = self._stage.fold(info, task, now)
        if self.settings.preview and self._stage.running:
            preview = (task and task.live_preview) or (info and info.current_image)
            preview = preview and preview.rpartition("base64,")[2]  # a data: URI from /internal
            if preview and preview != self._preview:
                self._preview, changed = preview, True
        if changed:
            self._show_progress(now)

    def probed(self, info: ProgressInfo | None, task: TaskProgress | None) -> None:
        """The sample the job asked for came back."""
        if self.finished or not self.awaiting_probe:
            return
        if self._wait is _Wait.BASELINE:
            self._send(baseline=info)
        else:
            self._stage.fold(info, task, self.clock())
            if self._stage.running:
                self._stop_ours()
            else:
                self._abandon()

    def returned(self, result: GenerationResult) -> None:
        """The request in flight answered (200): keep its images, go on."""
        if self.finished or not self._in_flight:
            return
        now = self.clock()
        self._end_request()
        self._keep(result)
        self._stage.request_returned(now)
        if self._cancel is CancelMode.NOW:
            self._cut_short(JobState.CANCELLED)
        elif self._stall_interrupted:
            self._cut_short(JobState.FAILED, "stalled; interrupted")
        elif problem := self._check(result):
            self._cut_short(JobState.FAILED, problem)
        elif self._inputs:
            self._send_next()
        else:
            self._stage.finish(now)
            self._finish_stage(partial=False)
            self._next_stage()

    def failed(self, error: BaseException) -> None:
        """The request in flight failed (no answer, or an error status)."""
        if self.finished or not self._in_flight:
            return
        self._end_request()
        if self._cancel is CancelMode.NOW:
            self._cut_short(JobState.CANCELLED)  # the interrupted request broke on its way back
        else:
            self._cut_short(JobState.FAILED, str(error))

    def abort(self, error: BaseException) -> None:
        """Something went wrong outside the WebUI (a disk, a bug): fail, naming it."""
        if self.finished:
            return
        self._end_request()
        message = f"{type(error).__name__}: {error}"
        if self._machine.stage_index is None:
            self._end(JobState.FAILED, message)
        else:
            self._cut_short(JobState.FAILED, message)

    def cancel(self, mode: CancelMode = CancelMode.NOW) -> None:
        """Ask the job to stop: now (interrupt, keep partial images) or after this stage."""
        if self.finished:
            return
        if mode is CancelMode.AFTER_JOB:
            return  # the job runs to its end; the runner starts no further one
        if self._machine.state == "queued":
            self._end(JobState.CANCELLED)
        elif mode is CancelMode.AFTER_STAGE:
            self._cancel = self._cancel or mode
        elif self._cancel is not CancelMode.NOW:
            self._cancel = CancelMode.NOW
            self._stop_polling()
            if not self._in_flight:  # nothing sent yet (waiting for a baseline, or between requests)
                self._cut_short(JobState.CANCELLED)
            elif self._stage.running:
                self._stop_ours()
            else:  # a sample must say whether it is ours before we interrupt anything
                self._await(_Wait.OWNER, self.settings.probe_timeout)
                self.port.probe(self._task_id)

    def tick(self) -> None:
        """Time passed: report a stall, or stop waiting for a probe or an answer that is late."""
        if self.finished:
            return
        now = self.clock()
        if self._deadline is not None and now >= self._deadline:
            late, self._wait, self._deadline = self._wait, None, None
            if late is _Wait.BASELINE:
                self._send(baseline=None)
            elif late is _Wait.OWNER:
                self._abandon()
            elif self._cancel is CancelMode.NOW:
                self._end_request()
                self._cut_short(JobState.CANCELLED)
            else:
                self._end_request()
                self._cut_short(JobState.FAILED, "stalled; interrupted, and the server never answered")
            return
        if not self._in_flight or self._wait is not None:
            return
        stalled = self._stage.stalled_for(now)
        for event in self._stalls.check(stalled):
            if event is StallEvent.STALLED:
                self.hooks.job_stalled(self._status, stalled)
            else:
                self._stall_interrupted = True
                self.port.interrupt()
                self._await(_Wait.ANSWER, self.settings.cancel_grace)

    # -- stages ---------------------------------------------------------------

    def _start_stage(self, index: int, inputs: list[bytes | None]) -> None:
        plan = self._plan[index]
        self._stage = StageTracker(
            requests=len(inputs),
            steps_per_request=plan.steps or None,
            passes_per_request=plan.passes,
            images_per_request=plan.iterations,
        )
        self._stalls = StallWatch(self.settings.stall_after, self.settings.stall_interrupt_after)
        self._inputs = list(inputs)
        self._outputs, self._paths, self._infos, self._seeds = [], [], [], []
        self._stage_started = self.clock()
        self._stage_started_wall = self.wall_clock()
        self._preview = None
        self._status = attrs.evolve(
            self._status,
            stage=self.spec.stages[index].type,
            stage_index=index,
            progress=0.0,
            image=None,
            images=None,
            step=None,
            steps=None,
            eta=None,
            queue_position=None,
            preview=None,
        )
        self.hooks.stage_started(self._status, self.spec.stages[index])
        self._send_next()

    def _send_next(self) -> None:
        """Build the next request of the stage; send it, after a baseline sample in global mode."""
        index = self._machine.stage_index
        stage = self.spec.stages[index]
        number = self._stage.requests - len(self._inputs)
        self._input = self._inputs.pop(0)
        payload = build_payload(self.spec, index, self._input)
        try:
            self.hooks.amend_payload(payload, stage, self._status)
        except PluginError as exc:
            self._cut_short(JobState.FAILED, str(exc))
            return
        tracked = stage.endpoint != "extra-single-image"  # extras read ≈1.0 throughout
        self._task_id = None
        if tracked and self.port.task_tracking:
            self._task_id = f"sdjobs-{self.job_id}-{index + 1}-{number + 1}"
        self._pending = (stage.endpoint, payload, self._task_id)
        if tracked and self._task_id is None:
            self._await(_Wait.BASELINE, self.settings.probe_timeout)
            self.port.probe(None)
        else:
            self._send(baseline=None)

    def _send(self, baseline: ProgressInfo | None) -> None:
        """Send the pending request, with a poller following it."""
        self._wait = self._deadline = None
        endpoint, payload, task_id = self._pending
        self._pending = None
        self._stage.request_sent(self.clock(), baseline=baseline, task_mode=task_id is not None)
        if endpoint != "extra-single-image":
            request = PollRequest(
                client=self.port.client,
                interval=self.settings.poll_interval,
                report=self.port.report,
                task_id=task_id,
                preview=self.settings.preview,
            )
            try:
                self._poller = self.hooks.start_polling(request)
            except PluginError as exc:
                self._cut_short(JobState.FAILED, str(exc))
                return
        self._in_flight = True
        self.port.send(endpoint, payload, task_id)

    def _keep(self, result: GenerationResult) -> None:
        """Write the answer's images, each with its seed and the prompt it came from."""
        index = self._machine.stage_index
        stage = self.spec.stages[index]
        first = int(result.info.get("index_of_first_image", 0) or 0)
        fallback = read_parameters(self._input) if self._input else None
        seeds = result.seeds
        for i, png in enumerate(result.images[first:]):
            seed = seeds[i] if i < len(seeds) else self.spec.seed
            self._paths.append(
                self.folder.write_image(
                    index,
                    stage.type,
                    len(self._paths) + 1,
                    png,
                    provenance={"seed": seed},
                    parameters_fallback=fallback,
                )
            )
            self._outputs.append(png)
        if result.info:
            self._infos.append(dict(result.info))
        self._seeds.extend(seeds)

    def _check(self, result: GenerationResult) -> str | None:
        """What is wrong with an answer that came back 200, if anything."""
        index = self._machine.stage_index
        if self.spec.stages[index].type == "adetailer" and not any(
            adetailer_applied(text) for text in result.infotexts
        ):
            return "ADetailer did not run: its settings are not in the infotext (is the extension installed and enabled?)"
        if index == 0 and result.seeds and result.seeds[0] != self.spec.seed:
            return f"the server used seed {result.seeds[0]}, not the job's seed {self.spec.seed}"
        return None

    def _finish_stage(self, *, partial: bool) -> None:
        index = self._machine.stage_index
        result = StageResult(
            stage=self.spec.stages[index].type,
            stage_index=index,
            images=tuple(self._paths),
            infos=tuple(self._infos),
            seeds=tuple(self._seeds),
            started_at=self._stage_started_wall,
            elapsed=self.clock() - self._stage_started,
            partial=partial,
        )
        self.results.append(result)
        if not partial:
            self._status = attrs.evolve(
                self._status,
                progress=1.0,
                job_progress=self._jobs.job_progress(index, 1.0),
                eta=0.0,
                job_eta=self._jobs.job_eta(index, 0.0),
            )
        self.hooks.stage_finished(self._status, result)

    def _next_stage(self) -> None:
        index = self._machine.stage_index
        last = index == len(self.spec.stages) - 1
        if self._cancel is CancelMode.AFTER_STAGE and not last:
            self._end(JobState.CANCELLED)
            return
        self._machine.fire("advance")
        if last:
            self._end(JobState.DONE)
        else:
            self._start_stage(index + 1, inputs=list(self._outputs) or [None])

    # -- cutting short ----------------------------------------------------------

    def _stop_ours(self) -> None:
        """Interrupt our running request and wait, a while, for it to come back."""
        self.port.interrupt()
        self._await(_Wait.ANSWER, self.settings.cancel_grace)

    def _abandon(self) -> None:
        """Cancel without interrupting: the request waits in the server's queue, or is not ours."""
        self._end_request()
        self._cut_short(JobState.CANCELLED)

    def _cut_short(self, outcome: JobState, error: str | None = None) -> None:
        """End the job inside a stage: the stage ends partial, with the images it had."""
        self._finish_stage(partial=True)
        self._end(outcome, None if error is None else self._stage_error(error))

    # -- helpers --------------------------------------------------------------

    def _leave_queue(self) -> None:
        self._status = attrs.evolve(self._status, started_at=self.wall_clock(), state=JobState.RUNNING)
        self.hooks.job_started(self._status, self.spec)

    def _await(self, what: _Wait, seconds: float) -> None:
        self._wait, self._deadline = what, self.clock() + seconds

    def _show_progress(self, now: float) -> None:
        stage = self._stage
        index = self._machine.stage_index
        eta = stage.eta(now)
        image, images = stage.image or (None, None)
        self._status = attrs.evolve(
            self._status,
            progress=stage.progress,
            job_progress=self._jobs.job_progress(index, stage.progress),
            image=image,
            images=images,
            step=stage.step,
            steps=stage.steps,
            eta=eta,
            job_eta=self._jobs.job_eta(index, eta, stage.seconds_per_step),
            queue_position=stage.queue_position,
            preview=self._preview,
        )
        self.hooks.progress(self._status)

    def _stop_polling(self) -> None:
        poller, self._poller = self._poller, None  # forgotten first: a stop() that raises is not retried
        if poller is not None:
            poller.stop()

    def _end_request(self) -> None:
        self._stop_polling()
        self._in_flight = False
        self._wait = self._deadline = None

    def _stage_error(self, message: str) -> str:
        index = self._machine.stage_index
        return f"stage {index + 1}/{len(self.spec.stages)} ({self.spec.stages[index].type}): {message}"

    def _end(self, outcome: JobState, error: str | None = None) -> None:
        self._end_request()
        self._pending = None
        if outcome is not JobState.DONE:  # `advance` from the last stage already reached done
            self._machine.fire({JobState.FAILED: "fail", JobState.CANCELLED: "cancel"}[outcome])
        self.outcome, self.error = outcome, error
        self._status = attrs.evolve(self._status, state=outcome)
        self._write_manifest(outcome, error)
        self.hooks.job_finished(self._status, outcome, error, tuple(self.results))

    def _write_manifest(self, outcome: JobState, error: str | None = None) -> None:
        """Record the ended job; a disk that refuses loses the record, not the job's images."""
        try:
            self.folder.write_manifest(self.spec, self.results, outcome=outcome, error=error)
        except OSError as exc:
            log.error("%s: cannot write the manifest in %s: %s", self.job_id, self.folder.path, exc)
