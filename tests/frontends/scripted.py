"""`ScriptedSession`: an honest stand-in for the runner, for testing front ends.

The front ends only ever see a `Session` and hooks.  `ScriptedSession` fires the
documented hook sequence through a real pluggy plugin manager, with real
`RuntimeStatus` and `StageResult` values, and obeys cancels the way the runner
does: "now" cuts the running stage short (its images kept, `partial`), "after
this stage" ends the job after it (done during the last stage), ``rest`` runs no
further job.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import attrs
import pluggy


from sdjobs.spec import JobSpec
from sdjobs.status import CancelMode, JobState, RuntimeStatus, StageResult

#: Stage progress of each progress event; the first comes before an ETA is known.
SAMPLES = (0.25, 0.5, 0.75)
STEPS = 20

#: What a WebUI that is down is said to fail with, and each ping's (retry_in, waited) in turn.
UNREACHABLE = "cannot reach http://127.0.0.1:7860/sdapi/v1/progress: connection refused"
PINGS = ((1.0, 0.0), (2.0, 1.0))

#: Called after each hook with its name and status (None for the queue's hooks).
Watcher = Callable[[str, RuntimeStatus | None], None]


def job_spec(name: str, stages: Sequence[str] = ("txt2img", "img2img"), seed: int = 1234567890) -> JobSpec:
    later = {
        "img2img": {"type": "img2img", "denoising_strength": 0.5},
        "adetailer": {"type": "adetailer", "ad_model": "face_yolov8n.pt"},
        "upscale": {"type": "upscale", "upscaler": "Lanczos", "scale": 2},
    }
    return JobSpec.from_mapping(
        {
            "name": name,
            "prompt": "a lighthouse at dusk",
            "seed": seed,
            "settings": {"steps": STEPS, "width": 64, "height": 64},
            "stages": [{"type": "txt2img"}, *(later[kind] for kind in stages[1:])],
        }
    )


@attrs.define(eq=False)
class ScriptedSession:
    """A `Session` that plays each job through its stages without a WebUI.

    Per job: job_started, then per stage stage_started, a progress event per
    entry of ``samples``, stage_finished; then job_finished; job_queued for all
    jobs first and queue_drained last.  ``fail`` maps a job's index to the
    error its last stage fails with; ``stall`` names a ``(job, stage)`` that
    reports a stall after its first sample, ``unreachable`` one whose WebUI
    then goes down for `PINGS` (and comes back); ``preview`` goes with every
    progress event.  ``watch`` is called after every hook, on the thread that
    runs the session.
    """

    pm: pluggy.PluginManager
    specs: Sequence[JobSpec]
    out_dir: Path = Path("outputs")
    samples: Sequence[float] = SAMPLES
    preview: str | None = None
    fail: Mapping[int, str] = attrs.field(factory=dict)
    stall: tuple[int, int] | None = None
    unreachable: tuple[int, int] | None = None
    watch: Watcher = lambda name, status: None
    cancels: list[tuple[CancelMode, bool]] = attrs.field(factory=list)
    ran: bool = False
    _lock: threading.Lock = attrs.field(factory=threading.Lock)
    _cancel: CancelMode | None = None
    _stop: bool = False

    def cancel(self, mode: CancelMode = CancelMode.NOW, *, rest: bool = False) -> None:
        with self._lock:
            self.cancels.append((mode, rest))
            self._stop = self._stop or rest
            if self._cancel is not CancelMode.NOW:
                self._cancel = mode

    def _pending_cancel(self) -> CancelMode | None:
        with self._lock:
            return self._cancel

    def _fire(self, hook: pluggy.HookCaller, status: RuntimeStatus | None = None, **kwargs: object) -> None:
        if status is not None:
            kwargs["status"] = status
        hook(**kwargs)
        self.watch(hook.name.removeprefix("sdjobs_"), status)

    def run(self) -> None:
        self.ran = True
        ids = [f"job-{index + 1}" for index in range(len(self.specs))]
        for job_id, spec in zip(ids, self.specs):
            self._fire(self.pm.hook.sdjobs_job_queued, job_id=job_id, spec=spec)
        outcomes: dict[str, JobState] = {}
        for index, (job_id, spec) in enumerate(zip(ids, self.specs)):
            if self._stop:
                break
            outcomes[job_id] = self._run_job(index, job_id, spec)
        self._fire(self.pm.hook.sdjobs_queue_drained, outcomes=outcomes)

    def _run_job(self, index: int, job_id: str, spec: JobSpec) -> JobState:
        with self._lock:
            self._cancel = None
        count = len(spec.stages)
        status = RuntimeStatus(
            job_id, spec.name, spec.stages[0].type, 0, count, seed=spec.seed, started_at=time.time(),
            state=JobState.RUNNING, folder=self.out_dir / job_id,
        )  # fmt: skip
        self._fire(self.pm.hook.sdjobs_job_started, status, spec=spec)
        results: list[StageResult] = []
        outcome, error = JobState.DONE, None
        for stage_index, stage in enumerate(spec.stages):
            status = attrs.evolve(
                status, stage=stage.type, stage_index=stage_index, progress=0.0, step=None, steps=None, eta=None
            )
            self._fire(self.pm.hook.sdjobs_stage_started, status, stage=stage)
            for sample, fraction in enumerate(self.samples):
                if self._pending_cancel() is CancelMode.NOW:
                    break
                known = sample > 0
                status = attrs.evolve(
                    status,
                    progress=fraction,
                    job_progress=(stage_index + fraction) / count,
                    step=int(fraction * STEPS),
                    steps=STEPS,
                    eta=(1 - fraction) * 10 if known else None,
                    job_eta=(count - stage_index - fraction) * 10 if known else None,
                    preview=self.preview,
                )
                self._fire(self.pm.hook.sdjobs_progress, status)
                if self.stall == (index, stage_index) and sample == 0:
                    self._fire(self.pm.hook.sdjobs_job_stalled, status, seconds=60.0)
                if self.unreachable == (index, stage_index) and sample == 0:
                    for retry_in, waited in PINGS:
                        self._fire(self.pm.hook.sdjobs_webui_unreachable, status, error=UNREACHABLE, retry_in=retry_in, waited=waited)
            partial = self._pending_cancel() is CancelMode.NOW
            if index in self.fail and stage_index == count - 1 and not partial:
                outcome, error = JobState.FAILED, self.fail[index]
                break
            folder = self.out_dir / job_id / f"{stage_index + 1:02d}-{stage.type}"
            result = StageResult(
                stage.type, stage_index, images=(folder / "001.png", folder / "002.png"), elapsed=65.0,
                partial=partial,
            )  # fmt: skip
            if not partial:
                status = attrs.evolve(status, progress=1.0, job_progress=(stage_index + 1) / count, eta=0.0)
            results.append(result)
            self._fire(self.pm.hook.sdjobs_stage_finished, status, result=result)
            pending = self._pending_cancel()
            if partial or (pending is CancelMode.AFTER_STAGE and stage_index < count - 1):
                outcome = JobState.CANCELLED
                break
        status = attrs.evolve(status, state=outcome)
        self._fire(self.pm.hook.sdjobs_job_finished, status, outcome=outcome, error=error, results=tuple(results))
        return outcome
