"""A1111's `shared.state`, its task registry, and the progress formulas read from it.

`SharedState` is the one mutable object every request thread shares.  Each change
makes a new frozen `StateSnapshot`, records it in `changes` and wakes everyone
waiting on the condition, so tests can wait for a state instead of sleeping.
"""

from __future__ import annotations

import collections
import datetime
import threading
import time
from collections.abc import Callable
from typing import Any

import attrs

FINISHED_TASKS_KEPT = 16  # A1111 remembers the last 16 finished task ids


class SimulatorClosed(Exception):
    """Raised in a request thread that waits for something while the server shuts down."""


@attrs.frozen
class StateSnapshot:
    """One moment of A1111's `State` (`modules/shared_state.py`).

    The first nine attributes are what `/sdapi/v1/progress` shows as `state`.
    `time_start` is wall-clock time, like A1111's, because ETAs are computed from it.
    `current_task` and `pending_tasks` (in arrival order) are `modules/progress.py`'s.
    `awaiting_release` is the simulator's own: true while a stepping-mode step waits
    for `release()`.
    """

    skipped: bool = False
    interrupted: bool = False
    stopping_generation: bool = False
    job: str = ""
    job_count: int = 0
    job_timestamp: str = "0"
    job_no: int = 0
    sampling_step: int = 0
    sampling_steps: int = 0
    time_start: float | None = None
    current_task: str | None = None
    pending_tasks: tuple[str, ...] = ()
    textinfo: str | None = None
    id_live_preview: int = 0
    current_image_sampling_step: int = 0
    awaiting_release: bool = False

    def as_dict(self) -> dict[str, Any]:
        """`State.dict()`, as `/sdapi/v1/progress` shows it."""
        return {
            "skipped": self.skipped,
            "interrupted": self.interrupted,
            "stopping_generation": self.stopping_generation,
            "job": self.job,
            "job_count": self.job_count,
            "job_timestamp": self.job_timestamp,
            "job_no": self.job_no,
            "sampling_step": self.sampling_step,
            "sampling_steps": self.sampling_steps,
        }


def sdapi_progress(state: StateSnapshot, now: float) -> tuple[float, float]:
    """`(progress, eta_relative)` exactly as `Api.progressapi` computes them.

    The 0.01 offset, and `eta_relative` taken before progress is clamped to 1, are
    A1111's: so the ETA is huge during the first step and slightly negative at 1.0.
    """
    if state.job_count == 0:
        return 0.0, 0.0
    progress = 0.01
    if state.job_count > 0:
        progress += state.job_no / state.job_count
    if state.sampling_steps > 0:
        progress += 1 / state.job_count * state.sampling_step / state.sampling_steps
    elapsed = now - (state.time_start or now)
    eta_relative = elapsed / progress - elapsed
    return min(progress, 1.0), eta_relative


def task_progress(state: StateSnapshot, now: float) -> tuple[float, float | None]:
    """`(progress, eta)` of the active task as `/internal/progress` computes them (no 0.01)."""
    progress = 0.0
    if state.job_count > 0:
        progress += state.job_no / state.job_count
        if state.sampling_steps > 0:
            progress += 1 / state.job_count * state.sampling_step / state.sampling_steps
    progress = min(progress, 1.0)
    if progress <= 0:
        return progress, None
    elapsed = now - (state.time_start or now)
    return progress, elapsed / progress - elapsed


@attrs.frozen
class TaskStatus:
    """Where a task id stands, as `/internal/progress` sees it."""

    active: bool
    queued: bool
    completed: bool
    queue_position: int | None = None
    queue_length: int = 0


