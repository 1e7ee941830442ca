"""Property test with sdjobs' own `JobRules`: a notifier whose webhook refuses every
delivery keeps all of sdjobs' promises, and tries once per finished job and per stall."""

from __future__ import annotations

import logging
import socket

from hypothesis.stateful import invariant

from sdjobs.testing import JobRules
from sdjobs_notify import Notifier


def _refusing_url() -> str:
    """A URL on 127.0.0.1 where nothing listens: every POST is refused at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}/hook"


class Failures(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.events: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.events.append(record.args[0])  # "webhook %s to %s failed: %s": the event name


class RefusedNotifyRules(JobRules):
    def plugins(self) -> list[object]:
        self.failures = Failures()
        logging.getLogger("sdjobs_notify").addHandler(self.failures)
        return [Notifier(url=_refusing_url(), notify_send=None, timeout=2.0)]

    def teardown(self) -> None:
        logging.getLogger("sdjobs_notify").removeHandler(self.failures)
        super().teardown()

    @invariant()
    def one_attempt_per_finished_job_and_per_stall(self) -> None:
        wanted = [name for name in self.recorder.names() if name in ("job_finished", "job_stalled")]
        assert self.failures.events == wanted


TestRefusedNotify = RefusedNotifyRules.TestCase
