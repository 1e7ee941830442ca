"""Looking at the Tk front end's window from a test: what it shows, closing it, grabbing it.

Every function that takes a panel runs on the Tk thread; `on_tk` gets there
from any other thread.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import Future
from tkinter import ttk
from typing import Any

from PIL import Image, ImageGrab

from sdjobs.frontends.tk import TkFrontend
from sdjobs.frontends.tk_panel import JobPanel


def on_tk(frontend: TkFrontend, call: Callable[[JobPanel], Any]) -> Any:
    """Run ``call(panel)`` on the Tk thread and wait for its result (from another thread)."""
    future: Future = Future()

    def run(panel: JobPanel) -> None:
        try:
            future.set_result(call(panel))
        except BaseException as exc:
            future.set_exception(exc)

    frontend.call_soon(run)
    return future.result(timeout=10)


def texts(panel: JobPanel) -> dict[str, Any]:
    """What the panel shows, as a reader sees it."""
    return {
        "name": str(panel.job_name["text"]),
        "stage": str(panel.stage["text"]),
        "bar": float(panel.bar["value"]),
        "state": str(panel.state["text"]),
        "eta": str(panel.eta["text"]),
        "seed": str(panel.seed["text"]),
        "step": str(panel.step["text"]),
        "queued": [row[1] for row in rows(panel.queued)],
        "cancel": panel.cancel_button.instate(["!disabled"]),
    }


def rows(tree: ttk.Treeview) -> list[tuple[str, ...]]:
    """The rows a list shows, top down, each as its cells' texts."""
    return [tuple(map(str, tree.item(item, "values"))) for item in tree.get_children()]


def double_click(tree: ttk.Treeview, row: int) -> None:
    """Two clicks on the ``row``-th row (from 0), as a mouse makes them: Tk sees a double-click."""
    tree.update()  # laid out, so that the row has a place on the screen
    x, y, width, height = tree.bbox(tree.get_children()[row])
    for _ in range(2):
        for event in ("<ButtonPress-1>", "<ButtonRelease-1>"):
            tree.event_generate(event, x=x + width // 2, y=y + height // 2)


def close_window(panel: JobPanel) -> None:
    """What the window manager does when the user closes the window."""
    panel.tk.call(panel.winfo_toplevel().protocol("WM_DELETE_WINDOW"))


def grab(panel: JobPanel) -> Image.Image:
    """A picture of the whole window as it is on the screen now."""
    window = panel.winfo_toplevel()
    window.update()  # draw everything pending before the picture is taken
    assert window.winfo_viewable()
    x, y = window.winfo_rootx(), window.winfo_rooty()
    box = (x, y, x + window.winfo_width(), y + window.winfo_height())
    return ImageGrab.grab(bbox=box, xdisplay=os.environ["DISPLAY"])


def session_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name == "sdjobs-session"]