class SharedState:
    """The server-wide state, the task registry and the step gate, under one condition."""

    def __init__(self, *, stepping: bool) -> None:
        self._cond = threading.Condition()
        self._state = StateSnapshot()
        self._stepping = stepping
        self._credits = 0
        self._closing = False
        self._finished: collections.deque[str] = collections.deque(maxlen=FINISHED_TASKS_KEPT)
        self.changes: list[tuple[float, StateSnapshot]] = []

    # -- reading ---------------------------------------------------------------

    def snapshot(self) -> StateSnapshot:
        with self._cond:
            return self._state

    def wait_for(self, predicate: Callable[[StateSnapshot], bool], timeout: float) -> bool:
        """Wait until `predicate(snapshot)` holds; False if `timeout` seconds pass first."""
        with self._cond:
            return self._cond.wait_for(lambda: predicate(self._state), timeout)

    def wait_closing(self, timeout: float) -> bool:
        """Sleep up to `timeout` seconds, returning early (True) when the server shuts down."""
        with self._cond:
            return self._cond.wait_for(lambda: self._closing, timeout)

    # -- A1111's State methods -------------------------------------------------

    def update(self, **changes: Any) -> None:
        """Change some attributes; record the new snapshot if a client could see it."""
        with self._cond:
            self._set(**changes)

    def _set(self, **changes: Any) -> None:
        old, new = self._state, attrs.evolve(self._state, **changes)
        if new == old:
            return
        self._state = new
        if attrs.evolve(new, awaiting_release=old.awaiting_release) != old:
            self.changes.append((time.monotonic(), new))
        self._cond.notify_all()

    def begin(self, job: str) -> None:
        """`State.begin`: a new job; note that `sampling_steps` keeps its stale value."""
        self.update(
            skipped=False,
            interrupted=False,
            stopping_generation=False,
            job=job,
            job_count=-1,
            job_timestamp=datetime.datetime.now().strftime("%Y%m%d%H%M%S"),
            job_no=0,
            sampling_step=0,
            time_start=time.time(),
            textinfo=None,
            id_live_preview=0,
            current_image_sampling_step=0,
        )

    def end(self) -> None:
        """`State.end`: idle again, every other attribute left stale."""
        self.update(job="", job_count=0)

    def nextjob(self) -> None:
        with self._cond:
            self._set(
                job_no=self._state.job_no + 1, sampling_step=0, current_image_sampling_step=0
            )

    def add_jobs(self, count: int) -> None:
        """`state.job_count += count` (what ADetailer does per detected mask)."""
        with self._cond:
            self._set(job_count=self._state.job_count + count)

    def interrupt(self) -> None:
        self.update(interrupted=True)

    def skip(self) -> None:
        self.update(skipped=True)

    def stopped(self) -> bool:
        """True when the running pass must end at this step boundary."""
        state = self.snapshot()
        return state.interrupted or state.skipped

    # -- tasks (modules/progress.py) -------------------------------------------

    def add_task_to_queue(self, task_id: str) -> None:
        with self._cond:
            self._set(pending_tasks=(*self._without(task_id), task_id))

    def start_task(self, task_id: str) -> None:
        with self._cond:
            self._set(pending_tasks=self._without(task_id), current_task=task_id)

    def finish_task(self, task_id: str) -> None:
        with self._cond:
            if self._state.current_task == task_id:
                self._set(current_task=None)
            self._finished.append(task_id)
            self._cond.notify_all()

    def drop_pending(self, task_id: str) -> None:
        """Forget a task that never started (its request thread gave up)."""
        with self._cond:
            self._set(pending_tasks=self._without(task_id))

    def _without(self, task_id: str) -> tuple[str, ...]:
        return tuple(task for task in self._state.pending_tasks if task != task_id)

    def task_status(self, task_id: str | None) -> TaskStatus:
        """`None == None` is A1111's quirk: no id while nothing runs reads as active."""
        with self._cond:
            queue = self._state.pending_tasks
            queued = task_id in queue
            return TaskStatus(
                active=task_id == self._state.current_task,
                queued=queued,
                completed=task_id in self._finished,
                queue_position=queue.index(task_id) + 1 if queued else None,  # type: ignore[arg-type]
                queue_length=len(queue),
            )

    # -- time ------------------------------------------------------------------

    def run_step(self, duration: float) -> None:
        """Let one sampling step's time pass; the step always finishes.

        In timed mode it lasts `duration`: an interrupt or skip sent meanwhile ends the
        pass only after it, as in A1111.  In stepping mode it waits for a `release()`
        credit, or for interrupt or skip, which finish it at once (using no credit).
        """
        with self._cond:
            if not self._stepping:
                if self._cond.wait_for(lambda: self._closing, duration):
                    raise SimulatorClosed
                return
            self._set(awaiting_release=True)
            self._cond.wait_for(
                lambda: self._closing
                or self._credits > 0
                or self._state.interrupted
                or self._state.skipped
            )
            self._set(awaiting_release=False)
            if self._closing:
                raise SimulatorClosed
            if not (self._state.interrupted or self._state.skipped):
                self._credits -= 1

    def hold(self, duration: float) -> None:
        """Time spent on work that is not sampling (a decode, a pause); none in stepping mode."""
        if not self._stepping and self.wait_closing(duration):
            raise SimulatorClosed

    def release(self, steps: int) -> None:
        with self._cond:
            self._credits += steps
            self._cond.notify_all()

    def close(self) -> None:
        """Wake every waiting request thread so it can give up."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()

    @property
    def closing(self) -> bool:
        with self._cond:
            return self._closing

    @property
    def condition(self) -> threading.Condition:
        """The condition every state change notifies (for waiters elsewhere, e.g. the queue)."""
        return self._cond
