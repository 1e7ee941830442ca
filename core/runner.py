"""`Runner`: runs a queue of jobs, one after another, on one thread.

The runner's thread is the one writer: it alone fires machine triggers and
hooks.  Everything else reaches it as an event on one queue: the checks before
a job's first request (folder, preflight), the answer of the request in flight,
the probes' samples and the interrupt (each on a short-lived thread, so the
runner never waits on the network), progress samples from the poller's thread,
and cancels from any thread.  So a cancel is acted on at once, not at
the next poll, and a hanging progress request holds up neither a cancel nor,
beyond the job's `probe_timeout`, the generation request.
"""

from __future__ import annotations

import functools
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import attrs
from sdjobs.client import WebUIClient, WebUIError, WebUITimeout
from sdjobs.hooks import Hooks
from sdjobs.history import ServerHistory
from sdjobs.job import Job, JobSettings, task_id
from sdjobs.outputs import SHORT_ID_LENGTH, JobFolder, folder_name, random_job_id
from sdjobs.preflight import LISTS, CatalogError, ServerCatalog, ask_for_lists, lists_needed, preflight
from sdjobs.spec import JobSpec
from sdjobs.status import CancelMode, JobState, ProgressInfo, StageResult, TaskProgress
from sdjobs.store import JobRecord, NotHeld, Store, StoreError

log = logging.getLogger(__name__)

#: How often a lost request may have been sent again (a down server) and still be looked for.
_LOST_RETRIES = 4

# How long the runner sleeps between two looks at the clock when nothing happens.
_TICK = 0.5


class _ServerChecks:
    """What a run asks the server once, for every job: its lists for preflight, and whether
    it follows task ids.  Called on the ports' and health checks' threads, never the runner's."""

    def __init__(self, client: WebUIClient) -> None:
        self._client = client
        self._lock = threading.Lock()
        self._answers: dict[str, Any] = {}
        self._detection: threading.Thread | None = None

    def problems(self, spec: JobSpec, stages: Sequence[int] | None = None) -> list[str]:
        """`preflight` of ``spec`` (its ``stages``) against the server's lists, each asked for the first
        time a job needs it; on a miss the lists known from before are asked again, so that a checkpoint
        added to a running server is found."""
        with self._lock:
            needed = lists_needed([spec])
            asked = needed - self._answers.keys()
            self._answers.update(ask_for_lists(self._client, asked))
            problems = preflight(spec, ServerCatalog.from_answers(self._answers), stages)
            if problems and asked != needed:
                self._answers.update(ask_for_lists(self._client, needed))
                problems = preflight(spec, ServerCatalog.from_answers(self._answers), stages)
            return problems

    def everything(self) -> ServerCatalog:
        """Ask the server for all its lists anew (it came up); jobs are checked against them after."""
        answers = ask_for_lists(self._client, LISTS)
        catalog = ServerCatalog.from_answers(answers)
        with self._lock:
            self._answers = answers
        return catalog

    def known(self) -> ServerCatalog | None:
        """The catalog of the lists as last asked, without asking; None unless every list was asked."""
        with self._lock:
            return ServerCatalog.from_answers(self._answers) if self._answers.keys() >= set(LISTS) else None

    def detect_task_ids(self) -> threading.Thread | None:
        """Start finding out whether the server follows task ids, unless known or under way."""
        with self._lock:
            if self._client.follows_task_ids or (self._detection and self._detection.is_alive()):
                return self._detection
            self._detection = threading.Thread(
                target=self._client.supports_task_progress, name="sdjobs-task-ids", daemon=True
            )
            self._detection.start()
            return self._detection


