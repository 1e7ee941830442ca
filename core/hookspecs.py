"""The hooks sdjobs calls, and the `hookimpl` marker plugins use.

Two kinds of hook:

* **Observer hooks** learn what happened.  Each implementation is called on its
  own; one that raises is logged with its plugin's name and the job goes on.
* **Control hooks** change what happens.  An error raised by one propagates: the
  job fails, naming the plugin.

The job hooks are called on the runner's thread, one job at a time, in the
order of a job's life.  A registration hook (`sdjobs_register_frontends`) is
called once, before any job, to learn what a plugin offers.  An implementation
may take any subset of a hook's arguments, so arguments added later break
nobody.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from sdjobs.frontend import Frontend
    from sdjobs.polling import PollRequest, Poller
    from sdjobs.spec import JobSpec, StageSpec
    from sdjobs.status import JobState, RuntimeStatus, StageResult
    from sdjobs.store import JobRecord

PROJECT = "sdjobs"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


# -------------------------------------------------------------------------
# What a plugin offers (registration hooks)
# -------------------------------------------------------------------------


@hookspec
def sdjobs_register_frontends(register: Callable[[type[Frontend]], None]) -> None:
    """Offer front ends: call ``register(cls)`` once for each front-end class.

    Called once, on the main thread, before any job and before a front end is
    chosen; ``cls.name`` is the name ``--frontend`` chooses it by.  A plugin
    that raises here, registers something that is not a front-end class, or
    takes a name a plugin registered earlier already has (the built-ins come
    first) is reported by name and skipped, with all it offers.  The return
    value is ignored.
    """


# -------------------------------------------------------------------------
# The queue of one `sdjobs run` (observer hooks)
# -------------------------------------------------------------------------


@hookspec
def sdjobs_job_queued(job_id: str, spec: JobSpec) -> None:
    """A job was validated and queued; fires for every job before the first starts.

    Called on the thread that queues jobs (the runner's).  The return value is
    ignored; raising is logged and changes nothing.
    """


@hookspec
def sdjobs_queue_drained(outcomes: Mapping[str, JobState]) -> None:
    """Every queued job has ended, or a cancel of the whole queue stopped the rest.

    ``outcomes`` maps each job id to how it ended, in queue order; jobs that never
    ran are absent.  Fires once, last of all.  The return value is ignored;
    raising is logged and changes nothing.
    """


# -------------------------------------------------------------------------
# The durable queue, as a worker sees it (observer hooks)
# -------------------------------------------------------------------------


@hookspec
def sdjobs_queue_changed(jobs: tuple[JobRecord, ...], expected_end: float | None) -> None:
    """The queue a worker runs from changed: a job was added, moved, claimed, ended, removed.

    ``jobs`` are the jobs that have not ended, running ones too, in the order
    workers claim them (`sdjobs run`: only the jobs it added).  ``expected_end``
    is when the last of them should end (Unix time), as `sdjobs queue list`
    plans them on the worker's servers from each one's history (it fires again
    when that changes); None when unknown (no history for a server yet) or when
    none will run (all held back).  Fires when the
    worker starts and then within a second of every change, made by any
    process, on the worker's watch thread (not the runner's: job hooks may run
    at the same time).  The return value is ignored; raising is logged and
    changes nothing.
    """


@hookspec
def sdjobs_history_changed(jobs: tuple[JobRecord, ...]) -> None:
    """A job ended (or was retried or removed): ``jobs`` are the latest ended ones, latest first.

    At most `sdjobs.queue_view.HISTORY_SHOWN` jobs.  Fires as `sdjobs_queue_changed`
    does, on the worker's watch thread.  The return value is ignored; raising is
    logged and changes nothing.
    """


@hookspec
def sdjobs_queue_paused() -> None:
    """The queue was paused (`sdjobs queue pause`, a front end's button): no job starts until it resumes.

    The running job goes on, unless the pause was ``--now``.  Fires within a
    second, on the worker's watch thread; also when a worker starts on a paused
    queue.  The return value is ignored; raising is logged and changes nothing.
    """


@hookspec
def sdjobs_queue_resumed() -> None:
    """The paused queue was resumed: workers claim jobs again.

    Fires within a second, on the worker's watch thread.  The return value is
    ignored; raising is logged and changes nothing.
    """


@hookspec
def sdjobs_server_up(server: str, url: str) -> None:
    """A worker's WebUI server answers: at its first health check, and when it is back after being down.

    ``server`` is its name (`sdjobs servers`), ``url`` its address without
    credentials.  Only a worker with several servers checks their health.
    Fires on that server's health thread.  The return value is ignored; raising
    is logged and changes nothing.
    """


@hookspec
def sdjobs_server_down(server: str, url: str, error: str) -> None:
    """A worker's WebUI server stopped answering (refused, dropped, a gateway's 502/503/504, or hung).

    Fires once per outage, on that server's health thread, before its running
    job (if any) is handed back to the queue to run on another server; also
    when a server is down at the first check.  ``error`` says what the health
    check met.  The return value is ignored; raising is logged and changes nothing.
    """


# -------------------------------------------------------------------------
# One job (observer hooks)
# -------------------------------------------------------------------------


@hookspec
def sdjobs_job_started(status: RuntimeStatus, spec: JobSpec) -> None:
    """A job left the queue; its seed is known, no request has been sent yet.

    The return value is ignored; raising is logged and the job goes on.
    """


@hookspec
def sdjobs_stage_started(status: RuntimeStatus, stage: StageSpec) -> None:
    """A stage is about to send its first request.

    The return value is ignored; raising is logged and the job goes on.
    """


@hookspec
def sdjobs_progress(status: RuntimeStatus) -> None:
    """The running job's progress, step, ETA or queue position changed.

    Fires only on a change, as often as the poll interval allows.  Progress in
    consecutive calls never goes back.  The return value is ignored; raising is
    logged and the job goes on.
    """


@hookspec
def sdjobs_webui_unreachable(status: RuntimeStatus, error: str, retry_in: float, waited: float) -> None:
    """The WebUI is down (refused, dropped, a gateway's 502/503/504) and the job waits for it.

    Fires on the runner's thread each time a ping is scheduled: ``retry_in``
    seconds until it is sent, ``waited`` seconds since the server was first
    found down for this job, ``error`` the last failure.  The job fails once it
    waited `JobSettings.wait_for_webui`.  The return value is ignored; raising
    is logged and the job goes on.
    """


@hookspec
def sdjobs_stage_finished(status: RuntimeStatus, result: StageResult) -> None:
    """A stage's requests returned and its images are on disk.

    Also fires for a stage cut short by a cancel, a failure or a failed check,
    with ``result.partial`` set and the images it had, before
    `sdjobs_job_finished`.  The return value is ignored; raising is logged and
    the job goes on.
    """


@hookspec
def sdjobs_job_stalled(status: RuntimeStatus, seconds: float) -> None:
    """The running stage has shown no progress for ``seconds``, and the server's
    step and pass agree that nothing moves.

    Fires once per stall.  The return value is ignored; raising is logged and the
    job goes on.
    """


@hookspec
def sdjobs_job_finished(
    status: RuntimeStatus,
    outcome: JobState,
    error: str | None,
    results: tuple[StageResult, ...],
) -> None:
    """A job ended: ``outcome`` is ``done``, ``failed`` or ``cancelled``, or ``handed_back``
    when this attempt stopped and the job went back to the queue, to resume later.

    ``error`` says why a job failed (None otherwise); ``results`` holds every
    finished stage, partial ones too.  This is the last hook of a job (of its
    attempt, when handed back).  The return value is ignored; raising is logged.
    """


# -------------------------------------------------------------------------
# Control hooks
# -------------------------------------------------------------------------


@hookspec
def sdjobs_amend_payload(
    payload: dict[str, Any], stage: StageSpec, status: RuntimeStatus
) -> None:
    """Change a request's JSON body in place before it is sent.

    Called for every request of every stage, after sdjobs built the payload.
    The return value is ignored.  Raising fails the job, naming the plugin; no
    request is sent for the stage.
    """


@hookspec(firstresult=True)
def sdjobs_start_polling(request: PollRequest) -> Poller | None:
    """Start following a request's progress; return the running `Poller`.

    Called on the runner's thread just before a generation request is sent.  The
    first plugin to return a poller wins (the built-in polling plugin does, unless
    disabled).  The poller hands samples to ``request.report`` from its own
    thread, and the runner calls its ``stop()`` once the request returned or was
    cancelled.  Returning None leaves the request without live progress: the
    stage still ends when its request returns.  Raising fails the job.
    """
