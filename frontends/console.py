"""The `console` front end: a live display per running job, for a person at a terminal.

While a job runs, rich redraws (at most `REFRESH_PER_SECOND` times a second) its
status line, a bar for the stage and one for the job (with several servers
running jobs at once: one status line per busy server instead), and with
`--preview` where the live preview is (`preview.png` in the job's folder); while the WebUI is down,
a line under them counts down to the next ping (and a line is printed when it
goes down).  Each finished stage leaves a line with its time and images; the
end leaves a summary table.  The first Ctrl-C cancels the running job (its
stage's partial images are kept) and runs no further job; a second one leaves
at once.  Without a terminal, rich draws nothing live and writes no escape
codes: only the lines and the table.  Names and messages are shown
`printable`; a reader that goes away (`| head -1`) stops the session quietly
(`PipeGuard`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from sdjobs import hookimpl
from sdjobs.frontend import FrontendOptions, Session
from sdjobs.frontends.formatting import (
    format_duration,
    format_eta,
    format_queue_end,
    outcome_line,
    outcome_text,
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

REFRESH_PER_SECOND = 10
BAR_WIDTH = 40

OUTCOME_STYLES = {JobState.DONE: "green", JobState.FAILED: "red", JobState.CANCELLED: "yellow",
                  JobState.HANDED_BACK: "yellow"}  # fmt: skip

CANCELLING = "Ctrl-C: cancelling the running job, keeping its partial images; no further job runs. Ctrl-C again quits at once."


class GuardedConsole(Console):
    """A rich `Console` that, when its reader goes away, goes quiet and tells the guard (rich would exit)."""

    def __init__(self, guard: PipeGuard) -> None:
        super().__init__()
        self._guard = guard

    def on_broken_pipe(self) -> None:
        self.quiet = True
        self._guard.closed(self.file)


class ConsoleFrontend:
    """Shows jobs on ``console`` (default: a `GuardedConsole` on stdout)."""

    name = "console"
    description = "a live display per running job, a line per finished stage, a summary table"

    def __init__(self, options: FrontendOptions, console: Console | None = None) -> None:
        self.options = options
        self._guard = PipeGuard()
        self.console = console or GuardedConsole(self._guard)
        self._ledger = JobLedger()
        self._running: dict[str, RuntimeStatus] = {}  # by job id: several run at once on several servers
        self._live: Live | None = None
        self._living = threading.Lock()  # jobs start and end on their servers' threads
        self._cancelling = False
        self._waiting: int | None = None  # jobs queued behind the running one; None outside a worker
        self._queue_end: float | None = None  # when the last of them should end (Unix time), if known
        self._down: tuple[str, float, float] | None = None  # the WebUI's error, down since, next ping (monotonic)
        self._preview = PreviewFiles(options.preview)

    def run(self, session: Session) -> int | None:
        self._guard.watch(session)
        try:
            return self._guard.exit_status(run_with_ctrl_c(session, on_cancel=self._cancel_requested))
        finally:
            self._stop_live()

    def _cancel_requested(self) -> None:
        # Called in the signal handler: only set a flag; the live view and the
        # job's last line say it.
        self._cancelling = True

    def view(self) -> RenderableType:
        """What the live display shows now: the status line, the two bars, and whether the WebUI is down;
        with several servers, one line per busy server."""
        running = list(self._running.values())
        if not running:
            return Text("")
        waiting = "" if self._waiting is None else f" · {self._waiting} queued"
        if (end := self._queue_end) is not None:
            waiting += f" · {format_queue_end(end, time.time())}"
        if len(running) > 1 or where(running[0]) is not None:
            lines: list[RenderableType] = [self._server_line(status) for status in running]
            lines += self._preview_lines(running)
            if waiting:
                lines.append(Text(waiting.removeprefix(" · ")))
            if self._cancelling:
                lines.append(Text(CANCELLING, style="yellow"))
            return Group(*lines)
        [status] = running
        bars = Table.grid(padding=(0, 1))
        bars.add_row("stage", ProgressBar(total=1.0, completed=status.progress, width=BAR_WIDTH), f"{status.percent}%")
        bars.add_row(
            "job",
            ProgressBar(total=1.0, completed=status.job_progress, width=BAR_WIDTH),
            f"{int(status.job_progress * 100)}% · ETA {format_eta(status.job_eta)}",
        )
        lines = [Text.assemble((printable(status.name), "bold"), "  ", status_line(status), waiting), bars]
        lines += self._preview_lines(running)
        if (down := self._down) is not None:
            error, since, ping_at = down
            now = time.monotonic()
            retry = f"retrying in {format_duration(max(0.0, ping_at - now))}"
            lines.append(Text(printable(f"WebUI unreachable for {format_duration(now - since)} ({error}) · {retry}"), style="yellow"))
        if self._cancelling:
            lines.append(Text(CANCELLING, style="yellow"))
        return Group(*lines)

    def _preview_lines(self, running: list[RuntimeStatus]) -> list[RenderableType]:
        """`live preview: outputs/.../preview.png` for each running job that has one (`--preview`)."""
        paths = [(status, self._preview.path(status.job_id)) for status in running]
        name = len(running) > 1
        return [
            Text(printable(f"live preview{f' ({status.name})' if name else ''}: {path}"), style="dim")
            for status, path in paths
            if path is not None
        ]

    @staticmethod
    def _server_line(status: RuntimeStatus) -> Text:
        """`desk  lighthouse  Stage 2/3 img2img · 40% · ... · job 61% · ETA 12s`."""
        job = f" · job {int(status.job_progress * 100)}% · ETA {format_eta(status.job_eta)}"
        return Text.assemble((printable(where(status) or ""), "cyan"), "  ", (printable(status.name), "bold"), "  ", status_line(status), job)

    def _say(self, text: Text) -> None:
        """One line above the live view; the terminal wraps it, so paths stay whole for copying."""
        self.console.print(text, soft_wrap=True)

    def _start_live(self) -> None:
        with self._living:
            if self._live is not None:
                return
            self._live = Live(
                get_renderable=self.view,
                console=self.console,
                refresh_per_second=REFRESH_PER_SECOND,
                transient=True,
            )
            self._live.start()

    def _stop_live(self) -> None:
        with self._living:
            if self._live is not None:
                self._live.stop()
                self._live = None

    @hookimpl
    def sdjobs_job_queued(self, job_id: str, spec: JobSpec) -> None:
        self._ledger.queued(job_id, spec.name)

    @hookimpl
    def sdjobs_job_started(self, status: RuntimeStatus) -> None:
        self._ledger.started(status.job_id)
        self._show(status)
        on = "" if where(status) is None else f" · on {printable(where(status) or '')}"
        self._say(
            Text.assemble(
                (printable(status.name), "bold"),
                f" (job {self._ledger.number(status.job_id)}) · {plural(status.stage_count, 'stage')} · seed {status.seed}{on}",
            )
        )
        self._start_live()

    def _show(self, status: RuntimeStatus) -> None:
        """A new status: the job moves again, so the WebUI is no longer shown as down."""
        self._running[status.job_id], self._down = status, None

    @hookimpl
    def sdjobs_stage_started(self, status: RuntimeStatus) -> None:
        self._show(status)

    @hookimpl
    def sdjobs_progress(self, status: RuntimeStatus) -> None:
        self._preview.update(status)
        self._show(status)

    @hookimpl
    def sdjobs_webui_unreachable(self, error: str, retry_in: float, waited: float) -> None:
        """A line when the WebUI goes down; the live view counts down to each ping."""
        if self._down is None:
            self._say(Text("  " + unreachable_line(error, retry_in), style="yellow"))
        now = time.monotonic()
        self._down = (error, now - waited, now + retry_in)

    @hookimpl
    def sdjobs_job_stalled(self, status: RuntimeStatus, seconds: float) -> None:
        self._say(
            Text(printable(f"  no progress for {format_duration(seconds)} in stage {status.stage_label}"), style="yellow")
        )

    @hookimpl
    def sdjobs_stage_finished(self, status: RuntimeStatus, result: StageResult) -> None:
        self._show(status)
        mark, style = ("✗", "yellow") if result.partial else ("✓", "green")
        self._say(Text.assemble("  ", (mark, style), " ", stage_finished_line(status, result)))

    @hookimpl
    def sdjobs_job_finished(
        self, status: RuntimeStatus, outcome: JobState, error: str | None, results: tuple[StageResult, ...]
    ) -> None:
        self._running.pop(status.job_id, None)
        self._preview.remove(status.job_id)
        self._down = None
        if not self._running:
            self._stop_live()
        entry = self._ledger.finished(status.job_id, outcome, results)
        line = outcome_line(status.name, outcome, error, entry.elapsed, results)
        self._say(Text(line, style=OUTCOME_STYLES[outcome]))
        if outcome is JobState.CANCELLED and self._cancelling:
            self._say(Text("Cancelled with Ctrl-C: no further job runs.", style="yellow"))

    @hookimpl
    def sdjobs_queue_changed(self, jobs: tuple[JobRecord, ...], expected_end: float | None) -> None:
        # one assignment each: read by the live view's thread
        self._queue_end = expected_end
        self._waiting = sum(job.state is JobState.QUEUED for job in jobs)

    @hookimpl
    def sdjobs_server_up(self, server: str, url: str) -> None:
        self._say(Text(printable(f"server {server} is up ({url})"), style="green"))

    @hookimpl
    def sdjobs_server_down(self, server: str, error: str) -> None:
        self._say(Text(printable(f"server {server} is down ({error}); a job it ran goes back to the queue"), style="yellow"))

    @hookimpl
    def sdjobs_queue_drained(self, outcomes: Mapping[str, JobState]) -> None:
        self.console.print(self.summary())

    def summary(self) -> Table:
        """The table printed at the end: each job, how it ended, its images and time."""
        table = Table(title="Summary", title_justify="left")
        table.add_column("job")
        table.add_column("outcome")
        table.add_column("images", justify="right")
        table.add_column("time", justify="right")
        for entry in self._ledger.entries.values():
            if entry.outcome is None:
                table.add_row(Text(printable(entry.name)), Text("not run", style="dim"), "", "")
            else:
                table.add_row(
                    Text(printable(entry.name)),
                    Text(outcome_text(entry.outcome), style=OUTCOME_STYLES[entry.outcome]),
                    str(entry.images),
                    format_duration(entry.elapsed),
                )
        return table


@hookimpl
def sdjobs_register_frontends(register: Callable[[type[ConsoleFrontend]], None]) -> None:
    """Offers `--frontend console`."""
    register(ConsoleFrontend)
