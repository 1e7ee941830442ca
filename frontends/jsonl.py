"""The `jsonl` front end: one JSON object per event on stdout, for other programs.

Each line is flushed as it is written, so a reader sees an event when it
happens.  The fields of each event are listed in `FIELDS` and documented in
docs/frontends.md; `t` is Unix time, durations and ETAs are seconds to the
hundredth (null while unknown), progress has four decimals, paths are strings.
A reader that goes away (`| head -1`) stops the session quietly (`PipeGuard`).
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Callable, Mapping
from operator import attrgetter
from typing import Any, TextIO

from sdjobs import hookimpl
from sdjobs.frontend import FrontendOptions, Session
from sdjobs.frontends.interrupt import run_with_ctrl_c
from sdjobs.frontends.pipe import PipeGuard
from sdjobs.frontends.preview import PreviewFiles
from sdjobs.spec import JobSpec
from sdjobs.status import JobState, RuntimeStatus, StageResult
from sdjobs.store import JobRecord


def _seconds(value: float | None) -> float | None:
    """Seconds to the hundredth: finer is noise in an ETA or a stage's time."""
    return None if value is None else round(value, 2)


#: What every event that describes a running job carries, and how each field is read off the status.
_STATUS_READERS: dict[str, Callable[[RuntimeStatus], Any]] = {
    "job": attrgetter("job_id"),
    "name": attrgetter("name"),
    "stage": attrgetter("stage"),
    "stage_index": attrgetter("stage_index"),
    "stage_count": attrgetter("stage_count"),
    "progress": lambda status: round(status.progress, 4),
    "job_progress": lambda status: round(status.job_progress, 4),
    "image": lambda status: None if status.image is None else [status.image, status.images],
    "step": attrgetter("step"),
    "steps": attrgetter("steps"),
    "pass": attrgetter("pass_kind"),
    "face": lambda status: None if status.face is None else list(status.face),
    "eta": lambda status: _seconds(status.eta),
    "job_eta": lambda status: _seconds(status.job_eta),
    "seed": attrgetter("seed"),
    "queue_position": lambda status: None if status.queue_position is None else list(status.queue_position),
    "server": attrgetter("server"),
    "worker": attrgetter("worker"),
}

#: The fields of every event that describes a running job.
STATUS_FIELDS = tuple(_STATUS_READERS)

#: Every event and its fields, after `event` and `t`.
FIELDS: dict[str, tuple[str, ...]] = {
    "job_queued": ("job", "name", "stage_count", "seed"),
    "job_started": STATUS_FIELDS,
    "stage_started": STATUS_FIELDS,
    "progress": (*STATUS_FIELDS, "preview"),
    "job_stalled": (*STATUS_FIELDS, "seconds"),
    "webui_unreachable": (*STATUS_FIELDS, "error", "retry_in", "waited"),
    "stage_finished": (*STATUS_FIELDS, "images", "partial", "elapsed"),
    "job_finished": (*STATUS_FIELDS, "outcome", "error"),
    "queue_drained": ("outcomes",),
    "queue_changed": ("jobs", "expected_end"),
    "queue_paused": (),
    "queue_resumed": (),
    "server_up": ("server", "url"),
    "server_down": ("server", "url", "error"),
}


def status_fields(status: RuntimeStatus) -> dict[str, Any]:
    """`STATUS_FIELDS` of ``status``, as JSON values."""
    return {name: read(status) for name, read in _STATUS_READERS.items()}


class JsonlFrontend:
    """Writes each hook as a JSON line to ``stream`` (default: `sys.stdout` at write time)."""

    name = "jsonl"
    description = "one JSON object per event on stdout, for other programs to read"

    def __init__(self, options: FrontendOptions, stream: TextIO | None = None) -> None:
        self.options = options
        self._stream = stream
        self._guard = PipeGuard()
        self._writing = threading.Lock()  # queue events come on the worker's watch thread
        self._preview = PreviewFiles(options.preview)

    def run(self, session: Session) -> int | None:
        self._guard.watch(session)
        return self._guard.exit_status(run_with_ctrl_c(session))

    def _write(self, event: str, **fields: Any) -> None:
        stream = self._stream or sys.stdout
        try:
            with self._writing:
                stream.write(json.dumps({"event": event, "t": time.time(), **fields}) + "\n")
                stream.flush()
        except BrokenPipeError:
            self._guard.closed(stream)

    @hookimpl
    def sdjobs_job_queued(self, job_id: str, spec: JobSpec) -> None:
        self._write("job_queued", job=job_id, name=spec.name, stage_count=len(spec.stages), seed=spec.seed)

    @hookimpl
    def sdjobs_job_started(self, status: RuntimeStatus) -> None:
        self._write("job_started", **status_fields(status))

    @hookimpl
    def sdjobs_stage_started(self, status: RuntimeStatus) -> None:
        self._write("stage_started", **status_fields(status))

    @hookimpl
    def sdjobs_progress(self, status: RuntimeStatus) -> None:
        preview = self._preview.update(status)
        self._write("progress", **status_fields(status), preview=None if preview is None else str(preview))

    @hookimpl
    def sdjobs_job_stalled(self, status: RuntimeStatus, seconds: float) -> None:
        self._write("job_stalled", **status_fields(status), seconds=_seconds(seconds))

    @hookimpl
    def sdjobs_webui_unreachable(self, status: RuntimeStatus, error: str, retry_in: float, waited: float) -> None:
        self._write(
            "webui_unreachable", **status_fields(status), error=error, retry_in=_seconds(retry_in), waited=_seconds(waited)
        )

    @hookimpl
    def sdjobs_stage_finished(self, status: RuntimeStatus, result: StageResult) -> None:
        self._write(
            "stage_finished",
            **status_fields(status),
            images=[str(path) for path in result.images],
            partial=result.partial,
            elapsed=_seconds(result.elapsed),
        )

    @hookimpl
    def sdjobs_job_finished(self, status: RuntimeStatus, outcome: JobState, error: str | None) -> None:
        self._preview.remove(status.job_id)
        self._write("job_finished", **status_fields(status), outcome=outcome.value, error=error)

    @hookimpl
    def sdjobs_queue_drained(self, outcomes: Mapping[str, JobState]) -> None:
        self._write("queue_drained", outcomes={job: outcome.value for job, outcome in outcomes.items()})

    @hookimpl
    def sdjobs_queue_changed(self, jobs: tuple[JobRecord, ...], expected_end: float | None) -> None:
        self._write("queue_changed", jobs=[job.id for job in jobs], expected_end=expected_end)

    @hookimpl
    def sdjobs_queue_paused(self) -> None:
        self._write("queue_paused")

    @hookimpl
    def sdjobs_queue_resumed(self) -> None:
        self._write("queue_resumed")

    @hookimpl
    def sdjobs_server_up(self, server: str, url: str) -> None:
        self._write("server_up", server=server, url=url)

    @hookimpl
    def sdjobs_server_down(self, server: str, url: str, error: str) -> None:
        self._write("server_down", server=server, url=url, error=error)


@hookimpl
def sdjobs_register_frontends(register: Callable[[type[JsonlFrontend]], None]) -> None:
    """Offers `--frontend jsonl`."""
    register(JsonlFrontend)
