"""`Job`: one job's identity and live state, and the step-able core that drives it.

A `Job` never blocks and never starts a thread.  The runner feeds it events,
one at a time and on one thread: `begin`, `sample`, `returned`, `failed`,
`cancel` and `tick`.  What the job needs done in the world it asks of its
`WebUIPort`: send a request (its answer comes back later as `returned` or
`failed`), interrupt, take a progress sample.  Tests drive the same core with a
fake port and a fake clock, so every interleaving of events is a test case.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

import attrs

from sdjobs.client import GenerationResult
from sdjobs.frontend import CancelMode
from sdjobs.hooks import Hooks, PluginError
from sdjobs.machine import JobMachine
from sdjobs.outputs import JobFolder, read_parameters
from sdjobs.payloads import adetailer_applied, build_payload
from sdjobs.polling import DEFAULT_POLL_INTERVAL, PollRequest, Poller, Report
from sdjobs.progress import JobTracker, StageTracker, StallEvent, StallWatch
from sdjobs.status import JobState, ProgressInfo, RuntimeStatus, StageResult, TaskProgress

if TYPE_CHECKING:
    from sdjobs.client import WebUIClient
    from sdjobs.spec import JobSpec, StageSpec


class WebUIPort(Protocol):
    """What a job asks of the world; the runner's port does it over HTTP."""

    client: WebUIClient
    task_tracking: bool
    report: Report

    def sample(self, task_id: str | None) -> tuple[ProgressInfo | None, TaskProgress | None]:
        """One progress sample, now: of our task when ``task_id`` is given, else global.

        Taken on the runner's thread just before a request is sent (global mode,
        as the baseline) and once when a cancel must know whether our job runs.
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
        preview: Ask for live previews.
    """

    poll_interval: float = DEFAULT_POLL_INTERVAL
    stall_after: float = 60.0
    stall_interrupt_after: float | None = None
    cancel_grace: float = 30.0
    preview: bool = False


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
    _plan: tuple = attrs.field(init=False)
    _jobs: JobTracker = attrs.field(init=False)
    _stage: StageTracker | None = attrs.field(default=None, init=False)
    _inputs: list[bytes | None] = attrs.field(factory=list, init=False)
    _input: bytes | None = attrs.field(default=None, init=False)
    _task_id: str | None = attrs.field(default=None, init=False)
    _preview: str | None = attrs.field(default=None, init=False)
    _outputs: list[bytes] = attrs.field(factory=list, init=False)
    _paths: list = attrs.field(factory=list, init=False)
    _infos: list = attrs.field(factory=list, init=False)
    _seeds: list[int] = attrs.field(factory=list, init=False)
    _in_flight: bool = attrs.field(default=False, init=False)
    _poller: Poller | None = attrs.field(default=None, init=False)
    _started_at: float = attrs.field(default=0.0, init=False)
    _stage_started: float = attrs.field(default=0.0, init=False)
    _stage_started_wall: float = attrs.field(default=0.0, init=False)
    _cancel: CancelMode | None = attrs.field(default=None, init=False)
    _cancel_deadline: float | None = attrs.field(default=None, init=False)
    _stalls: StallWatch = attrs.field(init=False)
    _stall_interrupted: bool = attrs.field(default=False, init=False)
    _status: RuntimeStatus = attrs.field(init=False)

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
        return self._machine

    @property
    def status(self) -> RuntimeStatus:
        """The latest snapshot, as last handed to hooks."""
        return self._status

    @property
    def finished(self) -> bool:
        return self._machine.terminal

    @property
    def awaiting_answer(self) -> bool:
        """A request is out and the job waits for its answer."""
        return self._in_flight

    @property
    def next_deadline(self) -> float | None:
        """When `tick` next has something to do (monotonic seconds), if ever."""
        return self._cancel_deadline

    # -- events ---------------------------------------------------------------

    def begin(self) -> None:
        """Leave the queue and start the first stage."""
        self._started_at = self.wall_clock()
        self._machine.fire("start")
        self._status = attrs.evolve(self._status, started_at=self._started_at, state=JobState.RUNNING)
        self.hooks.job_started(self._status, self.spec)
        self._start_stage(0, inputs=[None])

    def begin_failed(self, error: str) -> None:
        """Leave the queue and fail at once, before any request (preflight found a problem)."""
        self._started_at = self.wall_clock()
        self._status = attrs.evolve(self._status, started_at=self._started_at, state=JobState.RUNNING)
        self.hooks.job_started(self._status, self.spec)
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

    def returned(self, result: GenerationResult) -> None:
        """The request in flight answered (200): keep its images, go on."""
        if self.finished or not self._in_flight:
            return
        now = self.clock()
        self._end_request()
        self._keep(result)
        self._stage.request_returned(now)
        index = self._machine.stage_index
        if self._cancel is CancelMode.NOW or self._stall_interrupted:
            self._finish_stage(partial=True)
            if self._cancel is CancelMode.NOW:
                self._end(JobState.CANCELLED)
            else:
                self._end(JobState.FAILED, self._stage_error("stalled; interrupted"))
            return
        problem = self._check(result, index)
        if problem:
            self._finish_stage(partial=False)
            self._end(JobState.FAILED, self._stage_error(problem))
        elif self._inputs:
            self._send_next()
        else:
            self._stage.finish(now)
            self._finish_stage(partial=False)
            self._next_stage(index)

    def failed(self, error: BaseException) -> None:
        """The request in flight failed (no answer, or an error status)."""
        if self.finished or not self._in_flight:
            return
        self._end_request()
        if self._paths:
            self._finish_stage(partial=True)
        if self._cancel is CancelMode.NOW:
            self._end(JobState.CANCELLED)  # the interrupted request broke on its way back
        else:
            self._end(JobState.FAILED, self._stage_error(str(error)))

    def cancel(self, mode: CancelMode = CancelMode.NOW) -> None:
        """Ask the job to stop: now (interrupt, keep partial images) or after this stage."""
        if self.finished:
            return
        if self._machine.state == "queued":
            self._end(JobState.CANCELLED)
            return
        if mode is CancelMode.AFTER_STAGE:
            self._cancel = self._cancel or mode
            return
        if self._cancel is CancelMode.NOW:
            return
        self._cancel = CancelMode.NOW
        if not self._in_flight:
            self._end(JobState.CANCELLED)
            return
        self._stop_polling()
        if not self._ours_running():
            # Queued, or not ours: A1111 cannot cancel a queued request, and an
            # interrupt would stop someone else's job.  Stop waiting for it.
            self._end_request()
            self._end(JobState.CANCELLED)
            return
        self.port.interrupt()
        self._cancel_deadline = self.clock() + self.settings.cancel_grace

    def tick(self) -> None:
        """Time passed: report a stall, or give up on a cancelled request that never returns."""
        if self.finished or not self._in_flight:
            return
        now = self.clock()
        if self._cancel_deadline is not None:
            if now >= self._cancel_deadline:
                self._end_request()
                if self._paths:
                    self._finish_stage(partial=True)
                self._end(JobState.CANCELLED)
            return
        for event in self._stalls.check(self._stage.stalled_for(now)):
            if event is StallEvent.STALLED:
                self.hooks.job_stalled(self._status, self._stage.stalled_for(now))
            elif self._ours_running():
                self._stall_interrupted = True
                self.port.interrupt()

    # -- stages ---------------------------------------------------------------

    def _start_stage(self, index: int, inputs: list[bytes | None]) -> None:
        plan = self._plan[index]
        self._stage = StageTracker(
            requests=len(inputs),
            steps_per_request=plan.steps or None,
            passes_per_request=plan.passes,
        )
        self._inputs = list(inputs)
        self._outputs, self._paths, self._infos, self._seeds = [], [], [], []
        self._stage_started = self.clock()
        self._stage_started_wall = self.wall_clock()
        self._stalls = StallWatch(self.settings.stall_after, self.settings.stall_interrupt_after)
        self._status = attrs.evolve(
            self._status,
            stage=self.spec.stages[index].type,
            stage_index=index,
            progress=0.0,
            step=None,
            steps=None,
            eta=None,
            queue_position=None,
            preview=None,
        )
        self._preview = None
        self.hooks.stage_started(self._status, self.spec.stages[index])
        self._send_next()

    def _send_next(self) -> None:
        index = self._machine.stage_index
        stage = self.spec.stages[index]
        number = self._stage.requests - len(self._inputs)
        self._input = self._inputs.pop(0)
        self._task_id = None
        payload = build_payload(self.spec, index, self._input)
        try:
            self.hooks.amend_payload(payload, stage, self._status)
        except PluginError as exc:
            self._end(JobState.FAILED, self._stage_error(str(exc)))
            return
        tracked = stage.endpoint != "extra-single-image"
        task_id = None
        if tracked and self.port.task_tracking:
            task_id = f"sdjobs-{self.job_id}-{index + 1}-{number + 1}"
        self._task_id = task_id
        baseline = None if task_id or not tracked else self.port.sample(None)[0]
        self._stage.request_sent(self.clock(), baseline=baseline, task_mode=task_id is not None)
        if tracked:
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
                self._end(JobState.FAILED, self._stage_error(str(exc)))
                return
        self._in_flight = True
        self.port.send(stage.endpoint, payload, task_id)

    def _keep(self, result: GenerationResult) -> None:
        index = self._machine.stage_index
        stage = self.spec.stages[index]
        first = int(result.info.get("index_of_first_image", 0) or 0)
        fallback = read_parameters(self._input) if self._input else None
        for png in result.images[first:]:
            number = len(self._paths) + 1
            path = self.folder.write_image(
                index,
                stage.type,
                number,
                png,
                provenance={"seed": self.spec.seed},
                parameters_fallback=fallback,
            )
            self._outputs.append(png)
            self._paths.append(path)
        if result.info:
            self._infos.append(dict(result.info))
        self._seeds.extend(result.seeds)

    def _check(self, result: GenerationResult, index: int) -> str | None:
        stage = self.spec.stages[index]
        if stage.type == "adetailer" and not any(adetailer_applied(t) for t in result.infotexts):
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

    def _next_stage(self, index: int) -> None:
        last = index == len(self.spec.stages) - 1
        if self._cancel is CancelMode.AFTER_STAGE and not last:
            self._end(JobState.CANCELLED)
            return
        self._machine.fire("advance")
        if last:
            self._end(JobState.DONE)
        else:
            self._start_stage(index + 1, inputs=list(self._outputs) or [None])

    # -- helpers --------------------------------------------------------------

    def _show_progress(self, now: float) -> None:
        stage = self._stage
        index = self._machine.stage_index
        eta = stage.eta(now)
        self._status = attrs.evolve(
            self._status,
            progress=stage.progress,
            job_progress=self._jobs.job_progress(index, stage.progress),
            step=stage.step,
            steps=stage.steps,
            eta=eta,
            job_eta=self._jobs.job_eta(index, eta, stage.seconds_per_step),
            queue_position=stage.queue_position,
            preview=self._preview,
        )
        self.hooks.progress(self._status)

    def _ours_running(self) -> bool:
        """Whether the server is running our request, asked afresh if no sample said so yet."""
        if not self._stage.running:
            info, task = self.port.sample(self._task_id)
            self._stage.fold(info, task, self.clock())
        return self._stage.running

    def _stop_polling(self) -> None:
        if self._poller is not None:
            self._poller.stop()
            self._poller = None

    def _end_request(self) -> None:
        self._stop_polling()
        self._in_flight = False
        self._cancel_deadline = None

    def _stage_error(self, message: str) -> str:
        index = self._machine.stage_index
        return f"stage {index + 1}/{len(self.spec.stages)} ({self.spec.stages[index].type}): {message}"

    def _end(self, outcome: JobState, error: str | None = None) -> None:
        self._stop_polling()
        self._in_flight = False
        if outcome is not JobState.DONE:  # `advance` from the last stage already reached done
            self._machine.fire({JobState.FAILED: "fail", JobState.CANCELLED: "cancel"}[outcome])
        self.outcome, self.error = outcome, error
        self._status = attrs.evolve(self._status, state=outcome)
        self.hooks.job_finished(self._status, outcome, error, tuple(self.results))
