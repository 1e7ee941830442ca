"""The contract between the runner and a progress poller (a plugin).

The runner asks for a poller through the `sdjobs_start_polling` hook just before
it sends a generation request, and stops it when the request returned or the job
was cancelled.  The poller runs on its own thread and only ever hands samples to
`PollRequest.report`; folding them into progress is the core's business.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

import attrs

from sdjobs.status import ProgressInfo, TaskProgress

if TYPE_CHECKING:
    from sdjobs.client import WebUIClient

#: The poll interval's default and its allowed range, in seconds.
DEFAULT_POLL_INTERVAL = 0.5
POLL_INTERVAL_RANGE = (0.25, 2.0)

Report = Callable[[ProgressInfo | None, TaskProgress | None], None]


@attrs.frozen
class PollRequest:
    """What a poller needs to follow one generation request.

    Attributes:
        client: The job's `WebUIClient`.
        interval: Seconds between two samples.
        report: Where samples go: `(progress, task)`; either may be None
            (idle, error, timeout, or the server cannot follow tasks).  Safe to
            call from any thread; cheap, never blocks on I/O.
        task_id: The `force_task_id` sent with the request when the server can
            follow tasks through `/internal/progress`; None otherwise.
        preview: Ask the server for live preview images.
    """

    client: WebUIClient
    interval: float
    report: Report
    task_id: str | None = None
    preview: bool = False


class Poller(Protocol):
    """A running poller, as returned by `sdjobs_start_polling`."""

    def stop(self) -> None:
        """Stop sampling; return once no further request will be sent.

        Must return promptly even while a progress request hangs: the runner
        calls it on its own thread, and a cancel waits for it.
        """