class _Port:
    """One job's way out to the WebUI: calls on short-lived threads, answers as events.

    Every event is put on the runner's queue tagged with the port, so the answer
    of a request that a cancelled job stopped waiting for is dropped, as is one
    of an earlier attempt of the same job on this runner (a request sent again
    to a server that came back, answered after the job went back to the queue).
    """

    def __init__(self, client: WebUIClient, events: queue.SimpleQueue, job_id: str, *,
                 out_dir: Path, folder: Callable[[], JobFolder], checks: _ServerChecks,
                 patience: float, lost: Sequence[str] = (), stages: Sequence[int] | None = None,
                 problems: Sequence[str] = ()) -> None:  # fmt: skip
        self.client = client
        self._events = events
        self._job_id = job_id
        self._out_dir = out_dir
        self._folder = folder
        self._checks = checks
        self._patience = patience
        self._lost = lost  # the task ids a request left running on this server by a dead worker may have
        self._stages = stages  # the stages this server runs (None: all)
        self._problems = problems  # found before: the job cannot run here
        self._made: JobFolder | None = None  # once made, checking again (the server was down) keeps it

    @property
    def task_tracking(self) -> bool:
        return self.client.follows_task_ids

    def _put(self, trigger: str, **kwargs: object) -> None:
        self._events.put((self, trigger, kwargs))

    def _in_background(self, name: str, call: Callable[[], None]) -> None:
        """Run `call` on a thread of its own; an error it did not expect (a bug) fails the job at
        once, as one on the runner's thread does, rather than at the job's next deadline."""

        def guarded() -> None:
            try:
                call()
            except Exception as exc:
                log.debug("%s failed in %s", self._job_id, name, exc_info=True)
                self._put("abort", error=f"{type(exc).__name__}: {exc}")

        threading.Thread(target=guarded, name=f"sdjobs-{name}", daemon=True).start()

    def report(self, info: ProgressInfo | None, task: TaskProgress | None) -> None:
        """A poller's sample; called on its thread, right after its progress calls, so the client
        can tell whether a missing sample timed out."""
        self._put("sample", info=info, task=task, silent=self.client.progress_timed_out())

    def prepare(self, spec: JobSpec, job_id: str) -> None:
        """Make (or reopen) the folder and run preflight, while finding out whether the server follows
        task ids; that answer is awaited at most `patience` seconds more (a server slow to
        give it runs the job without task ids)."""

        def check() -> None:
            detection = self._checks.detect_task_ids()
            try:
                folder = self._made = self._made or self._folder()
            except (OSError, StoreError) as exc:
                self._put("prepared", folder=None, problems=[f"cannot create the job's folder in {self._out_dir}: {exc}"])
                return
            try:
                problems = [*self._problems, *self._checks.problems(spec, self._stages)]
            except WebUIError as exc:
                if exc.down or isinstance(exc, WebUITimeout):  # not the job's fault: it waits for the server
                    self._put("failed", error=exc)
                    return
                problems = [str(exc)]
            except CatalogError as exc:
                problems = [str(exc)]
            if detection is not None:
                detection.join(self._patience)
            if self._lost:
                self._interrupt_lost_request()
                self._lost = ()  # once: checking again (the server was down) finds it ended
            self._put("prepared", folder=folder, problems=problems)

        self._in_background("prepare", check)

    def _interrupt_lost_request(self) -> None:
        """A worker running this job died with a request out on this server: if the server still runs
        it, interrupt it, so that the job's new request does not wait behind it.  Only a task id tells
        it for ours; without them another client's job could be taken for it, so it is left alone."""
        if self.client.get_progress() is None:
            return  # idle: the lost request ended
        if not self.client.follows_task_ids:
            log.info("%s: the WebUI is busy, maybe with the request of a worker that died; without task ids "
                     "it cannot be told from another client's job, so it is not interrupted", self._job_id)
            return
        for task in self._lost:
            progress = self.client.internal_progress(task)
            if progress is not None and progress.active:
                log.warning("%s: the WebUI still runs the request of a worker that died (%s): interrupting it",
                            self._job_id, task)  # fmt: skip
                try:
                    self.client.interrupt(timeout=self._patience)
                except WebUIError as exc:
                    log.warning("could not interrupt: %s", exc)
                return

    def probe(self, task_id: str | None) -> None:
        def sample() -> None:
            if task_id is None:
                self._put("probed", info=self.client.get_progress(), task=None)
            else:
                self._put("probed", info=None, task=self.client.internal_progress(task_id))

        self._in_background("probe", sample)

    def send(self, endpoint: str, payload: dict[str, Any], task_id: str | None) -> None:
        def post() -> None:
            try:
                result = self.client.generate(endpoint, payload, force_task_id=task_id)
            except Exception as exc:  # whatever it was, the job must hear of it
                self._put("failed", error=exc)
            else:
                self._put("returned", result=result)

        self._in_background(endpoint, post)

    def interrupt(self) -> None:
        def post() -> None:
            try:
                self.client.interrupt(timeout=self._patience)
            except WebUIError as exc:
                if exc.down or isinstance(exc, WebUITimeout):
                    self._put("unanswered", error=exc)
                else:
                    log.warning("could not interrupt: %s", exc)

        self._in_background("interrupt", post)

    def ping(self) -> None:
        def call() -> None:
            try:
                self.client.ping()
            except WebUIError as exc:
                log.debug("the WebUI is still unreachable: %s", exc)
            else:
                self._put("reached")

        self._in_background("ping", call)


