"""The built-in progress poller: one thread per request, sampling at a fixed rate.

When the server follows task ids it asks `/internal/progress` about our task
(queued, with its position, or active), and `/sdapi/v1/progress` for step x/y
only while our task is the active one; otherwise it samples the global
`/sdapi/v1/progress` and the core decides whose job that is.  A failed sample is
reported as None; nothing here ever raises into the job, and the thread outlives
any exception a sample or a report raises (the first is logged, the rest only
at debug level).
"""

from __future__ import annotations

import logging
import threading
import time

from sdjobs import hookimpl
from sdjobs.polling import PollRequest
from sdjobs.status import ProgressInfo, TaskProgress

log = logging.getLogger(__name__)


class ThreadPoller:
    """Samples progress every ``request.interval`` seconds until stopped."""

    def __init__(self, request: PollRequest) -> None:
        self._request = request
        self._stopped = threading.Event()
        self._preview_id = -1
        self._failed = False
        self._thread = threading.Thread(target=self._loop, name="sdjobs-poller", daemon=True)

    def start(self) -> ThreadPoller:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop at once.  A request already in flight is left to time out on its
        own, and its answer is dropped: nothing is sent or reported after this."""
        self._stopped.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=0.05)

    def _loop(self) -> None:
        # The first sample is one interval in: at once, the request has barely left.
        interval = self._request.interval
        due = time.monotonic() + interval
        while not self._stopped.wait(max(0.0, due - time.monotonic())):
            try:
                self._sample_and_report()
            except Exception:
                self._log_failure()
            # After a slow sample, the next is due at once, not the ones missed meanwhile.
            due = max(due + interval, time.monotonic())

    def _sample_and_report(self) -> None:
        info, task = self._sample()
        if not self._stopped.is_set():
            self._request.report(info, task)

    def _log_failure(self) -> None:
        """Log the exception being handled: with its traceback the first time, at debug level after."""
        if self._failed:
            log.debug("progress sample failed again", exc_info=True)
            return
        self._failed = True
        log.warning("progress sample failed; sampling goes on", exc_info=True)

    def _sample(self) -> tuple[ProgressInfo | None, TaskProgress | None]:
        """One sample: global progress, and our task's state when following a task id.

        In task mode the global progress is asked only while our task is active
        (before that it reads someone else's job); it is None otherwise.
        """
        client, task_id = self._request.client, self._request.task_id
        preview = self._request.preview
        if task_id is None:
            return client.get_progress(skip_current_image=not preview), None
        task = client.internal_progress(task_id, preview=preview, id_live_preview=self._preview_id)
        if task is None or not task.active or self._stopped.is_set():
            return None, task
        if task.live_preview:
            self._preview_id = task.id_live_preview
        return client.get_progress(), task


@hookimpl(trylast=True)
def sdjobs_start_polling(request: PollRequest) -> ThreadPoller:
    return ThreadPoller(request).start()
