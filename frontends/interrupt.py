"""Ctrl-C, the same way in every front end: the first press cancels, the second quits.

The first Ctrl-C cancels the running job at once (its stage's partial images
are kept) and runs no further job; the process then ends with status 130 when
the session returns.  A second Ctrl-C leaves at once.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator

from sdjobs.exits import EXIT_CANCELLED
from sdjobs.frontend import Session
from sdjobs.status import CancelMode


def _quit() -> None:
    raise KeyboardInterrupt


@contextlib.contextmanager
def ctrl_c_cancels(
    session: Session,
    *,
    on_cancel: Callable[[], None] = lambda: None,
    on_quit: Callable[[], None] = _quit,
) -> Iterator[None]:
    """While inside, Ctrl-C cancels ``session`` and then calls ``on_cancel``; again, ``on_quit``.

    Both callbacks run in the signal handler, on the main thread: keep them to
    setting a flag, logging a line or scheduling work.  The previous handler is
    restored on the way out.  Off the main thread (where Python cannot take
    signals) this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pressed = False

    def handle(signum: int, frame: object) -> None:
        nonlocal pressed
        if pressed:
            on_quit()
            return
        pressed = True
        session.cancel(CancelMode.NOW, rest=True)
        on_cancel()

    previous = signal.signal(signal.SIGINT, handle)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def run_with_ctrl_c(session: Session, on_cancel: Callable[[], None] = lambda: None) -> int | None:
    """Run ``session`` on this thread under `ctrl_c_cancels`; 130 when a second Ctrl-C quit it."""
    with ctrl_c_cancels(session, on_cancel=on_cancel):
        try:
            session.run()
        except KeyboardInterrupt:
            return EXIT_CANCELLED
    return None
