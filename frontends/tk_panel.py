"""`JobPanel`: the running-job panel of the Tk front end.

A plain Tk widget fed with `RuntimeStatus` values: it knows nothing of threads
or queues.  Every method must be called on the thread that made the window.
"""

from __future__ import annotations

import logging
import math
import tkinter as tk
from collections.abc import Callable
from tkinter import ttk


from sdjobs.frontends.formatting import (
    CALCULATING,
    format_duration,
    format_eta,
    format_image,
    format_seed,
    format_step,
    images_text,
    printable,
)
from sdjobs.status import CancelMode, JobState, RuntimeStatus, StageResult

log = logging.getLogger(__name__)

#: The live preview is shrunk to fit a square of this many pixels.
PREVIEW_SIZE = 256

OUTCOME_TEXT = {JobState.DONE: "Done", JobState.FAILED: "Failed", JobState.CANCELLED: "Cancelled"}


class JobPanel(ttk.Frame):
    """Job name, stage, progress bar and state, ETA, seed, image, step, preview, queue, Cancel buttons.

    ``on_cancel`` is called with the `CancelMode` of the button pressed.  With
    ``preview``, the server's live preview is shown when a status carries one.
    """

    def __init__(self, master: tk.Misc, *, on_cancel: Callable[[CancelMode], object], preview: bool = False) -> None:
        super().__init__(master, padding=12)
        self._on_cancel = on_cancel
        self._shows_preview = preview
        self._preview_data: str | None = None
        self._preview_image: tk.PhotoImage | None = None
        self._cancelling: str | None = None  # what the state line adds once a Cancel was pressed

        self.job_name = ttk.Label(self, text="Waiting for the first job...", font="TkHeadingFont")
        self.stage = ttk.Label(self, text="Stage: -")
        self.bar = ttk.Progressbar(self, maximum=100, length=360, mode="determinate")
        self.state = ttk.Label(self, text="Waiting")
        self.eta = ttk.Label(self, text=f"ETA: {CALCULATING}")
        self.seed = ttk.Label(self, text=f"Seed: {CALCULATING}")
        self.image = ttk.Label(self, text="Image: -")
        self.step = ttk.Label(self, text="Step: -")
        self.preview = ttk.Label(self)
        self.queued = tk.Listbox(self, height=4, activestyle="none")
        buttons = ttk.Frame(self)
        self.cancel_button = ttk.Button(buttons, text="Cancel", command=lambda: self._cancel(CancelMode.NOW))
        self.cancel_after_stage_button = ttk.Button(
            buttons, text="Cancel after this stage", command=lambda: self._cancel(CancelMode.AFTER_STAGE)
        )

        rows: list[tk.Widget] = [
            self.job_name, self.stage, self.bar, self.state, self.eta, self.seed, self.image, self.step
        ]
        if preview:
            rows.append(self.preview)
        rows += [ttk.Label(self, text="Queued:"), self.queued, buttons]
        for row, widget in enumerate(rows):
            widget.grid(row=row, column=0, sticky="we", pady=2)
        self.preview.grid_remove()  # no blank gap in the window until a preview comes
        self.columnconfigure(0, weight=1)
        self.cancel_button.pack(side="left")
        self.cancel_after_stage_button.pack(side="left", padx=(8, 0))
        self._enable_cancel(False)

    # -- what the hooks bring ----------------------------------------------------------

    def show_queue(self, names: list[str]) -> None:
        """The jobs still waiting, in order."""
        self.queued.delete(0, "end")
        self.queued.insert("end", *map(printable, names))

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

    def show_stage_finished(self, status: RuntimeStatus, result: StageResult) -> None:
        self._show_status(status)
        verb = "cut short" if result.partial else "finished"
        images = images_text(len(result.images), partial=result.partial)
        self.state.configure(text=printable(f"Stage {status.stage_label} {verb}: {images}"))

    def show_job_finished(self, outcome: JobState, error: str | None) -> None:
        self._enable_cancel(False)
        self.state.configure(text=printable(f"{OUTCOME_TEXT[outcome]}: {error}") if error else OUTCOME_TEXT[outcome])
        if outcome is JobState.DONE:
            self.bar.configure(value=100)
            self.eta.configure(text=f"ETA: {format_duration(0)}")

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

    def _show_status(self, status: RuntimeStatus) -> None:
        self.stage.configure(text=printable(f"Stage: {status.stage_label}"))
        self.bar.configure(value=status.percent)
        if status.queue_position is not None:
            position, length = status.queue_position
            self.state.configure(text=f"Waiting in the server's queue ({position}/{length})")
        else:
            running = f"Running ({status.percent}%)"
            self.state.configure(text=f"{running} · {self._cancelling}" if self._cancelling else running)
        self.eta.configure(text=f"ETA: {format_eta(status.eta)}")
        self.seed.configure(text=f"Seed: {format_seed(status.seed)}")
        self.image.configure(text=f"Image: {format_image(status) or '-'}")
        self.step.configure(text=f"Step: {format_step(status) or '-'}")
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

    def _enable_cancel(self, enabled: bool) -> None:
        flag = "!disabled" if enabled else "disabled"
        self.cancel_button.state([flag])
        self.cancel_after_stage_button.state([flag])
