"""The `log` front end: standard `logging` records, for files, services and CI.

One record when a job or stage starts and ends, a progress record at most every
10 % of a stage, where the live preview is (with `--preview`, once a stage;
`PreviewFiles`), a warning for a stall, a cancel or each retry of a WebUI that is
down, an error with the server's message when a job fails.  Records go to the logger ``sdjobs.jobs``; while the
session runs, one handler on the root logger writes them, the rest of sdjobs'
own records and the plugins' (`FrontendOptions.loggers`), at the level asked
for, to stderr or `FrontendOptions.log_file`.  Credentials never
reach a front end: the client keeps them out of every message.  Control
characters in a message are escaped (`printable`), so a job name cannot forge a
line; an output whose reader went away stops the session quietly (`PipeGuard`).
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Mapping
from typing import IO

from sdjobs import hookimpl
from sdjobs.frontend import FrontendError, FrontendOptions, Session
from sdjobs.frontends.formatting import (
    drained_line,
    format_duration,
    format_queue_end,
    outcome_line,
    plural,
    printable,
    stage_finished_line,
    status_line,
    unreachable_line,
    where,
)
from sdjobs.frontends.interrupt import run_with_ctrl_c
from sdjobs.frontends.ledger import JobLedger
from sdjobs.frontends.pipe import PipeGuard
from sdjobs.frontends.preview import PreviewFiles
from sdjobs.spec import JobSpec
from sdjobs.status import JobState, RuntimeStatus, StageResult
from sdjobs.store import JobRecord

log = logging.getLogger("sdjobs.jobs")


def _who(status: RuntimeStatus) -> str:
    """The job's name, and where it runs when there is a choice (`where`): `"lighthouse [desk]"`."""
    place = where(status)
    return status.name if place is None else f"{status.name} [{place}]"

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

DEFAULT_FORMAT = "%(asctime)s %(levelname)-7s %(message)s"

#: A stage's progress is logged when it reaches the next multiple of this many percent.
PROGRESS_STEP = 10

_OUTCOME_LEVELS = {JobState.DONE: logging.INFO, JobState.CANCELLED: logging.WARNING, JobState.FAILED: logging.ERROR,
                   JobState.HANDED_BACK: logging.WARNING}  # fmt: skip


def _level(name: str) -> int:
    try:
        return logging.getLevelNamesMapping()[name.upper()]
    except KeyError:
        raise FrontendError(f"unknown log level {name!r}; choose one of: {', '.join(LEVELS)}") from None


class PrintableFormatter(logging.Formatter):
    """Formats the record's line `printable`; a traceback after it keeps its own lines."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        return printable(super().formatMessage(record))


def _formatter(fmt: str | None) -> logging.Formatter:
    """A formatter for ``fmt``, tried once on a sample record: a field no record has is an error now,
    not a logging traceback on every line later."""
    try:
        formatter = PrintableFormatter(fmt or DEFAULT_FORMAT)
        formatter.format(logging.makeLogRecord({"name": "sdjobs", "msg": "a sample"}))
    except (ValueError, KeyError, TypeError) as exc:
        raise FrontendError(f"bad log format {fmt!r}: {type(exc).__name__}: {exc}") from None
    return formatter


class _GuardedHandler(logging.StreamHandler):
    """Writes to ``stream``; a closed pipe goes to the guard instead of logging's error report."""

    def __init__(self, stream: IO[str], guard: PipeGuard) -> None:
        super().__init__(stream)
        self._guard = guard

    def handleError(self, record: logging.LogRecord) -> None:
        if isinstance(sys.exception(), BrokenPipeError):
            self._guard.closed(self.stream)
        else:
            super().handleError(record)


