"""`JobPanel`: the running-job panel of the Tk front end, with the queue and its history.

A plain Tk widget fed with `RuntimeStatus` values and the store's `JobRecord`s:
it knows nothing of threads or queues.  Every method must be called on the
thread that made the window.
"""

from __future__ import annotations

import logging
import math
import tkinter as tk
from collections.abc import Callable, Sequence
from pathlib import Path
from tkinter import ttk

from sdjobs.frontends.formatting import (
    CALCULATING,
    format_duration,
    format_eta,
    format_image,
    format_pass,
    format_seed,
    format_step,
    images_text,
    printable,
)
from sdjobs.frontend import QueueControl
from sdjobs.status import CancelMode, JobState, RuntimeStatus, StageResult
from sdjobs.store import JobRecord

log = logging.getLogger(__name__)

#: The live preview is shrunk to fit a square of this many pixels.
PREVIEW_SIZE = 256

OUTCOME_TEXT = {JobState.DONE: "Done", JobState.FAILED: "Failed", JobState.CANCELLED: "Cancelled",
                JobState.HANDED_BACK: "Handed back to the queue"}  # fmt: skip


#: Rows each of the queue and history lists shows; more scroll.
LIST_ROWS = 4


def _list(master: tk.Misc, columns: dict[str, int], **options: object) -> ttk.Treeview:
    """A list of rows under column headings; ``columns`` maps each heading to its width."""
    tree = ttk.Treeview(master, columns=tuple(columns), show="headings", height=LIST_ROWS, **options)
    for heading, width in columns.items():
        tree.heading(heading, text=heading, anchor="w")
        tree.column(heading, width=width, stretch=heading in ("Name", "Folder"))
    return tree


