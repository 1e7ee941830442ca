"""Procrastinate dispatches a PostgreSQL queue's jobs to `sdjobs worker`s on any number of hosts.

The sdjobs tables stay the queue's record: its order, pauses, owners, stages
and who holds which job.  The PostgreSQL store keeps one Procrastinate job
(`postgres_store.TASK`, on the queue `postgres_store.QUEUE`) waiting for each
job a worker may claim, in the queue's order.  `Dispatch.serve` runs a
Procrastinate worker with one slot per server of this host: LISTEN/NOTIFY
wakes it when a job is deferred; it fetches one (Procrastinate's ``SKIP
LOCKED``), and its task claims the sdjobs job it names (`Store.claim`, which
counts the attempt and fences the job to this worker) and runs it on a free
server from its first unfinished stage.

- Cancel and recall: the store asks Procrastinate to abort the running job's
  Procrastinate job; the worker hears of it over LISTEN/NOTIFY and `abort` reads
  what was asked and passes it to the job's runner, which interrupts its request.
- A job this host's free servers do not fit is passed on (`PassOn`):
  Procrastinate retries it a second later, on whichever worker fetches it.
- Lost workers: `tick` runs every second on every worker; the sdjobs worker
  takes back there the jobs of workers that are gone (`Store.recover`: its own
  heartbeat and lease, the attempt token), and the store defers them again as
  new Procrastinate jobs.  The Procrastinate jobs of runs whose worker's
  Procrastinate heartbeat is older than the lease (its stalled jobs) are closed
  as aborted.  They are not retried themselves: Procrastinate ends a job by its
  id alone, so a stalled worker that wakes would end the job another worker
  then ran under that id, and a cancel would no longer reach that one.  Such a
  woken worker's sdjobs writes are refused (`NotHeld`); its end of the closed
  job is one logged line.
- Procrastinate's own rows are deleted once done: the sdjobs tables keep the history.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

import attrs
from sdjobs.postgres_store import QUEUE, TASK, redact
from sdjobs.store import StoreError

log = logging.getLogger(__name__)

#: Seconds between two passes of an aborted job's request to its runner, until the job ends
#: (the first may come before the runner holds the job; repeats are harmless).
ABORT_REPEAT = 0.25

#: Seconds before Procrastinate offers a job passed on (`PassOn`) again.
PASS_ON_WAIT = 1


class PassOn(Exception):
    """No free server of this worker should run the job now: Procrastinate retries it in `PASS_ON_WAIT` s."""


@attrs.define
class Dispatch:
    """A Procrastinate worker running sdjobs jobs, until ``tick`` says stop.

    Attributes:
        conninfo: The queue's URL, credentials included (never shown).
        slots: Jobs run at once: one per server.
        run: Claims and runs the sdjobs job of this id, on a thread of its own;
            raises `PassOn` when it should run elsewhere.
        abort: Passes what was asked of a running job (a cancel, a recall) to its runner.
        tick: Called every `interval` on a thread: True to stop (the running jobs end first).
        lease: The store's lease: Procrastinate's heartbeat beats four times in it.
        interval: Seconds between two ticks.
    """

    conninfo: str
    slots: int
    run: Callable[[str], None]
    abort: Callable[[str], None]
    tick: Callable[[], bool]
    lease: float
    interval: float = 1.0

    def serve(self) -> None:
        """Fetch and run jobs until ``tick`` says stop; then wait for the running ones to end."""
        logging.getLogger("procrastinate").setLevel(max(logging.WARNING, log.getEffectiveLevel()))
        asyncio.run(self._serve())

    async def _serve(self) -> None:
        import procrastinate
        from procrastinate.job_context import AbortReason

        asyncio.get_running_loop().set_exception_handler(_one_line)

        app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=self.conninfo, min_size=1))

        @app.task(name=TASK, queue=QUEUE, pass_context=True,
                  retry=procrastinate.RetryStrategy(wait=PASS_ON_WAIT, retry_exceptions={PassOn}))  # fmt: skip
        async def run_job(context: procrastinate.JobContext, job_id: str) -> None:
            running = asyncio.ensure_future(asyncio.to_thread(self.run, job_id))
            while not running.done():
                try:
                    await asyncio.shield(running)
                except asyncio.CancelledError:  # Procrastinate's abort of an async task
                    if context.abort_reason() is AbortReason.USER_REQUEST:
                        await self._pass_abort(job_id, running)
            running.result()

        async with app.open_async():
            worker = asyncio.create_task(
                app.run_worker_async(
                    queues=[QUEUE], name="sdjobs", concurrency=self.slots, install_signal_handlers=False,
                    delete_jobs="always", update_heartbeat_interval=self.lease / 4, stalled_worker_timeout=self.lease,
                )  # fmt: skip
            )
            while not worker.done() and not await asyncio.to_thread(self.tick):
                await self._close_stalled(app)
                await asyncio.wait([worker], timeout=self.interval)
            if worker.done():  # it stopped by itself: a side task of it failed (it logged why)
                worker.result()
                raise StoreError(f"{redact(self.conninfo)}: Procrastinate's worker stopped")
            worker.cancel()  # Procrastinate's graceful stop: it waits for the running jobs
            await asyncio.gather(worker, return_exceptions=True)

    async def _close_stalled(self, app: Any) -> None:
        """Close the Procrastinate jobs of runs whose worker's heartbeat is older than the lease (see the module's doc)."""
        from procrastinate.exceptions import ConnectorException
        from procrastinate.jobs import Status

        for job in await app.job_manager.get_stalled_jobs(seconds_since_heartbeat=self.lease, task_name=TASK):
            log.info("closing Procrastinate job %s of a lost worker (sdjobs job %s)", job.id, job.task_kwargs.get("job_id"))
            with contextlib.suppress(ConnectorException):  # closed meanwhile by another worker, or ended by its own
                await app.job_manager.finish_job(job, status=Status.ABORTED, delete_job=True)

    async def _pass_abort(self, job_id: str, running: asyncio.Future[Any]) -> None:
        """Pass an abort to the job's runner, again every `ABORT_REPEAT` until the job ends."""
        while not running.done():
            await asyncio.to_thread(self.abort, job_id)
            await asyncio.wait([running], timeout=ABORT_REPEAT)


def _one_line(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """An error no task of the worker's event loop awaited (a woken stalled worker ending a job closed
    meanwhile): one line, not a traceback."""
    error = context.get("exception")
    why = f"{error} ({error.__cause__})" if error is not None and error.__cause__ else error or context["message"]
    log.warning("Procrastinate: %s", " ".join(str(why).split()))