@attrs.frozen
class _Held:
    """A job a worker holds from the store: its folder is made or reopened there, its stages recorded."""

    store: Store
    worker_id: str
    record: JobRecord
    out_dir: Path

    def folder(self) -> JobFolder:
        """Reopen the folder of an earlier attempt, or make one (on a port's thread).  Its path is
        recorded before it is made, so a worker killed in between leaves the next one that path."""
        record, path = self.record, self.record.folder
        if path is None:
            path = self.out_dir / folder_name(record.id, record.spec.name, datetime.now(UTC))
            self.store.set_folder(record.id, self.worker_id, path)
        if record.next_stage == 0 and not path.exists():
            return JobFolder.create(path.parent, record.id, folder=path.name)
        return JobFolder.open(path, record.id, finished_stages=record.next_stage)

    def stage_finished(self, result: StageResult) -> None:
        self.store.record_stage(self.record.id, self.worker_id, result)

    def check(self) -> None:
        """Raise `NotHeld` unless this worker still holds the job: asked before an answer's images are
        written, so that a worker the store counted gone (silent past its lease, then back) writes
        nothing into the folder that another worker fills now.  A store it cannot reach says nothing
        here (recording the stage will)."""
        try:
            job = self.store.get(self.record.id)
        except StoreError as exc:
            log.warning("cannot check that the job is still ours: %s", exc)
            return
        if job.state is not JobState.RUNNING or job.worker != self.worker_id:
            raise NotHeld(f"job {job.short_id} is not held by worker {self.worker_id[:SHORT_ID_LENGTH]} ({job.state})")