class JobPanel(ttk.Frame):
    """Job name, stage, the stage's and the job's progress bars, state, ETA, seed, image, step,
    preview, the output folder with Open folder, Cancel buttons; the queue with Pause and Resume
    buttons; the history; with several servers, a row per server with its running job's stage
    and progress.

    ``on_cancel`` is called with the `CancelMode` of the button pressed.  With
    ``preview``, the server's live preview is shown when a status carries one.
    ``control`` is what Pause and Resume call; without it they stay disabled.
    Open folder (enabled once the job's folder exists, where ``can_open``), and a
    double-click (or Return) on a job of the history, call ``on_open`` with the
    job's output folder.
    """

    def __init__(
        self,
        master: tk.Misc,
        *,
        on_cancel: Callable[[CancelMode], object],
        on_open: Callable[[Path], object],
        control: QueueControl | None = None,
        preview: bool = False,
        can_open: bool = True,
    ) -> None:
        super().__init__(master, padding=12)
        self._on_cancel = on_cancel
        self._on_open = on_open
        self._control = control
        self._durable_queue = False  # the store's queue has been shown: the runner's guess is not
        self._folders: dict[str, Path] = {}  # history row -> its job's output folder
        self._shows_preview = preview
        self._preview_data: str | None = None
        self._preview_image: tk.PhotoImage | None = None
        self._cancelling: str | None = None  # what the state line adds once a Cancel was pressed
        self._can_open = can_open
        self._folder: Path | None = None  # the running (or last) job's output folder

        self.job_name = ttk.Label(self, text="Waiting for the first job...", font="TkHeadingFont")
        self.stage = ttk.Label(self, text="Stage: -")
        self.bar = ttk.Progressbar(self, maximum=100, length=360, mode="determinate")
        job_row = ttk.Frame(self)
        self.job_bar = ttk.Progressbar(job_row, maximum=100, length=200, mode="determinate")
        self.job_text = ttk.Label(job_row, text=f"Job: 0% · ETA {CALCULATING}")
        self.state = ttk.Label(self, text="Waiting")
        self.eta = ttk.Label(self, text=f"ETA: {CALCULATING}")
        self.seed = ttk.Label(self, text=f"Seed: {CALCULATING}")
        self.image = ttk.Label(self, text="Image: -")
        self.step = ttk.Label(self, text="Step: -")
        self.preview = ttk.Label(self)
        folder_row = ttk.Frame(self)
        self.folder = ttk.Label(folder_row, text="Folder: -")
        self.open_button = ttk.Button(folder_row, text="Open folder", command=self._open_folder)
        queue_bar = ttk.Frame(self)
        self.queue_label = ttk.Label(queue_bar, text="Queue:")
        self.queue_end = ttk.Label(queue_bar, text="")
        self.pause_button = ttk.Button(queue_bar, text="Pause queue", command=lambda: self._pause(True))
        self.resume_button = ttk.Button(queue_bar, text="Resume queue", command=lambda: self._pause(False))
        self.servers = _list(self, {"Server": 90, "State": 50, "Job": 130, "Stage": 90, "Progress": 60}, selectmode="none")
        self._server_rows: dict[str, str] = {}  # server name -> its row
        self.queued = _list(self, {"#": 40, "Name": 220, "State": 90}, selectmode="none")
        self.history = _list(self, {"Outcome": 90, "Name": 150, "Folder": 220}, selectmode="browse")
        self.history.bind("<Double-Button-1>", lambda event: self._open(self.history.identify_row(event.y)))
        self.history.bind("<Return>", lambda event: self._open(self.history.focus()))
        buttons = ttk.Frame(self)
        self.cancel_button = ttk.Button(buttons, text="Cancel", command=lambda: self._cancel(CancelMode.NOW))
        self.cancel_after_stage_button = ttk.Button(
            buttons, text="Cancel after this stage", command=lambda: self._cancel(CancelMode.AFTER_STAGE)
        )

        rows: list[tk.Widget] = [
            self.job_name, self.stage, self.bar, job_row, self.state, self.eta, self.seed, self.image, self.step
        ]
        if preview:
            rows.append(self.preview)
        rows += [folder_row, self.servers]
        history_label = ttk.Label(self, text="History (double-click opens the folder):")
        rows += [queue_bar, self.queued, history_label, self.history, buttons]
        for row, widget in enumerate(rows):
            widget.grid(row=row, column=0, sticky="we", pady=2)
        self.preview.grid_remove()  # no blank gap in the window until a preview comes
        self.servers.grid_remove()  # shown once a worker with several servers names one
        self.columnconfigure(0, weight=1)
        self.job_text.pack(side="left")
        self.job_bar.pack(side="right", fill="x", expand=True, padx=(8, 0))
        self.folder.pack(side="left", fill="x", expand=True)
        self.open_button.pack(side="right", padx=(8, 0))
        self.open_button.state(["disabled"])
        self.cancel_button.pack(side="left")
        self.cancel_after_stage_button.pack(side="left", padx=(8, 0))
        self.queue_label.pack(side="left")
        self.queue_end.pack(side="left", padx=(8, 0))
        self.resume_button.pack(side="right")
        self.pause_button.pack(side="right", padx=(0, 8))
        self._enable_cancel(False)
        self.show_queue_paused(False)

    # -- what the hooks bring ----------------------------------------------------------

    def show_queue(self, jobs: Sequence[tuple[str, str]], *, durable: bool = True) -> None:
        """The queue in the order its jobs run, as (name, state) pairs, numbered from 1.

        ``durable``: from the store (a worker's `sdjobs_queue_changed`).  Once that
        has come, the runner's own list of what waits (``durable=False``) is
        ignored: the store knows of every process's changes.
        """
        if durable:
            self._durable_queue = True
        elif self._durable_queue:
            return
        self.queued.delete(*self.queued.get_children())
        for position, (name, state) in enumerate(jobs, 1):
            self.queued.insert("", "end", values=(position, printable(name), state))

    def show_queue_end(self, text: str) -> None:
        """When the queue's last job should end (`format_queue_end`), beside the queue's title."""
        self.queue_end.configure(text=text)

    def show_history(self, jobs: Sequence[JobRecord]) -> None:
        """The latest ended jobs, latest first: outcome, name and output folder."""
        self.history.delete(*self.history.get_children())
        self._folders.clear()
        for job in jobs:
            item = self.history.insert(
                "", "end", values=(OUTCOME_TEXT[job.state], printable(job.spec.name), printable(str(job.folder or "-")))
            )
            if job.folder is not None:
                self._folders[item] = job.folder

    def show_queue_paused(self, paused: bool) -> None:
        """The queue was paused or resumed: the button that undoes it is the one enabled."""
        self.queue_label.configure(text="Queue (paused: no job starts):" if paused else "Queue:")
        can = self._control is not None
        self.pause_button.state(["!disabled" if can and not paused else "disabled"])
        self.resume_button.state(["!disabled" if can and paused else "disabled"])

    def show_server(self, server: str, up: bool) -> None:
        """A server of a worker with several came up or went down; its row shows it."""
        self._server_row(server, State="up" if up else "down")

    def show_server_job(self, status: RuntimeStatus, *, ended: bool = False) -> None:
        """The job running on ``status.server``, its stage and progress; idle once it ``ended``."""
        if status.server is None:
            return
        if ended:
            self._server_row(status.server, Job="-", Stage="-", Progress="-")
        else:
            self._server_row(status.server, Job=printable(status.name), Stage=status.stage_label, Progress=f"{status.percent}%")

    def show_job_started(self, status: RuntimeStatus, number: str) -> None:
        self.winfo_toplevel().title(f"sdjobs: {printable(status.name)} ({number})")
        self.job_name.configure(text=printable(status.name))
        self._cancelling = None
        self._show_status(status)
        self.state.configure(text="Starting")
        self._enable_cancel(True)

    def show_progress(self, status: RuntimeStatus) -> None:
        self._show_status(status)

    def show_stalled(self, status: RuntimeStatus, seconds: float) -> None:
        self.state.configure(text=f"Stalled: no progress for {format_duration(seconds)} ({status.percent}%)")

    def show_unreachable(self, error: str, retry_in: float, waited: float) -> None:
        """The WebUI is down and the job waits for it; the next progress shows it running again."""
        self.state.configure(
            text=printable(f"WebUI unreachable for {format_duration(waited)} ({error}): retrying in {format_duration(retry_in)}")
        )

    def show_stage_finished(self, status: RuntimeStatus, result: StageResult) -> None:
        self._show_status(status)
        verb = "cut short" if result.partial else "finished"
        images = images_text(len(result.images), partial=result.partial)
        self.state.configure(text=printable(f"Stage {status.stage_label} {verb}: {images}"))

    def show_job_finished(self, status: RuntimeStatus, outcome: JobState, error: str | None, images: int) -> None:
        """The outcome, the images and where they are (the folder stays shown until the next job's)."""
        self._enable_cancel(False)
        ended = f"{OUTCOME_TEXT[outcome]}: {images_text(images)}"
        self.state.configure(text=printable(f"{ended} · {error}") if error else ended)
        self._show_folder(status.folder)
        if outcome is JobState.DONE:
            self.bar.configure(value=100)
            self.job_bar.configure(value=100)
            self.eta.configure(text=f"ETA: {format_duration(0)}")
            self.job_text.configure(text=f"Job: 100% · ETA {format_duration(0)}")

    def show_drained(self, summary: str) -> None:
        """Every job ended: the window shows how, until it is closed."""
        self.winfo_toplevel().title("sdjobs: finished")
        self.job_name.configure(text="Finished")
        self.state.configure(text=summary)
        self.show_queue([])  # jobs a cancel left unrun wait no more
        self._enable_cancel(False)

    def show_closing(self) -> None:
        self._enable_cancel(False)
        self.state.configure(text="Closing: stopping the running job...")

    # -- inside --------------------------------------------------------------------------

    def _server_row(self, server: str, **cells: str) -> None:
        item = self._server_rows.get(server)
        if item is None:
            item = self._server_rows[server] = self.servers.insert("", "end", values=(printable(server), "up", "-", "-", "-"))
            self.servers.configure(height=max(LIST_ROWS, len(self._server_rows)))
            self.servers.grid()
        for column, text in cells.items():
            self.servers.set(item, column, text)

    def _show_status(self, status: RuntimeStatus) -> None:
        self.stage.configure(text=printable(f"Stage: {status.stage_label}"))
        self.bar.configure(value=status.percent)
        job_percent = int(status.job_progress * 100)
        self.job_bar.configure(value=job_percent)
        self.job_text.configure(text=f"Job: {job_percent}% · ETA {format_eta(status.job_eta)}")
        self._show_folder(status.folder)
        if status.queue_position is not None:
            position, length = status.queue_position
            self.state.configure(text=f"Waiting in the server's queue ({position}/{length})")
        else:
            running = f"Running ({status.percent}%)"
            self.state.configure(text=f"{running} · {self._cancelling}" if self._cancelling else running)
        self.eta.configure(text=f"ETA: {format_eta(status.eta)}")
        self.seed.configure(text=f"Seed: {format_seed(status.seed)}")
        self.image.configure(text=f"Image: {format_image(status) or '-'}")
        sampling = format_pass(status) if status.pass_kind else format_step(status)  # "hires 2/14", "12/30"
        self.step.configure(text=f"Step: {sampling or '-'}")
        if self._shows_preview and status.preview and status.preview != self._preview_data:
            self._show_preview(status.preview)

    def _show_preview(self, data: str) -> None:
        """Show a base64 PNG (bare, or a `data:` URI), shrunk to `PREVIEW_SIZE`."""
        self._preview_data = data
        try:
            image = tk.PhotoImage(master=self, data=data.partition("base64,")[2] or data)
        except tk.TclError as exc:  # a preview is a nicety: a bad one is skipped
            log.debug("live preview not shown: %s", exc)
            return
        factor = math.ceil(max(image.width(), image.height()) / PREVIEW_SIZE)
        if factor > 1:
            image = image.subsample(factor)
        self._preview_image = image  # Tk shows an image only while Python holds it
        self.preview.configure(image=image)
        self.preview.grid()

    def _cancel(self, mode: CancelMode) -> None:
        self._on_cancel(mode)
        if mode is CancelMode.NOW:
            self._enable_cancel(False)
            self._cancelling = "cancelling..."
        else:
            self.cancel_after_stage_button.state(["disabled"])
            self._cancelling = "cancelling after this stage..."
        self.state.configure(text=self._cancelling.capitalize())

    def _pause(self, pause: bool) -> None:
        """Pause or Resume pressed; the buttons change when the queue says it did (`show_queue_paused`)."""
        assert self._control is not None  # the buttons are disabled without it
        if pause:
            self._control.pause_queue()
        else:
            self._control.resume_queue()

    def _show_folder(self, folder: Path | None) -> None:
        self._folder = folder
        self.folder.configure(text=printable(f"Folder: {folder or '-'}"))
        self.open_button.state(["!disabled" if folder is not None and self._can_open else "disabled"])

    def _open_folder(self) -> None:
        if self._folder is not None:
            self._on_open(self._folder)

    def _open(self, item: str) -> None:
        if item in self._folders:
            self._on_open(self._folders[item])

    def _enable_cancel(self, enabled: bool) -> None:
        flag = "!disabled" if enabled else "disabled"
        self.cancel_button.state([flag])
        self.cancel_after_stage_button.state([flag])
