"""The `tk` front end: a window with the running job's panel, the queue and its history.

Tk belongs to one thread.  `run` opens the window on the main thread and runs
the session on a worker thread; the hooks, called on the worker, only put
calls on a queue (`call_soon`) that the main thread drains every
`DRAIN_INTERVAL_MS` with `after()`.  "Cancel" cancels the running job and the
next one starts; "Cancel after this stage" lets the running stage finish.
"Pause queue" and "Resume queue" work where the session is a `QueueControl`
(a worker), on a thread of their own, as the store may wait for a lock; a
double-click on a job of the history, or "Open folder" under the running (or
last) job, opens its folder with the desktop's opener (`open_path`; the button
is disabled where the desktop has none).
Closing the window (or Ctrl-C) while a job runs cancels everything, waits for
the running job to stop while the window stays responsive, and closes.  When every job has ended,
the window stays open showing how, until it is closed, or closes by itself with
`FrontendOptions.close_when_done`.
"""

from __future__ import annotations

import gc
import logging
import os
import queue
import shutil
import subprocess
import sys
import threading
import time
import tkinter as tk
from collections.abc import Callable, Mapping
from pathlib import Path

import attrs

from sdjobs import hookimpl
from sdjobs.exits import EXIT_CANCELLED
from sdjobs.frontend import FrontendOptions, FrontendUnavailable, QueueControl, Session
from sdjobs.frontends.formatting import drained_line, format_queue_end
from sdjobs.frontends.interrupt import ctrl_c_cancels
from sdjobs.frontends.ledger import JobLedger
from sdjobs.frontends.tk_panel import JobPanel
from sdjobs.spec import JobSpec
from sdjobs.status import CancelMode, JobState, RuntimeStatus, StageResult
from sdjobs.store import JobRecord

log = logging.getLogger(__name__)

#: How often the window takes the hooks' calls off the queue.
DRAIN_INTERVAL_MS = 50

#: How long a closed window waits for the running job to stop before leaving it behind.
CLOSE_TIMEOUT = 10.0

PanelCall = Callable[[JobPanel], object]
Opener = Callable[[Path], object]


def open_path(path: Path) -> None:
    """Open ``path`` as the desktop does (a folder in the file manager), without waiting for it.

    A desktop without an opener (no `xdg-open`) is logged, not raised: the window goes on.
    """
    try:
        if sys.platform == "win32":
            os.startfile(path)  # type: ignore[attr-defined]  # Windows only
        else:
            command = "open" if sys.platform == "darwin" else "xdg-open"
            subprocess.Popen(
                [command, os.fspath(path)],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
            )  # fmt: skip
    except OSError as exc:
        log.warning("cannot open %s: %s", path, exc)


def desktop_can_open() -> bool:
    """Whether `open_path` has a command to run here: Windows and macOS do, Linux with `xdg-open`."""
    return sys.platform in ("win32", "darwin") or shutil.which("xdg-open") is not None


@attrs.frozen
class _InBackground:
    """A session's `QueueControl`, called on a short-lived thread so the window never waits on the store."""

    control: QueueControl

    def pause_queue(self, *, now: bool = False) -> None:
        self._start(lambda: self.control.pause_queue(now=now))

    def resume_queue(self) -> None:
        self._start(self.control.resume_queue)

    @staticmethod
    def _start(call: Callable[[], None]) -> None:
        def run() -> None:
            try:
                call()
            except Exception:  # a locked store, say: the buttons stay as they were
                log.exception("the queue could not be paused or resumed")

        threading.Thread(target=run, name="sdjobs-queue-control", daemon=True).start()


def open_window() -> tk.Tk:
    """The main window; `FrontendUnavailable` where there is no display to open it on."""
    try:
        root = tk.Tk(className="sdjobs")
    except tk.TclError as exc:
        raise FrontendUnavailable(
            f"the tk front end cannot open a window ({exc}); "
            "run it where there is a display, or choose another with --frontend (console, log, jsonl)"
        ) from None
    root.title("sdjobs")
    return root


