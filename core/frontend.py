"""What a front end is: a plugin that shows jobs, and owns the main thread while they run.

A front end is a class registered under the entry-point group `sdjobs.frontends`
(the built-in ones too).  The command line makes one from `FrontendOptions`,
registers the instance as a pluggy plugin, so its `hookimpl`s see every event,
and calls `run(session)` on the main thread.  Front ends never import the runner:
`Session` is all they see of it.
"""

from __future__ import annotations

import enum
from pathlib import Path
from typing import ClassVar, Protocol

import attrs

ENTRY_POINT_GROUP = "sdjobs.frontends"


class CancelMode(enum.StrEnum):
    """How a cancel stops the running job."""

    NOW = "now"
    """Interrupt the running stage; keep its partial images."""

    AFTER_STAGE = "after-stage"
    """Let the running stage finish, then stop; during the last stage the job ends done."""


class Session(Protocol):
    """The queue of jobs of one `sdjobs run`, as a front end drives it."""

    def run(self) -> None:
        """Run every queued job in order; return when the queue has drained.

        Blocks; a front end with its own event loop calls it on a worker thread.
        """

    def cancel(self, mode: CancelMode = CancelMode.NOW, *, rest: bool = False) -> None:
        """Ask the running job to stop; with ``rest``, run no further job either.

        Safe from any thread, returns at once; repeated calls are harmless.
        """


@attrs.frozen
class FrontendOptions:
    """Settings a front end may use; each ignores what it has no use for.

    Attributes:
        log_file: Where the `log` front end writes (None: stderr).
        log_level: A `logging` level name.
        log_format: A `logging` format string (None: the front end's own).
        preview: Show the server's live preview where the front end can.
    """

    log_file: Path | None = None
    log_level: str = "INFO"
    log_format: str | None = None
    preview: bool = False


class Frontend(Protocol):
    """A front end class, as found through the entry-point group."""

    name: ClassVar[str]
    description: ClassVar[str]

    def __init__(self, options: FrontendOptions) -> None: ...

    def run(self, session: Session) -> int | None:
        """Show ``session`` while it runs it; return an exit status to force one.

        Called on the main thread.  None leaves the status to the jobs' outcomes.
        """
