"""`JobLedger`: the jobs of one session as a front end tracks them from the hooks.

Which jobs are queued, which one runs, how each ended, how long it took and how
many images it made: what the console's summary table, the log's outcome lines
and the Tk window's queue list are made from.
"""

from __future__ import annotations

import time

import attrs

from sdjobs.status import JobState, StageResult


@attrs.define
class JobEntry:
    """One queued job, filled in as it runs."""

    job_id: str
    name: str
    started: float | None = None
    elapsed: float = 0.0
    outcome: JobState | None = None
    images: int = 0


@attrs.define
class JobLedger:
    """Every job of the session, in queue order.  Not thread-safe: feed it from one thread."""

    entries: dict[str, JobEntry] = attrs.field(factory=dict)

    def queued(self, job_id: str, name: str) -> None:
        self.entries[job_id] = JobEntry(job_id, name)

    def started(self, job_id: str) -> None:
        self.entries[job_id].started = time.monotonic()

    def finished(self, job_id: str, outcome: JobState, results: tuple[StageResult, ...]) -> JobEntry:
        entry = self.entries[job_id]
        entry.outcome = outcome
        entry.elapsed = 0.0 if entry.started is None else time.monotonic() - entry.started
        entry.images = sum(len(result.images) for result in results)
        return entry

    def number(self, job_id: str) -> str:
        """`"2/3"`: the job's place in the queue."""
        return f"{list(self.entries).index(job_id) + 1}/{len(self.entries)}"

    def waiting(self) -> list[JobEntry]:
        """The jobs that have not started yet, in order."""
        return [entry for entry in self.entries.values() if entry.started is None and entry.outcome is None]