class _SessionThread(threading.Thread):
    """Runs the session off the Tk thread and keeps what it raised.  Holds nothing of Tk."""

    def __init__(self, session: Session) -> None:
        super().__init__(name="sdjobs-session", daemon=True)
        self.session = session
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.session.run()
        except BaseException as exc:  # re-raised on the main thread once the window closed
            self.error = exc


@attrs.define(eq=False)
class _Window:
    """One run of the front end: the window, the session's thread and the queue between them."""

    root: tk.Tk
    panel: JobPanel
    session: Session
    calls: queue.SimpleQueue[PanelCall]
    close_when_done: bool
    worker: _SessionThread = attrs.field(init=False)
    closing_since: float | None = None
    quit_at_once: bool = False
    _after_id: str | None = None

    def run(self) -> int | None:
        self.root.protocol("WM_DELETE_WINDOW", self.close)
        self.worker = _SessionThread(self.session)
        self.worker.start()
        self._after_id = self.root.after(DRAIN_INTERVAL_MS, self._drain)
        with ctrl_c_cancels(self.session, on_cancel=self._close_soon, on_quit=self._quit_at_once):
            self.root.mainloop()
        if self._after_id is not None:
            self.root.after_cancel(self._after_id)
        self.root.destroy()
        if self.quit_at_once:
            return EXIT_CANCELLED
        if self.worker.is_alive():  # closed, and the job did not stop in time
            log.warning("the running job did not stop within %ss; leaving it behind", CLOSE_TIMEOUT)
            return EXIT_CANCELLED
        if self.worker.error is not None:
            raise self.worker.error
        return None

    def close(self) -> None:
        """The window's close button: cancel everything, then quit once the job stopped.

        Once the session has run every job there is nothing to cancel: the
        window just closes, and the run keeps the exit status of its jobs.
        """
        if self.closing_since is not None:
            return
        self.closing_since = time.monotonic()
        if self.worker.is_alive():
            self.session.cancel(CancelMode.NOW, rest=True)
            self.panel.show_closing()

    def _close_soon(self) -> None:
        """The first Ctrl-C: close as the close button does, once back in the event loop."""
        self.calls.put(lambda panel: self.close())

    def _quit_at_once(self) -> None:
        """The second Ctrl-C: leave the event loop now, without waiting for the job."""
        self.quit_at_once = True
        self.root.quit()

    def _drain(self) -> None:
        while True:
            try:
                call = self.calls.get_nowait()
            except queue.Empty:
                break
            try:
                call(self.panel)
            except Exception:  # the window is an observer: a bad update must not end it
                log.exception("the Tk panel failed to show an event")
        if self._finished():
            self._after_id = None
            self.root.quit()
        else:
            self._after_id = self.root.after(DRAIN_INTERVAL_MS, self._drain)

    def _finished(self) -> bool:
        if self.worker.is_alive():
            return self.closing_since is not None and time.monotonic() - self.closing_since > CLOSE_TIMEOUT
        # A session that raised ends the window too, so its error is not hidden behind it.
        return self.closing_since is not None or self.close_when_done or self.worker.error is not None


