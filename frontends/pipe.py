"""A reader that goes away (`sdjobs run --frontend jsonl | head -1`): stop quietly, as a piped tool does.

When a front end's output is a pipe whose reader has closed it, writing raises
`BrokenPipeError`.  Python's advice (see "Note on SIGPIPE" in the `signal`
docs) is followed: the stream's file descriptor is pointed at the null device,
so no later write, nor the interpreter's last flush, fails again; then the
session is cancelled, with no further job, and the process ends with 141
(128 + SIGPIPE), as a shell tool killed by SIGPIPE would.
"""

from __future__ import annotations

import io
import os
from typing import IO, Any

from sdjobs.exits import EXIT_BROKEN_PIPE
from sdjobs.frontend import Session
from sdjobs.status import CancelMode

def silence(stream: IO[Any]) -> None:
    """Point ``stream``'s file descriptor at the null device; a stream without one is left alone."""
    try:
        fd = stream.fileno()
    except (OSError, ValueError, io.UnsupportedOperation):  # closed, or not a file (StringIO)
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
    finally:
        os.close(devnull)


class PipeGuard:
    """What a front end does when its output closed: silence it, once, and stop the session.

    Call `watch` when the session starts and `closed` on a `BrokenPipeError`
    (from any thread); `exit_status` turns the session's status into 141 if
    that happened.
    """

    def __init__(self) -> None:
        self.broken = False
        self._session: Session | None = None

    def watch(self, session: Session) -> None:
        self._session = session

    def closed(self, stream: IO[Any]) -> None:
        if self.broken:
            return
        self.broken = True
        silence(stream)
        if self._session is not None:
            self._session.cancel(CancelMode.NOW, rest=True)

    def exit_status(self, status: int | None) -> int | None:
        return EXIT_BROKEN_PIPE if self.broken else status
