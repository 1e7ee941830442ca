"""What a front end is told of the durable queue: its jobs, its history, whether it is paused.

A worker's watch thread and `sdjobs watch` look at the store every fraction of
a second; `QueueView.look` fires `sdjobs_queue_changed`,
`sdjobs_history_changed`, `sdjobs_queue_paused` and `sdjobs_queue_resumed` only
for what changed since the last look.
"""

from __future__ import annotations

import time
from collections.abc import Collection

import attrs

from sdjobs.history import ServerHistory, plan_queue, queue_end
from sdjobs.hooks import Hooks
from sdjobs.status import JobState
from sdjobs.store import JobRecord, Store

#: How many ended jobs `sdjobs_history_changed` carries.
HISTORY_SHOWN = 50


@attrs.define
class QueueView:
    """What ``hooks`` were last told of the queue (None: nothing yet).

    Attributes:
        hooks: Whom to tell.
        servers: The URLs of the servers the queue runs on, whose histories plan when its last
            job should end (`sdjobs.history.plan_queue`); none given: those its running jobs run on.
        queue, history, paused, end: What was told last.
    """

    hooks: Hooks
    servers: tuple[str, ...] = ()
    queue: tuple[JobRecord, ...] | None = None
    history: tuple[JobRecord, ...] | None = None
    paused: bool | None = None
    end: float | None = None

    def look(self, store: Store, ids: Collection[str] | None = None) -> bool:
        """Tell the hooks what changed since the last look (of the jobs in ``ids`` alone, when given);
        True when the queue changed or was resumed: a worker waiting for a job looks again."""
        queue = tuple(job for job in store.list() if ids is None or job.id in ids)
        history = tuple(store.history(limit=HISTORY_SHOWN))
        paused = store.queue_paused()
        woken = False
        if (queue, history, paused) != (self.queue, self.history, self.paused):
            end = self._expected_end(store, queue, paused=paused)
            if (queue, end) != (self.queue, self.end):
                self.queue, self.end = queue, end
                self.hooks.queue_changed(queue, end)
                woken = True
        if history != self.history:
            self.history = history
            self.hooks.history_changed(history)
        if paused != self.paused:
            if paused:
                self.hooks.queue_paused()
            elif self.paused is not None:
                self.hooks.queue_resumed()
                woken = True
            self.paused = paused
        return woken

    def _expected_end(self, store: Store, queue: tuple[JobRecord, ...], *, paused: bool) -> float | None:
        """When the last job of ``queue`` should end on the servers, as `sdjobs queue list` plans it."""
        servers = self.servers or tuple(dict.fromkeys(job.server for job in queue if job.state is JobState.RUNNING and job.server))
        histories = {url: ServerHistory.load(store, url) for url in servers}
        return queue_end(plan_queue(queue, histories, now=time.time(), paused=paused))


def nothing_to_run(store: Store) -> bool:
    """No job is running, and none is queued that a worker could claim (`--until-empty`)."""
    jobs = store.list()
    paused = store.queue_paused()
    return not any(job.state is JobState.RUNNING or not (paused or job.paused) for job in jobs)
