"""`Job`: one job's identity, its machine's model, and the work its transitions do.

The machine (`sdjobs.machine`) says what happens when; this module says what
each named condition checks and what each callback does.  A `Job` never waits
on the network and never starts a thread: what it needs done in the world it
asks of its `WebUIPort`, and the answers come back as triggers (`prepared`,
`probed`, `returned`, `failed`).  Tests drive the same core with a fake port and
a fake clock, so every interleaving of events is a test case.

The triggers are methods that `transitions` adds to each job::

    job.begin()
    job.prepared(folder=folder, problems=())
    job.sample(info=info, task=task)
    job.probed(info=info, task=task)
    job.returned(result=result)
    job.failed(error=error)
    job.reached()
    job.unanswered(error=error)
    job.cancel(mode=CancelMode.NOW)
    job.hand_back()
    job.tick()
    job.abort(error="OSError: disk full")
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import attrs
from sdjobs.client import WebUIError, WebUITimeout
from sdjobs.die_at import die_at
from sdjobs.hooks import Hooks, PluginError
from sdjobs.machine import AWAITING_ANSWER, END_STATES, new_machine
from sdjobs.outputs import JobFolder, read_parameters
from sdjobs.payloads import adetailer_applied, build_payload
from sdjobs.polling import DEFAULT_POLL_INTERVAL, PollRequest, Report
from sdjobs.progress import JobTracker, RequestShape, StageTracker, StallEvent, StallWatch
from sdjobs.stage import Request, StageRun
from sdjobs.status import CancelMode, JobState, RuntimeStatus, StageResult
from transitions import EventData

if TYPE_CHECKING:
    from sdjobs.client import GenerationResult, WebUIClient
    from sdjobs.history import ServerHistory
    from sdjobs.spec import JobSpec

log = logging.getLogger(__name__)


class WebUIPort(Protocol):
    """What a job asks of the world; the runner's port does it over HTTP, off the job's thread."""

    client: WebUIClient
    report: Report

    @property
    def task_tracking(self) -> bool:
        """Whether the server is known to follow our task ids; never waits to find out."""

    def prepare(self, spec: JobSpec, job_id: str) -> None:
        """Make the job's folder and check the job against the server (preflight);
        the outcome comes back as `Job.prepared`."""

    def probe(self, task_id: str | None) -> None:
        """Take one progress sample, of our task when ``task_id`` is given, else global;
        it comes back as `Job.probed`."""

    def send(self, endpoint: str, payload: dict[str, Any], task_id: str | None) -> None:
        """Start a generation request; its answer comes back as `Job.returned`/`Job.failed`."""

    def interrupt(self) -> None:
        """Ask the server to interrupt what it runs; returns at once.  An interrupt the server does
        not answer within `JobSettings.probe_timeout` comes back as `Job.unanswered`."""

    def ping(self) -> None:
        """Ask whether the server is back; if it answers, that comes back as `Job.reached`
        (nothing comes back while it is still down)."""


@attrs.frozen
class JobSettings:
    """How a job runs, beyond its spec.

    Attributes:
        poll_interval: Seconds between progress samples.
        stall_after: Seconds without progress before `sdjobs_job_stalled`.
        stall_interrupt_after: Seconds without progress before one interrupt; None: never.
        cancel_grace: Seconds to wait for an interrupted request to return.
        probe_timeout: Seconds to wait for a probe's sample before going on without it.
        prepare_timeout: Seconds to wait for the server to answer the checks before the first request.
        wait_for_webui: Seconds to wait for a server that went down (`WebUIError.down`) to come
            back, pinging it with backoff, before the job fails (the CLI's ``--wait-for-webui``).
        preview: Ask for live previews.
    """

    poll_interval: float = DEFAULT_POLL_INTERVAL
    stall_after: float = 60.0
    stall_interrupt_after: float | None = None
    cancel_grace: float = 30.0
    probe_timeout: float = 1.0
    prepare_timeout: float = 60.0
    wait_for_webui: float = 600.0
    preview: bool = False


def task_id(job_id: str, stage_index: int, number: int, retries: int) -> str:
    """The task id of request ``number`` (1-based) of a stage, sent again ``retries`` times:
    `sdjobs-<job id>-<stage>-<number>[-r<retries>]`, ours beyond doubt."""
    return f"sdjobs-{job_id}-{stage_index + 1}-{number}{f'-r{retries}' if retries else ''}"


#: Seconds between two pings of a server that is down: the first, and the most (doubling between).
PING_BACKOFF = (1.0, 30.0)


@attrs.define(eq=False, slots=False)
class Job:
    """One job: its spec, its machine's state, its progress and its results.

    `transitions` binds the triggers and ``state`` on the instance (hence no
    slots); only the runner's thread fires them.

    Attributes:
        spec: The frozen job description.
        job_id: The job's id, also the name of its output folder.
        hooks: The hooks to fire.
        port: The way out to the WebUI.
        settings: Poll interval, stall and cancel limits.
        clock: Monotonic seconds (a fake one in tests).
        wall_clock: Unix time, for `started_at` stamps.
        folder: Where its images and manifest go, once prepared.
        error: Why it failed, when it did.
        results: Every stage that ended, cut-short ones too.
        status: The latest snapshot, as last handed to hooks.
        stage: The running stage; None outside stages.
        deadline: When the answer the job waits for is late (monotonic seconds); None when it waits for none.
        detached: Another worker holds the job now (`detach`).
        gave_up_on_webui: The job failed because the server stayed down past `wait_for_webui`
            (the next job would meet the same server: a worker pauses its queue).
        finished_before: The stages an earlier attempt finished (read back from the store): the job
            resumes after them, from the last one's images, and never runs them again.
        record: Called with each finished stage once its images are on disk, before its manifest is
            rewritten and the next stage starts (the runner records it in the store); raising fails the job.
        server: The name of the server it runs on (`RuntimeStatus.server`), when there are several.
        history: What the server's history says of its speed: the prior of each stage's ETA
            and the price of the stages after the running one; None: none.
        stop: With several servers, the stage (0-based) that runs elsewhere: the job runs the
            stages before it here, then ends `handed_back`, to go on on another server; None: all.
    """

    spec: JobSpec
    job_id: str
    hooks: Hooks
    port: WebUIPort
    settings: JobSettings = JobSettings()
    clock: Callable[[], float] = time.monotonic
    wall_clock: Callable[[], float] = time.time
    finished_before: Sequence[StageResult] = ()
    record: Callable[[StageResult], None] | None = attrs.field(default=None, repr=False)
    server: str | None = None
    history: ServerHistory | None = attrs.field(default=None, repr=False)
    stop: int | None = None

    folder: JobFolder | None = attrs.field(default=None, init=False)
    error: str | None = attrs.field(default=None, init=False)
    results: list[StageResult] = attrs.field(factory=list, init=False)
    status: RuntimeStatus = attrs.field(init=False)
    stage: StageRun | None = attrs.field(default=None, init=False)
    deadline: float | None = attrs.field(default=None, init=False)
    detached: bool = attrs.field(default=False, init=False)
    gave_up_on_webui: bool = attrs.field(default=False, init=False)
    _handing_back: bool = attrs.field(default=False, init=False)  # `hand_back` came
    _down: tuple[float, str] | None = attrs.field(default=None, init=False)  # since when, and why
    _backoff: float = attrs.field(default=0.0, init=False)
    _jobs: JobTracker = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.results = list(self.finished_before)
        seconds = None
        if self.history is not None:
            seconds = tuple(self.history.stage_seconds(self.spec, index) for index in range(len(self.spec.stages)))
        self._jobs = JobTracker(costs=tuple(plan.cost for plan in self.spec.plan()), seconds=seconds)
        self.status = RuntimeStatus(
            job_id=self.job_id,
            name=self.spec.name,
            stage=self.spec.stages[0].type,
            stage_index=0,
            stage_count=len(self.spec.stages),
            seed=self.spec.seed,
            server=self.server,
        )
        new_machine(self)

    # -- what the outside reads ----------------------------------------------------------

    @property
    def finished(self) -> bool:
        """The job has ended: no trigger applies any more, no hook fires for it."""
        return self.state in END_STATES

    @property
    def outcome(self) -> JobState | None:
        """How the job ended; None until it has."""
        return JobState(self.state) if self.finished else None

    def detach(self) -> None:
        """Another worker holds the job now (the store took it back): from here on nothing is
        written to its folder and no stage is recorded, so the new holder's work is never touched."""
        self.detached = True
        self.folder = None
        self.record = None

    @property
    def awaiting_answer(self) -> bool:
        """A request is out and the job waits for its answer."""
        return self.state in AWAITING_ANSWER

    @property
    def awaiting_probe(self) -> bool:
        """The job asked its port for a sample and waits for `probed`."""
        return self.state in ("baseline", "baseline_then_stop", "asking")

    # -- conditions --------------------------------------------------------------------------

    def has_problems(self, event: EventData) -> bool:
        return bool(event.kwargs["problems"])

    def late(self, event: EventData) -> bool:
        return self.deadline is not None and self.clock() >= self.deadline

    def server_down(self, event: EventData) -> bool:
        """The error says the server is not there (refused, dropped, a gateway's 502/503/504), not
        that it refused the request: worth waiting for."""
        error = event.kwargs["error"]
        return isinstance(error, WebUIError) and error.down

    def unreachable(self, event: EventData) -> bool:
        """At the checks a server that answers nothing in time (hung) is waited for as one that is down:
        no request is out yet whose stall could be watched."""
        return self.server_down(event) or isinstance(event.kwargs["error"], WebUITimeout)

    def waited_out(self, event: EventData) -> bool:
        return self.clock() - self._down[0] >= self.settings.wait_for_webui

    def server_silent(self, event: EventData) -> bool:
        """The latest progress sample timed out: an interrupt would go unanswered too."""
        return self.stage.tracker.silent

    def needs_baseline(self, event: EventData) -> bool:
        """Global mode: whose job the server runs is told from a sample taken before ours is sent."""
        return self.stage.request.polled and self.stage.request.task_id is None

    def ours_running(self, event: EventData) -> bool:
        """A sample said the job the server runs is ours: only then is it interrupted."""
        return self.stage.tracker.running

    def handing_back(self, event: EventData) -> bool:
        """`hand_back` came: where a cancel would end the job `cancelled`, it ends `handed_back`."""
        return self._handing_back

    def now(self, event: EventData) -> bool:
        return event.kwargs["mode"] is CancelMode.NOW

    def after_stage(self, event: EventData) -> bool:
        return event.kwargs["mode"] is CancelMode.AFTER_STAGE

    def after_job(self, event: EventData) -> bool:
        return event.kwargs["mode"] is CancelMode.AFTER_JOB

    def answer_is_wrong(self, event: EventData) -> bool:
        return self._problem_with(event.kwargs["result"]) is not None

    def more_requests(self, event: EventData) -> bool:
        return bool(self.stage.inputs)

    def resumed(self, event: EventData) -> bool:
        """An earlier attempt finished some stages: the job goes on after them."""
        return bool(self.finished_before)

    def all_stages_finished(self, event: EventData) -> bool:
        """An earlier attempt finished every stage but did not live to end the job."""
        return len(self.finished_before) == len(self.spec.stages)

    def last_stage(self, event: EventData) -> bool:
        return self.stage.index == len(self.spec.stages) - 1

    def passed_on(self, event: EventData) -> bool:
        """The next stage runs on another server (`stop`): the job goes back to the queue for it."""
        return self.stage.index + 1 == self.stop

    # -- callbacks: leaving the queue ------------------------------------------------------

    def prepare(self, event: EventData) -> None:
        self.status = attrs.evolve(self.status, started_at=self.wall_clock(), state=JobState.RUNNING)
        self.hooks.job_started(self.status, self.spec)
        self.check(event)

    def check(self, event: EventData) -> None:
        """Ask the port for the folder and the server's checks (again, once a down server is back)."""
        self._await(self.settings.prepare_timeout)
        self.port.prepare(self.spec, self.job_id)

    def fail_with_problems(self, event: EventData) -> None:
        self._set_folder(event.kwargs.get("folder"))
        self.error = "; ".join(event.kwargs["problems"])

    def fail_unprepared(self, event: EventData) -> None:
        self.error = f"the WebUI did not answer sdjobs' checks within {self.settings.prepare_timeout:g} s"

    def take_folder(self, event: EventData) -> None:
        self._set_folder(event.kwargs["folder"])

    def _set_folder(self, folder: JobFolder | None) -> None:
        self.folder = folder
        self.status = attrs.evolve(self.status, folder=None if folder is None else folder.path)

    def skip_finished_job(self, event: EventData) -> None:
        """Every stage finished in an earlier attempt: the job is complete as it stands."""
        self.take_folder(event)
        self.status = attrs.evolve(self.status, progress=1.0, job_progress=1.0, eta=0.0, job_eta=0.0)

    def start_first_stage(self, event: EventData) -> None:
        self.take_folder(event)
        self._start_stage(0, inputs=list(self.spec.inputs) or [None])

    def resume_stage(self, event: EventData) -> None:
        """Start the first unfinished stage from the images the last finished one wrote."""
        self.take_folder(event)
        last = self.finished_before[-1]
        self._start_stage(last.stage_index + 1, inputs=[path.read_bytes() for path in last.images] or [None])


    # -- callbacks: one request -------------------------------------------------------------

    def request(self, event: EventData) -> None:
        """Build the stage's next request and let plugins amend it; then send it (`ready`)."""
        stage = self.stage
        number = stage.request_number + 1
        source = stage.inputs.pop(0)
        payload = build_payload(self.spec, stage.index, source)
        request = stage.request = Request(stage.spec.endpoint, payload, source)
        try:
            self.hooks.amend_payload(payload, stage.spec, self.status)
        except PluginError as exc:
            self.abort(error=exc)
            return
        if request.polled and self.port.task_tracking:  # a request sent again gets an id of its own
            request.task_id = task_id(self.job_id, stage.index, number, stage.retries)
        self.ready()

    def ask_baseline(self, event: EventData) -> None:
        self._await(self.settings.probe_timeout)
        self.port.probe(None)

    def note_baseline(self, event: EventData) -> None:
        self.stage.request.baseline = event.kwargs["info"]

    def send(self, event: EventData) -> None:
        """Send the request, with a poller following it."""
        self.deadline = None
        request = self.stage.request
        self.stage.tracker.request_sent(self.clock(), baseline=request.baseline, task_mode=request.task_id is not None)
        if request.polled:
            poll = PollRequest(
                client=self.port.client,
                interval=self.settings.poll_interval,
                report=self.port.report,
                task_id=request.task_id,
                preview=self.settings.preview,
            )
            try:
                request.poller = self.hooks.start_polling(poll)
            except PluginError as exc:
                self.abort(error=exc)
                return
        self.port.send(request.endpoint, request.payload, request.task_id)

    def fold(self, event: EventData) -> None:
        """Fold a progress sample; fire `sdjobs_progress` when what is shown changed."""
        die_at("sample")
        info, task = event.kwargs["info"], event.kwargs["task"]
        stage, now = self.stage, self.clock()
        changed = stage.tracker.fold(info, task, now, silent=bool(event.kwargs.get("silent")))
        if self.settings.preview and stage.tracker.running:
            preview = (task and task.live_preview) or (info and info.current_image)
            preview = preview and preview.rpartition("base64,")[2]  # a data: URI from /internal
            if preview and preview != stage.preview:
                stage.preview, changed = preview, True
        if changed:
            self._show_progress(now)

    def watch_stall(self, event: EventData) -> None:
        """Report a stall once; ask for the stall interrupt (`stall`) when it is due."""
        stalled = self.stage.tracker.stalled_for(self.clock())
        for due in self.stage.stalls.check(stalled):
            if due is StallEvent.STALLED:
                self.hooks.job_stalled(self.status, stalled)
            else:
                self.stall()

    # -- callbacks: a server that is down ----------------------------------------------------

    def lose_request(self, event: EventData) -> None:
        """The request got no answer from a server that went down: it goes back at the head of
        the stage's inputs, to be sent again; the stage's answered requests stay as they are."""
        stage = self.stage
        stage.request.stop_polling()
        stage.inputs.insert(0, stage.request.source)
        stage.request = None
        stage.retries += 1

    def wait_for_webui(self, event: EventData) -> None:
        """Start waiting for the server: the first ping is due after the first backoff.  The wait
        counts from the first time it went down since a request last answered, so a server that
        drops every request fails the job once `wait_for_webui` is spent."""
        since = self._down[0] if self._down else self.clock()
        self._down = (since, str(event.kwargs["error"]))
        self._backoff = PING_BACKOFF[0]
        self._next_ping()

    def ping(self, event: EventData) -> None:
        """Ask whether the server is back (`reached`); the next ping waits twice as long."""
        self.port.ping()
        self._backoff = min(self._backoff * 2, PING_BACKOFF[1])
        self._next_ping()

    def _next_ping(self) -> None:
        """Due after the backoff, but never after the wait runs out, so that the job fails on time;
        `sdjobs_webui_unreachable` tells the front ends (the log front end logs it)."""
        since, error = self._down
        now = self.clock()
        wait = max(0.0, min(self._backoff, since + self.settings.wait_for_webui - now))
        self._await(wait)
        self.hooks.webui_unreachable(self.status, error, wait, now - since)

    def fail_unreachable(self, event: EventData) -> None:
        self.gave_up_on_webui = True
        self.error = f"the WebUI stayed unreachable for {self.settings.wait_for_webui:g} s: {self._down[1]}"

    # -- callbacks: cutting a request short -------------------------------------------------

    def hand_back_now(self, event: EventData) -> None:
        """Stop as a cancel "now" does; where that would end `cancelled`, the job ends `handed_back`."""
        self._handing_back = True
        self.cancel(mode=CancelMode.NOW)

    def interrupt(self, event: EventData) -> None:
        """Interrupt our running request; its answer is awaited for the grace time."""
        self.stage.request.stop_polling()
        self.port.interrupt()
        self.await_interrupted(event)

    def await_interrupted(self, event: EventData) -> None:
        self._await(self.settings.cancel_grace)

    def ask_owner(self, event: EventData) -> None:
        """Before interrupting, a sample must say whether the job the server runs is ours."""
        self.stage.request.stop_polling()
        self._await(self.settings.probe_timeout)
        self.port.probe(self.stage.request.task_id)

    def fold_probe(self, event: EventData) -> None:
        self.stage.tracker.fold(event.kwargs["info"], event.kwargs["task"], self.clock())

    # -- callbacks: answers and ends ---------------------------------------------------------

    def keep(self, event: EventData) -> None:
        """Write the answer's images, each with its seed and the prompt it came from."""
        stage, result = self.stage, event.kwargs["result"]
        self.deadline, self._down = None, None
        stage.request.stop_polling()
        # where an interrupt cut the request, read before the tracker counts the request as answered
        cut = self._cut() if self.state in ("interrupting", "stall_interrupting") else None
        stage.tracker.request_returned(self.clock())
        first = int(result.info.get("index_of_first_image") or 0)
        source = stage.request.source
        fallback = read_parameters(source) if source else None
        seeds = result.seeds
        images = result.images[first:] if self.folder is not None else ()  # None: detached
        cut_from = len(images) - int(stage.request.payload.get("batch_size") or 1)  # the batch being sampled
        for i, png in enumerate(images):
            provenance = {"seed": seeds[i] if i < len(seeds) else self.spec.seed}
            if cut is not None and i >= cut_from:
                provenance["cut"] = cut
            path = self.folder.write_image(
                stage.index,
                stage.spec.type,
                len(stage.paths) + 1,
                png,
                provenance=provenance,
                parameters_fallback=fallback,
            )
            if "cut" in provenance:
                stage.cut = {**cut, "images": [*(stage.cut or {}).get("images", ()), str(path)]}
            stage.paths.append(path)
            stage.outputs.append(png)
        if result.info:
            stage.infos.append(dict(result.info))
        stage.seeds.extend(seeds)
        stage.request = None

    def _cut(self) -> dict[str, Any]:
        """Where the interrupt cut the request, as the last sample showed it (`StageResult.cut`)."""
        tracker = self.stage.tracker
        kind, face = tracker.current_pass
        return {"pass": kind or "main", "face": None if face is None else list(face), "step": tracker.step, "steps": tracker.steps}

    def finish_stage(self, event: EventData) -> None:
        """The stage's last request answered: the stage is complete."""
        self.stage.tracker.finish(self.clock())
        index = self.stage.index
        self.status = attrs.evolve(
            self.status,
            progress=1.0,
            job_progress=self._jobs.job_progress(index, 1.0),
            eta=0.0,
            job_eta=self._jobs.job_eta(index, 0.0),
        )
        self._end_stage(partial=False)

    def next_stage(self, event: EventData) -> None:
        """The stage is complete; the next one starts from its images."""
        finished = self.stage
        self.finish_stage(event)
        die_at("between-stages")
        self._start_stage(finished.index + 1, inputs=list(finished.outputs) or [None])

    def fail_with_answer(self, event: EventData) -> None:
        self.error = self._problem_with(event.kwargs["result"])

    def fail_with_error(self, event: EventData) -> None:
        self.error = str(event.kwargs["error"])

    def fail_stalled(self, event: EventData) -> None:
        """The stall interrupt was answered: with what the request had (200) or an error, which is told too."""
        error = event.kwargs.get("error")
        self.error = "stalled; interrupted" if error is None else f"stalled; interrupted, and the request failed: {error}"

    def note_unanswered(self, event: EventData) -> None:
        """A frozen server will not answer the request either: the cancel ends the job now, saying so."""
        log.warning("%s: the WebUI did not answer the interrupt (%s); it may go on rendering the request",
                    self.spec.name, event.kwargs["error"])  # fmt: skip

    def fail_unanswered(self, event: EventData) -> None:
        quiet = self.stage.tracker.quiet_for(self.clock())
        self.error = f"the WebUI stopped answering (no progress for {quiet:.0f} s, interrupt unanswered)"

    def end(self, event: EventData) -> None:
        """Every end: a stage still running ends partial, the manifest is written, `job_finished` fires."""
        self.deadline = None
        if self.stage is not None:
            if self.stage.request is not None:
                self.stage.request.stop_polling()
            if self.error is not None:
                self.error = f"stage {self.stage.index + 1}/{len(self.spec.stages)} ({self.stage.spec.type}): {self.error}"
            self._end_stage(partial=True)
        self.status = attrs.evolve(self.status, state=self.outcome)
        self._write_manifest()
        self.hooks.job_finished(self.status, self.outcome, self.error, tuple(self.results))

    # -- helpers ---------------------------------------------------------------------------

    def _start_stage(self, index: int, inputs: list[bytes | None]) -> None:
        plan = self.spec.plan()[index]
        shape = RequestShape.for_stage(self.spec.stages[index], plan)
        prior = None if self.history is None else self.history.model_for(self.spec, index)
        if shape is not None and prior is not None and prior.assumed_faces() is not None:
            shape = attrs.evolve(shape, faces=prior.assumed_faces())
        self.stage = StageRun(
            index=index,
            spec=self.spec.stages[index],
            inputs=inputs,
            tracker=StageTracker(  # its steps are the shape's (an extras stage has neither)
                requests=len(inputs),
                passes_per_request=plan.passes,
                images_per_request=plan.iterations,
                shape=shape,
                prior=prior,
            ),
            stalls=StallWatch(self.settings.stall_after, self.settings.stall_interrupt_after),
            started=self.clock(),
            started_wall=self.wall_clock(),
        )
        self.status = attrs.evolve(
            self.status,
            stage=self.stage.spec.type,
            stage_index=index,
            progress=0.0,
            image=None,
            images=None,
            step=None,
            steps=None,
            pass_kind=None,
            face=None,
            eta=None,
            queue_position=None,
            preview=None,
        )
        self.hooks.stage_started(self.status, self.stage.spec)

    def _end_stage(self, *, partial: bool) -> None:
        """Record the stage's result and fire `sdjobs_stage_finished`; the job is between stages after."""
        stage, self.stage = self.stage, None
        result = stage.result(self.clock() - stage.started, partial=partial, server=self.server)
        self.results.append(result)
        if not partial:
            die_at("stage-written")
            if self.record is not None:  # first: a job another worker holds now writes no manifest
                self.record(result)
            self._write_manifest()
        self.hooks.stage_finished(self.status, result)

    def _problem_with(self, result: GenerationResult) -> str | None:
        """What is wrong with an answer that came back 200, if anything."""
        index = self.stage.index
        if self.stage.spec.type == "adetailer" and not any(adetailer_applied(text) for text in result.infotexts):
            return "ADetailer did not run: its settings are not in the infotext (is the extension installed and enabled?)"
        if index == 0 and result.seeds and result.seeds[0] != self.spec.seed:
            return f"the server used seed {result.seeds[0]}, not the job's seed {self.spec.seed}"
        return None

    def _await(self, seconds: float) -> None:
        self.deadline = self.clock() + seconds

    def _show_progress(self, now: float) -> None:
        stage, tracker = self.stage, self.stage.tracker
        eta = tracker.eta(now)
        image, images = tracker.image or (None, None)
        pass_kind, face = tracker.current_pass
        self.status = attrs.evolve(
            self.status,
            progress=tracker.progress,
            job_progress=self._jobs.job_progress(stage.index, tracker.progress),
            image=image,
            images=images,
            step=tracker.step,
            steps=tracker.steps,
            pass_kind=pass_kind,
            face=face,
            eta=eta,
            job_eta=self._jobs.job_eta(stage.index, eta, tracker.seconds_per_step),
            queue_position=tracker.queue_position,
            preview=stage.preview,
        )
        self.hooks.progress(self.status)

    def _write_manifest(self) -> None:
        """Record where the job is (after each stage) or how it ended; a disk that refuses loses
        the record, not the job's images."""
        if self.folder is None:
            return
        outcome = self.outcome or JobState.RUNNING
        try:
            self.folder.write_manifest(self.spec, self.results, outcome=outcome, error=self.error)
        except OSError as exc:
            log.error("%s: cannot write the manifest in %s: %s", self.job_id, self.folder.path, exc)