@attrs.define(eq=False)
class Runner:
    """Runs ``specs`` in order against ``client``, writing under ``out_dir``; ``server``, when a
    worker has several, names that server in every status its jobs report.

    Implements the front ends' `Session`: `run` blocks until the queue drained,
    `cancel` may be called from any thread, a signal handler included (it only
    sets a flag and puts an event on a queue: no lock to deadlock on).
    """

    specs: Sequence[JobSpec]
    client: WebUIClient
    hooks: Hooks
    out_dir: Path
    settings: JobSettings = JobSettings()
    clock: Callable[[], float] = time.monotonic
    server: str | None = None

    outcomes: dict[str, JobState] = attrs.field(factory=dict, init=False)
    _events: queue.SimpleQueue = attrs.field(factory=queue.SimpleQueue, init=False)
    _current: str | None = attrs.field(default=None, init=False)
    _held: _Held | None = attrs.field(default=None, init=False)
    _stop_queue: bool = attrs.field(default=False, init=False)
    _hand_back: bool = attrs.field(default=False, init=False)
    _drained: bool = attrs.field(default=False, init=False)
    _webui_down: bool = attrs.field(default=False, init=False)
    _checks: _ServerChecks = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._checks = _ServerChecks(self.client)

    def run(self) -> None:
        now = datetime.now(UTC)
        queued = [(random_job_id(), spec) for spec in self.specs]
        for job_id, spec in queued:
            self.hooks.job_queued(job_id, spec)
        for job_id, spec in queued:
            self._current = job_id
            if self._stop_queue:  # read after `_current` is set: see `cancel`
                break
            folder = functools.partial(JobFolder.create, self.out_dir, job_id, folder=folder_name(job_id, spec.name, now))
            self.outcomes[job_id] = self._run_one(job_id, spec, folder)
            if self._webui_down:
                log.warning("the WebUI stayed unreachable: no further job is started")
                break
        self._current = None
        self._drained = True
        self.hooks.queue_drained(dict(self.outcomes))

    def cancel(self, mode: CancelMode = CancelMode.NOW, *, rest: bool = False) -> None:
        if self._drained:
            return  # everything has ended: nothing to cancel, and no reason to exit 130
        if rest or mode is CancelMode.AFTER_JOB:
            self._stop_queue = True  # set before `_current` is read, so no job slips through
        self._events.put((self._current, "cancel", {"mode": CancelMode(mode)}))

    def hand_back(self) -> None:
        """Stop as a cancel does, but hand the held job back to the store, to resume later
        (SIGTERM, a second Ctrl-C).  Our running request is interrupted if it is ours; no
        further job runs.  Safe from any thread, a signal handler included."""
        self._hand_back = True
        if not self._drained:
            self._stop_queue = True  # set before `_current` is read, as in `cancel`
            self._events.put((self._current, "hand_back", {}))

    def let_go(self) -> None:
        """The store gave the held job to another worker: stop it, writing nothing more.  Meant for the
        attempt running now: one asked as it ends never reaches the job's next attempt here."""
        self._events.put((self._held, "let_go", {}))

    def ask_lists(self) -> ServerCatalog:
        """Ask the server for all its lists anew (a health check found it up): the next jobs' checks use them."""
        return self._checks.everything()

    @property
    def lists(self) -> ServerCatalog | None:
        """The server's lists as last asked (by `ask_lists`, or by a job's checks, which ask again on a miss)."""
        return self._checks.known()

    @property
    def stopped(self) -> bool:
        """A cancel asked to run no further job."""
        return self._stop_queue

    @property
    def webui_down(self) -> bool:
        """The last job failed because the WebUI stayed down past `JobSettings.wait_for_webui`:
        the next job would meet the same server, so no further job should start until it is back."""
        return self._webui_down

    @property
    def handing_back(self) -> bool:
        """`hand_back` was asked: the held job goes back to the queue."""
        return self._hand_back

    def run_held(self, store: Store, worker_id: str, record: JobRecord, *, stop: int | None = None,
                 problems: Sequence[str] = ()) -> JobState | None:  # fmt: skip
        """Run a job that ``worker_id`` claimed from ``store``, from its first unfinished stage.

        Each finished stage is recorded in the store before the next starts; the
        job's end is recorded too.  Blocks until the job ends.  Returns how it
        ended, or None when it went back to the queue (`hand_back`, or a cancel
        that came before it started) or when another worker holds it now (`NotHeld`;
        then nothing more is written).

        With ``stop`` (a job whose stages run on several servers) it runs the stages
        before ``stop`` here and goes back to the queue after them, for another server
        to run the next.  ``problems`` (found by the caller) fail the job at its checks.
        """
        held = _Held(store, worker_id, record, self.out_dir.absolute())  # paths in the store outlive the cwd
        self._current, self._held = record.id, held
        try:
            if self._stop_queue:  # read after `_current` is set: see `cancel`
                store.release(record.id, worker_id)
                return None
            job = self._new_job(record.id, record.spec, held.folder, record.stages[: record.next_stage],
                                held.stage_finished, lost=self._lost_requests(record),
                                history=ServerHistory.load(store, self.client.base_url), stop=stop,
                                problems=problems)  # fmt: skip
            outcome = self._drive(job)
            if job.detached:
                return None  # another worker's now
            if outcome is JobState.HANDED_BACK:
                store.release(record.id, worker_id)
                return None
            store.finish(record.id, worker_id, outcome, job.error)
        except NotHeld as exc:
            log.warning("%s", exc)
            return None
        finally:
            self._current = self._held = None
        self.outcomes[record.id] = outcome
        return outcome

    def _lost_requests(self, record: JobRecord) -> list[str]:
        """The task ids of the requests the job's worker may have left running on our server when it was
        lost: the first unfinished stage's, each perhaps sent again a few times.  None if it ran elsewhere."""
        stage = record.next_stage
        if record.lost_server != self.client.base_url or stage >= len(record.spec.stages):
            return []
        requests = len(record.stages[stage - 1].images) if stage else max(1, len(record.spec.inputs))
        return [task_id(record.id, stage, number, retries)
                for number in range(1, requests + 1) for retries in range(_LOST_RETRIES)]  # fmt: skip

    def _run_one(self, job_id: str, spec: JobSpec, folder: Callable[[], JobFolder]) -> JobState:
        return self._drive(self._new_job(job_id, spec, folder))

    def _new_job(
        self,
        job_id: str,
        spec: JobSpec,
        folder: Callable[[], JobFolder],
        finished_before: Sequence[StageResult] = (),
        record: Callable[[StageResult], None] | None = None,
        lost: Sequence[str] = (),
        history: ServerHistory | None = None,
        stop: int | None = None,
        problems: Sequence[str] = (),
    ) -> Job:
        stages = None if stop is None else range(len(finished_before), stop)
        port = _Port(self.client, self._events, job_id, out_dir=self.out_dir, folder=folder, checks=self._checks,
                     patience=self.settings.probe_timeout, lost=lost, stages=stages, problems=problems)  # fmt: skip
        return Job(spec=spec, job_id=job_id, hooks=self.hooks, port=port, settings=self.settings, clock=self.clock,
                   finished_before=finished_before, record=record, server=self.server, history=history,
                   stop=stop)  # fmt: skip

    def _drive(self, job: Job) -> JobState:
        """Begin the job and feed it events until it ends."""
        self._handle(job, "begin", {})
        while not job.finished:
            self._dispatch(job)
        self._webui_down = job.gave_up_on_webui
        return job.outcome

    def _dispatch(self, job: Job) -> None:
        deadline = job.deadline
        timeout = _TICK if deadline is None else max(0.0, min(_TICK, deadline - self.clock()))
        try:
            sender, trigger, kwargs = self._events.get(timeout=timeout)
        except queue.Empty:
            pass
        else:
            if sender is None or sender not in (job.port, job.job_id, self._held) or job.finished:
                pass  # for a job (or an attempt) that has ended, or between jobs; a cancel names the job
            elif trigger == "let_go":
                job.detach()
                self._handle(job, "hand_back", {})
            else:
                self._handle(job, trigger, kwargs)
        # Also after an event: samples may keep coming while nothing moves (a stall).
        if not job.finished:
            self._handle(job, "tick", {})

    def _handle(self, job: Job, trigger: str, kwargs: dict[str, Any]) -> None:
        """Fire ``trigger``; an error that is not the WebUI's fails the job, not the run."""
        try:
            if trigger == "returned" and self._held is not None and not job.detached:
                self._held.check()  # before the answer's images are written
            job.trigger(trigger, **kwargs)
        except NotHeld as exc:  # the store gave the job to another worker
            log.warning("%s: %s; stopping it, writing nothing more", job.job_id, exc)
            job.detach()
            if not job.finished:
                job.abort(error=str(exc))
        except Exception as exc:
            log.debug("job %s failed on %s", job.job_id, trigger, exc_info=True)
            if not job.finished:
                job.abort(error=f"{type(exc).__name__}: {exc}")
