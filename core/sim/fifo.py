"""A1111's `queue_lock`: one generation at a time, admitted in arrival order."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from .state import SimulatorClosed


class FifoLock:
    """A lock that admits waiters in the order they arrived (`modules/fifo_lock.py`).

    Tickets make it fair: `threading.Lock` wakes an arbitrary waiter.  `close()` makes
    every waiter give up with `SimulatorClosed`.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._next_ticket = 0
        self._now_serving = 0
        self._closing = False

    @contextmanager
    def hold(self) -> Iterator[None]:
        with self._cond:
            ticket = self._next_ticket
            self._next_ticket += 1
            self._cond.wait_for(lambda: self._closing or self._now_serving == ticket)
            if self._closing:
                raise SimulatorClosed
        try:
            yield
        finally:
            with self._cond:
                self._now_serving += 1
                self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify_all()