class LogFrontend:
    """Logs each job's life; progress at most every `PROGRESS_STEP` percent of a stage."""

    name = "log"
    description = "log records on stderr or --log-file: stage starts and ends, progress every 10 %, outcomes"

    def __init__(self, options: FrontendOptions) -> None:
        self.options = options
        self.level = _level(options.log_level)
        self.formatter = _formatter(options.log_format)
        self._ledger = JobLedger()
        self._next_percent: dict[str, int] = {}  # per running job: several run at once on several servers
        self._guard = PipeGuard()
        self._waiting: tuple[list[str], float | None] | None = None  # the jobs waiting and the queue's end, as last logged
        self._preview = PreviewFiles(options.preview)
        self._preview_said: dict[str, set[int]] = {}  # by job id: the stages whose preview was logged

    def run(self, session: Session) -> int | None:
        stream = self._open_stream()
        handler = _GuardedHandler(stream, self._guard)
        handler.setFormatter(self.formatter)
        handler.setLevel(self.level)
        self._guard.watch(session)
        # On the root logger, so that a plugin's records come too; sdjobs' and the plugins'
        # loggers at the level asked for, other libraries' at their own (WARNING by default).
        loggers = [logging.getLogger(name) for name in self.options.loggers]
        previous_levels = [logger.level for logger in loggers]
        for logger in loggers:
            logger.setLevel(self.level)
        root = logging.getLogger()
        root.addHandler(handler)
        try:
            return self._guard.exit_status(run_with_ctrl_c(session, on_cancel=self._cancelling))
        finally:
            root.removeHandler(handler)
            for logger, level in zip(loggers, previous_levels, strict=True):
                logger.setLevel(level)
            handler.close()
            if stream is not sys.stderr:
                stream.close()

    def _open_stream(self) -> IO[str]:
        if self.options.log_file is None:
            return sys.stderr
        try:
            return open(self.options.log_file, "a", encoding="utf-8")  # run closes it
        except OSError as exc:
            raise FrontendError(f"{self.options.log_file}: cannot write the log there: {exc.strerror}") from None

    @staticmethod
    def _cancelling() -> None:
        log.warning("Ctrl-C: cancelling the running job, keeping its partial images; Ctrl-C again quits at once")

    @hookimpl
    def sdjobs_job_queued(self, job_id: str, spec: JobSpec) -> None:
        self._ledger.queued(job_id, spec.name)
        log.info("queued %s: %s, seed %d, id %s", spec.name, plural(len(spec.stages), "stage"), spec.seed, job_id)

    @hookimpl
    def sdjobs_job_started(self, status: RuntimeStatus) -> None:
        self._ledger.started(status.job_id)
        log.info("%s: started (job %s), seed %s", _who(status), self._ledger.number(status.job_id), status.seed)

    @hookimpl
    def sdjobs_stage_started(self, status: RuntimeStatus) -> None:
        self._next_percent[status.job_id] = PROGRESS_STEP
        log.info("%s: Stage %s started", _who(status), status.stage_label)

    @hookimpl
    def sdjobs_progress(self, status: RuntimeStatus) -> None:
        preview = self._preview.update(status)
        said = self._preview_said.setdefault(status.job_id, set())
        if preview is not None and status.stage_index not in said:
            said.add(status.stage_index)
            log.info("%s: live preview in %s (replaced as it changes)", _who(status), preview)
        if status.percent < self._next_percent.get(status.job_id, PROGRESS_STEP):
            return
        self._next_percent[status.job_id] = (status.percent // PROGRESS_STEP + 1) * PROGRESS_STEP
        log.info("%s: %s", _who(status), status_line(status))

    @hookimpl
    def sdjobs_job_stalled(self, status: RuntimeStatus, seconds: float) -> None:
        log.warning("%s: no progress for %s in stage %s", _who(status), format_duration(seconds), status.stage_label)

    @hookimpl
    def sdjobs_webui_unreachable(self, status: RuntimeStatus, error: str, retry_in: float) -> None:
        log.warning("%s: %s", _who(status), unreachable_line(error, retry_in))

    @hookimpl
    def sdjobs_stage_finished(self, status: RuntimeStatus, result: StageResult) -> None:
        log.info("%s: %s", _who(status), stage_finished_line(status, result))

    @hookimpl
    def sdjobs_job_finished(
        self, status: RuntimeStatus, outcome: JobState, error: str | None, results: tuple[StageResult, ...]
    ) -> None:
        self._preview.remove(status.job_id)
        self._preview_said.pop(status.job_id, None)
        entry = self._ledger.finished(status.job_id, outcome, results)
        self._next_percent.pop(status.job_id, None)
        log.log(_OUTCOME_LEVELS[outcome], "%s", outcome_line(_who(status), outcome, error, entry.elapsed, results))

    @hookimpl
    def sdjobs_queue_changed(self, jobs: tuple[JobRecord, ...], expected_end: float | None) -> None:
        """One record when the jobs waiting or the queue's expected end change (not when the running
        job's record does)."""
        waiting = [job for job in jobs if job.state is JobState.QUEUED]
        shown = ([job.id for job in waiting], expected_end)
        if shown != self._waiting:
            self._waiting = shown
            end = f"; {format_queue_end(expected_end, time.time())}" if jobs else ""
            log.info("queue: %s waiting%s%s", len(waiting), f", next {waiting[0].spec.name}" if waiting else "", end)

    @hookimpl
    def sdjobs_queue_paused(self) -> None:
        log.warning("queue paused: no job starts until it is resumed")

    @hookimpl
    def sdjobs_queue_resumed(self) -> None:
        log.info("queue resumed")

    @hookimpl
    def sdjobs_server_up(self, server: str, url: str) -> None:
        log.info("server %s: up at %s", server, url)

    @hookimpl
    def sdjobs_server_down(self, server: str, url: str, error: str) -> None:
        log.warning("server %s: down (%s); a job it ran goes back to the queue", server, error)

    @hookimpl
    def sdjobs_queue_drained(self, outcomes: Mapping[str, JobState]) -> None:
        log.info("%s", drained_line(outcomes, len(self._ledger.entries)))


@hookimpl
def sdjobs_register_frontends(register: Callable[[type[LogFrontend]], None]) -> None:
    """Offers `--frontend log`."""
    register(LogFrontend)
