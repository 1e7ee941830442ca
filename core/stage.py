"""`StageRun`: what belongs to one running stage of a job, and `Request`, one request of it.

A job makes a new `StageRun` when a stage starts and drops it when the stage
ends; everything here lives exactly as long as its stage: the images still
to send, what came back, the progress tracker and the stall watch.  Where
the job *is* within the stage is the machine's state, not data here.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

from sdjobs.progress import StageTracker, StallWatch
from sdjobs.status import ProgressInfo, StageResult

if TYPE_CHECKING:
    from sdjobs.polling import Poller
    from sdjobs.spec import StageSpec


@attrs.define
class Request:
    """One generation request of a stage, from being built to its answer.

    Attributes:
        endpoint: `txt2img`, `img2img` or `extra-single-image`.
        payload: The JSON body, as amended by plugins.
        source: The input image it processes (None for txt2img).
        task_id: The `force_task_id` sent with it; None in global mode.
        baseline: The global sample taken just before sending (global mode).
        poller: The poller following it, until it is stopped.
    """

    endpoint: str
    payload: dict[str, Any]
    source: bytes | None
    task_id: str | None = None
    baseline: ProgressInfo | None = None
    poller: Poller | None = None

    @property
    def polled(self) -> bool:
        """Whether progress is followed: extras read ≈1.0 throughout, so they are not."""
        return self.endpoint != "extra-single-image"

    def stop_polling(self) -> None:
        """Stop the poller, once: it is forgotten first, so a `stop()` that raises is not retried."""
        poller, self.poller = self.poller, None
        if poller is not None:
            poller.stop()


@attrs.define
class StageRun:
    """One stage while it runs: its inputs, its outputs so far, its progress.

    Attributes:
        index: 0-based index of the stage in the job.
        spec: The stage's description.
        inputs: Images still to send, one request each (``[None]`` for txt2img).
        tracker: Its progress, folded from samples.
        stalls: Its stall watch.
        started: Monotonic seconds when it started.
        started_wall: Unix time when it started.
        request: The request being built, sent or awaited; None between requests.
        outputs: The images its answers returned, in order (the next stage's inputs).
        paths: Where they were written.
        infos: Each answer's parsed `info`.
        seeds: Each image's seed, as the server reported it.
        preview: The latest live preview shown.
        retries: Requests sent again because the server went down under them.
        cut: Where an interrupt cut its last request (`StageResult.cut`); None if none did.
    """

    index: int
    spec: StageSpec
    inputs: list[bytes | None]
    tracker: StageTracker
    stalls: StallWatch
    started: float
    started_wall: float
    request: Request | None = None
    outputs: list[bytes] = attrs.field(factory=list)
    paths: list[Path] = attrs.field(factory=list)
    infos: list[dict[str, Any]] = attrs.field(factory=list)
    seeds: list[int] = attrs.field(factory=list)
    preview: str | None = None
    retries: int = 0
    cut: dict[str, Any] | None = None

    @property
    def request_number(self) -> int:
        """1-based number of the request being sent: how many inputs were taken so far."""
        return self.tracker.requests - len(self.inputs)

    def result(self, elapsed: float, *, partial: bool, server: str | None = None) -> StageResult:
        """The stage's `StageResult`, with what it has so far; ``server`` ran it (with several)."""
        return StageResult(
            stage=self.spec.type,
            stage_index=self.index,
            images=tuple(self.paths),
            infos=tuple(self.infos),
            seeds=tuple(self.seeds),
            started_at=self.started_wall,
            elapsed=elapsed,
            partial=partial,
            cut=self.cut,
            timing=self.tracker.timing(),
            server=server,
        )