class TkFrontend:
    """The running-job panel in a Tk window."""

    name = "tk"
    description = "a window with the running job's progress, the queue, its history and Cancel and Pause buttons"

    def __init__(self, options: FrontendOptions, *, opener: Opener = open_path) -> None:
        self.options = options
        self._opener = opener  # what a double-click on the history calls; tests pass their own
        self._calls: queue.SimpleQueue[PanelCall] = queue.SimpleQueue()
        self._ledger = JobLedger()  # fed on the session's thread only

    def call_soon(self, call: PanelCall) -> None:
        """Have ``call(panel)`` run on the Tk thread; safe from any thread.

        The hooks reach the window only this way, in order, so a call made after
        a hook sees the panel as that hook left it.
        """
        self._calls.put(call)

    def run(self, session: Session) -> int | None:
        root = open_window()
        control = _InBackground(session) if isinstance(session, QueueControl) else None
        panel = JobPanel(
            root,
            on_cancel=session.cancel,
            on_open=self._opener,
            control=control,
            preview=self.options.preview,
            can_open=self._opener is not open_path or desktop_can_open(),
        )
        panel.pack(fill="both", expand=True)
        try:
            return _Window(root, panel, session, self._calls, self.options.close_when_done).run()
        finally:
            # Tk objects must die on this thread: if a cycle kept one alive, the
            # garbage collector could free it on another thread, and Tcl aborts.
            del root, panel
            gc.collect()

    def _show_queue(self) -> None:
        """What the runner knows waits; shown until a worker tells what the store holds."""
        jobs = [(entry.name, str(JobState.QUEUED)) for entry in self._ledger.waiting()]
        self.call_soon(lambda panel: panel.show_queue(jobs, durable=False))

    @hookimpl
    def sdjobs_job_queued(self, job_id: str, spec: JobSpec) -> None:
        self._ledger.queued(job_id, spec.name)
        self._show_queue()

    @hookimpl
    def sdjobs_job_started(self, status: RuntimeStatus) -> None:
        self._ledger.started(status.job_id)
        number = self._ledger.number(status.job_id)
        self.call_soon(lambda panel: panel.show_job_started(status, number))
        self._show_queue()
        self._show_on_server(status)

    def _show_on_server(self, status: RuntimeStatus, *, ended: bool = False) -> None:
        """With several servers: the row of the server the job runs on."""
        if status.server is not None:
            self.call_soon(lambda panel: panel.show_server_job(status, ended=ended))

    @hookimpl
    def sdjobs_stage_started(self, status: RuntimeStatus) -> None:
        self.call_soon(lambda panel: panel.show_progress(status))
        self._show_on_server(status)

    @hookimpl
    def sdjobs_progress(self, status: RuntimeStatus) -> None:
        self.call_soon(lambda panel: panel.show_progress(status))
        self._show_on_server(status)

    @hookimpl
    def sdjobs_job_stalled(self, status: RuntimeStatus, seconds: float) -> None:
        self.call_soon(lambda panel: panel.show_stalled(status, seconds))

    @hookimpl
    def sdjobs_webui_unreachable(self, error: str, retry_in: float, waited: float) -> None:
        self.call_soon(lambda panel: panel.show_unreachable(error, retry_in, waited))

    @hookimpl
    def sdjobs_stage_finished(self, status: RuntimeStatus, result: StageResult) -> None:
        self.call_soon(lambda panel: panel.show_stage_finished(status, result))
        self._show_on_server(status)

    @hookimpl
    def sdjobs_job_finished(
        self, status: RuntimeStatus, outcome: JobState, error: str | None, results: tuple[StageResult, ...]
    ) -> None:
        images = self._ledger.finished(status.job_id, outcome, results).images
        self.call_soon(lambda panel: panel.show_job_finished(status, outcome, error, images))
        self._show_on_server(status, ended=True)

    @hookimpl
    def sdjobs_queue_changed(self, jobs: tuple[JobRecord, ...], expected_end: float | None) -> None:
        rows = [(job.spec.name, job.shown_state) for job in jobs]
        end = format_queue_end(expected_end, time.time()) if jobs else ""
        self.call_soon(lambda panel: (panel.show_queue(rows), panel.show_queue_end(end)))

    @hookimpl
    def sdjobs_history_changed(self, jobs: tuple[JobRecord, ...]) -> None:
        self.call_soon(lambda panel: panel.show_history(jobs))

    @hookimpl
    def sdjobs_queue_paused(self) -> None:
        self.call_soon(lambda panel: panel.show_queue_paused(True))

    @hookimpl
    def sdjobs_queue_resumed(self) -> None:
        self.call_soon(lambda panel: panel.show_queue_paused(False))

    @hookimpl
    def sdjobs_server_up(self, server: str) -> None:
        self.call_soon(lambda panel: panel.show_server(server, up=True))

    @hookimpl
    def sdjobs_server_down(self, server: str) -> None:
        self.call_soon(lambda panel: panel.show_server(server, up=False))

    @hookimpl
    def sdjobs_queue_drained(self, outcomes: Mapping[str, JobState]) -> None:
        summary = drained_line(outcomes, len(self._ledger.entries))
        self.call_soon(lambda panel: panel.show_drained(summary))


@hookimpl
def sdjobs_register_frontends(register: Callable[[type[TkFrontend]], None]) -> None:
    """Offers `--frontend tk`."""
    register(TkFrontend)
