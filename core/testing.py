"""Property-testing kit: hypothesis strategies and a rule-based state machine over `Job`.

`JobRules` drives the step-able `Job` core with a fake WebUI and a fake clock:
each rule is one event (a progress sample, the server's answer, a server error,
a cancel, time passing, a plugin that raises), so hypothesis explores the
interleavings that threads would make flaky.  Its invariants are sdjobs'
promises; subclass it to add rules for your own plugin and keep them::

    class MyPluginRules(JobRules):
        def plugins(self):
            return [MyPlugin()]

    TestMyPlugin = MyPluginRules.TestCase
"""

from __future__ import annotations

import io
import re
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import attrs
from hypothesis import event
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from PIL import Image, PngImagePlugin

from sdjobs import hookimpl
from sdjobs.client import GenerationResult, WebUIServerError, WebUITimeout, WebUIUnreachable
from sdjobs.clock import FakeClock

from sdjobs.hooks import Hooks, make_plugin_manager
from sdjobs.job import Job, JobSettings
from sdjobs.machine import END_STATES, IN_STAGE, STOPPING, TRIGGERS, WORKING, MachineError
from sdjobs.machine import WAITING as WAITING_FOR_WEBUI
from sdjobs.outputs import JobFolder, read_provenance
from sdjobs.spec import JobSpec
from sdjobs.status import CancelMode, JobState, ProgressInfo, RuntimeStatus, TaskProgress

__all__ = [
    "FakePoller",
    "FakeWebUI",
    "HookRecorder",
    "JobRules",
    "Quirks",
    "follows_documented_order",
    "hostile_json",
    "job_specs",
    "progress_bodies",
    "progress_samples",
    "progress_streams",
    "quirks",
    "stage_chains",
    "task_bodies",
    "task_samples",
]

LATER_STAGES = ("img2img", "adetailer", "upscale")

# -- strategies ------------------------------------------------------------------


def stage_chains(max_later: int = 3) -> st.SearchStrategy[list[str]]:
    """Stage types of a job: txt2img first, then any of the others."""
    return st.lists(st.sampled_from(LATER_STAGES), max_size=max_later).map(lambda rest: ["txt2img", *rest])


def _stage(kind: str) -> dict[str, Any]:
    return {
        "txt2img": {"type": "txt2img"},
        "img2img": {"type": "img2img", "denoising_strength": 0.5},
        "adetailer": {"type": "adetailer", "ad_model": "face_yolov8n.pt"},
        "upscale": {"type": "upscale", "upscaler": "Lanczos", "scale": 2},
    }[kind]


@st.composite
def job_specs(draw: st.DrawFn, chains: st.SearchStrategy[list[str]] | None = None) -> JobSpec:
    """Valid jobs of small images: a drawn chain, steps, iterations and seed."""
    chain = draw(chains or stage_chains())
    data = {
        "name": draw(st.text(min_size=1, max_size=20).filter(str.strip)),
        "prompt": "a test",
        "seed": draw(st.integers(0, 2**32 - 1)),
        "settings": {"steps": draw(st.integers(1, 30)), "width": 64, "height": 64},
        "stages": [_stage(kind) for kind in chain],
    }
    data["stages"][0]["n_iter"] = draw(st.integers(1, 3))
    return JobSpec.from_mapping(data)


#: Job timestamps a sample may carry: ours, another job's, an old one, a fresh server's, none.
TIMESTAMPS = ("20260101120005", "20260101120000", "20260101115900", "0", None)
_ANY_FLOAT = st.floats(allow_nan=True, allow_infinity=True) | st.floats(-1.0, 2.0)


def sample(
    step: int = 0,
    steps: int = 10,
    *,
    job_no: int = 0,
    job_count: int = 1,
    stamp: str | None = TIMESTAMPS[0],
    eta: float = 5.0,
    progress: float | None = None,
) -> ProgressInfo:
    """A global progress answer; its `progress` as A1111 computes it unless given."""
    if progress is None:
        share = step / steps if steps > 0 else 0.0
        progress = 0.0 if job_count == 0 else 0.01 + (job_no + share) / max(job_count, 1)
    return ProgressInfo(
        progress=progress,
        eta_relative=eta,
        current_step=step,
        total_steps=steps,
        job_no=job_no,
        job_count=job_count,
        job_timestamp=stamp,
    )


def idle_sample(stamp: str | None = TIMESTAMPS[2]) -> ProgressInfo:
    """A1111 when idle: job_count 0, and the last job's stale values."""
    return sample(0, 8, job_no=1, job_count=0, stamp=stamp, eta=0.0)


def hostile_json() -> st.SearchStrategy[Any]:
    """What a broken or hostile server may put where a value belongs: huge and non-finite
    numbers, values of the wrong type, and nesting up to thousands of levels deep."""
    scalars = (
        st.none() | st.booleans() | st.integers() | st.sampled_from([10**400, -(10**400), 2**63, 2**31])
        | st.floats() | st.text(max_size=6)
    )  # fmt: skip
    nested = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3), max_leaves=8)
    return nested | st.integers(100, 5000).map(_deeply_nested)


def _deeply_nested(depth: int) -> list[Any]:
    value: list[Any] = []
    for _ in range(depth):
        value = [value]
    return value


def _or_hostile(strategy: st.SearchStrategy[Any], share: int = 6) -> st.SearchStrategy[Any]:
    """`strategy`, but one time in `share` hostile JSON instead."""
    return st.integers(1, share).flatmap(lambda n: hostile_json() if n == 1 else strategy)


def progress_bodies() -> st.SearchStrategy[Any]:
    """Decoded `/sdapi/v1/progress` bodies: A1111's fields, each now and then hostile; sometimes
    the whole body is."""
    state = st.fixed_dictionaries(
        {},
        optional={
            "sampling_step": _or_hostile(st.integers(0, 40)),
            "sampling_steps": _or_hostile(st.integers(0, 40)),
            "job_no": _or_hostile(st.integers(0, 6)),
            "job_count": _or_hostile(st.integers(-1, 6)),
            "job_timestamp": _or_hostile(st.sampled_from(TIMESTAMPS)),
            "interrupted": _or_hostile(st.booleans()),
        },
    )
    body = st.fixed_dictionaries(
        {"progress": _or_hostile(st.floats(0, 1))},
        optional={"eta_relative": _or_hostile(st.floats(0, 100)), "state": _or_hostile(state), "textinfo": _or_hostile(st.text(max_size=6))},
    )
    return _or_hostile(body)


def task_bodies() -> st.SearchStrategy[Any]:
    """Decoded `/internal/progress` bodies, likewise."""
    body = st.fixed_dictionaries(
        {"active": _or_hostile(st.booleans()), "queued": _or_hostile(st.booleans()), "completed": _or_hostile(st.booleans())},
        optional={
            "progress": _or_hostile(st.floats(0, 1)),
            "eta": _or_hostile(st.floats(0, 100)),
            "id_live_preview": _or_hostile(st.integers(-1, 100)),
            "live_preview": _or_hostile(st.just("data:image/png;base64,")),
            "textinfo": _or_hostile(st.sampled_from(["Waiting...", "In queue: 2/3", "In queue: x/3"])),
        },
    )
    return _or_hostile(body)


def _parsed(parse: Any, body: Any) -> Any:
    try:
        return parse(body)
    except ValueError:  # not a sample at all: the poller hands over None
        return None


@st.composite
def progress_samples(draw: st.DrawFn) -> ProgressInfo | None:
    """One global progress answer as a real server may give it, or None (error, timeout).

    Regressions, a stale idle state, `job_count` -1 at a job's start, other
    jobs' timestamps, junk (NaN, infinities, negative or oversized values), and what
    the client makes of a hostile body (`progress_bodies`).
    """
    kind = draw(st.sampled_from(["running", "running", "running", "none", "idle", "starting", "junk", "hostile"]))
    stamp = draw(st.sampled_from(TIMESTAMPS))
    if kind == "none":
        return None
    if kind == "hostile":
        return _parsed(ProgressInfo.from_response, draw(progress_bodies()))
    if kind == "idle":
        return idle_sample(stamp)
    if kind == "starting":
        return sample(0, draw(st.integers(1, 30)), job_count=-1, stamp=stamp)
    junk = kind == "junk"
    return sample(
        draw(st.integers(-2, 45)),
        draw(st.integers(-1, 40)),
        job_no=draw(st.integers(-1, 7)),
        job_count=draw(st.integers(-1, 6)) if junk else draw(st.integers(1, 6)),
        stamp=stamp,
        eta=draw(_ANY_FLOAT),
        progress=draw(_ANY_FLOAT) if junk else None,
    )


def progress_streams(max_size: int = 40) -> st.SearchStrategy[list[ProgressInfo | None]]:
    """Sequences of global progress answers, as a poller would hand them over."""
    return st.lists(progress_samples(), max_size=max_size)


QUEUED = TaskProgress(active=False, queued=True, completed=False, queue_position=(2, 3), textinfo="In queue: 2/3")
WAITING = TaskProgress(active=False, queued=False, completed=False, textinfo="Waiting...")
COMPLETED = TaskProgress(active=False, queued=False, completed=True)


def active_task(progress: float | None = 0.0, eta: float | None = None) -> TaskProgress:
    return TaskProgress(active=True, queued=False, completed=False, progress=progress, eta=eta)


@st.composite
def task_samples(draw: st.DrawFn) -> TaskProgress | None:
    """One `/internal/progress` answer about our task: active, queued, waiting, completed, or None."""
    kind = draw(st.sampled_from(["active", "active", "queued", "waiting", "completed", "none", "hostile"]))
    if kind == "none":
        return None
    if kind == "hostile":
        return _parsed(TaskProgress.from_response, draw(task_bodies()))
    if kind == "active":
        return active_task(draw(st.none() | _ANY_FLOAT), draw(st.none() | _ANY_FLOAT))
    return {"queued": QUEUED, "waiting": WAITING, "completed": COMPLETED}[kind]


# -- the fake world ------------------------------------------------------------------


def png(seed: int, size: tuple[int, int] = (64, 64), parameters: str | None = None) -> bytes:
    """A small real PNG, with an infotext if given."""
    image = Image.new("RGB", size, (seed % 256, 64, 128))
    info = PngImagePlugin.PngInfo()
    if parameters:
        info.add_text("parameters", parameters)
    out = io.BytesIO()
    image.save(out, format="PNG", pnginfo=info)
    return out.getvalue()


@attrs.define
class FakePoller:
    """A poller that samples nothing: the rules hand samples to the job themselves.

    Attributes:
        request: What the job asked of it (`PollRequest`).
        stopped: The job stopped it.
    """

    request: Any = None
    stopped: bool = False

    def stop(self) -> None:
        self.stopped = True


@attrs.define
class FakeWebUI:
    """A `WebUIPort` that records what the job asks and answers when the test says.

    It is also a plugin: its `sdjobs_start_polling` hands out `FakePoller`s, so
    a test can see that every poller is stopped.
    """

    task_tracking: bool = False
    client: Any = None
    folder: JobFolder | None = None
    prepared: list[str] = attrs.field(factory=list)
    sent: list[tuple[str, dict[str, Any], str | None]] = attrs.field(factory=list)
    probes: list[str | None] = attrs.field(factory=list)
    pollers: list[FakePoller] = attrs.field(factory=list)
    interrupts: int = 0
    pings: int = 0

    def report(self, info: ProgressInfo | None, task: TaskProgress | None) -> None:
        """Samples come from the rules directly."""

    def prepare(self, spec: JobSpec, job_id: str) -> None:
        """Noted (the job's id, each time); the rules answer it with `folder`."""
        self.prepared.append(job_id)

    def probe(self, task_id: str | None) -> None:
        """Noted; the rules answer it (`JobRules.probe_answers`) or let it time out."""
        self.probes.append(task_id)

    def send(self, endpoint: str, payload: dict[str, Any], task_id: str | None) -> None:
        self.sent.append((endpoint, payload, task_id))

    def interrupt(self) -> None:
        self.interrupts += 1

    def ping(self) -> None:
        """Noted; the rules answer it (`JobRules.server_back`) or not."""
        self.pings += 1

    @hookimpl
    def sdjobs_start_polling(self, request: Any) -> FakePoller:
        self.pollers.append(FakePoller(request))
        return self.pollers[-1]

    def answer(self, spec: JobSpec, quirks: Quirks | None = None) -> GenerationResult:
        """A 200 answer to the last request: images as the spec asks, each with its own seed in
        its infotext, with ADetailer's mark; `quirks` bend it as real servers do."""
        quirks = quirks or Quirks()
        endpoint, payload, _ = self.sent[-1]
        count = payload.get("n_iter", 1) * payload.get("batch_size", 1) if endpoint == "txt2img" else 1
        extras = endpoint == "extra-single-image"  # its answer carries no seed and no grid
        seed = spec.seed if extras else (spec.seed + quirks.seed_shift) % 2**32
        mark = ", ADetailer model: face_yolov8n.pt" if quirks.adetailer_mark else ""
        texts = [f"{spec.prompt}\nSteps: 1, Seed: {seed + i}{mark}" for i in range(count)]
        grids = [png(seed, GRID_SIZE, parameters=texts[0]) for _ in range(0 if extras else quirks.grids)]
        images = (*grids, *(png(seed + i, parameters=text) for i, text in enumerate(texts)))
        info = {
            "seed": seed,
            "all_seeds": [seed + i for i in range(count)],
            "infotexts": texts[:1] * len(grids) + texts,  # A1111 puts a grid's infotext first too
            "index_of_first_image": len(grids),
        }
        return GenerationResult(images=images, info={} if extras else info)


#: The size of the grid image a `Quirks` answer puts first (the pictures are 64 x 64).
GRID_SIZE = (96, 96)


@attrs.frozen
class Quirks:
    """How a server's answer differs from the plain one.

    Attributes:
        seed_shift: The server used the job's seed plus this (0: the job's seed).
        adetailer_mark: The infotexts carry ADetailer's settings (it ran).
        grids: Grid images before the pictures (`index_of_first_image`).
    """

    seed_shift: int = 0
    adetailer_mark: bool = True
    grids: int = 0


def quirks() -> st.SearchStrategy[Quirks]:
    """Mostly plain answers; now and then another seed, no ADetailer mark, or a grid first."""
    return st.sampled_from([Quirks()] * 5 + [Quirks(seed_shift=7), Quirks(adetailer_mark=False), Quirks(grids=1)])


class HookRecorder:
    """Records every observer hook call as `(name, kwargs)`."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def names(self) -> list[str]:
        return [name for name, _ in self.calls]

    def _record(self, name: str, **kwargs: Any) -> None:
        self.calls.append((name, kwargs))

    @hookimpl
    def sdjobs_job_started(self, status, spec):
        self._record("job_started", status=status, spec=spec)

    @hookimpl
    def sdjobs_stage_started(self, status, stage):
        self._record("stage_started", status=status, stage=stage)

    @hookimpl
    def sdjobs_progress(self, status):
        self._record("progress", status=status)

    @hookimpl
    def sdjobs_stage_finished(self, status, result):
        self._record("stage_finished", status=status, result=result)

    @hookimpl
    def sdjobs_job_stalled(self, status, seconds):
        self._record("job_stalled", status=status, seconds=seconds)

    @hookimpl
    def sdjobs_job_finished(self, status, outcome, error, results):
        self._record("job_finished", status=status, outcome=outcome, error=error, results=results)


class RaisingObserver:
    """An observer plugin that raises in every hook it has."""

    @hookimpl
    def sdjobs_progress(self, status):
        raise RuntimeError("observer failed")

    @hookimpl
    def sdjobs_stage_finished(self, status, result):
        raise RuntimeError("observer failed")


#: One letter per hook, so a job's hook sequence can be matched as a string.
_LETTERS = {
    "job_started": "J",
    "stage_started": "S",
    "progress": "P",
    "job_stalled": "T",
    "stage_finished": "F",
    "job_finished": "E",
}


def follows_documented_order(names: Iterable[str], stages: int) -> bool:
    """Whether hook names run: job_started, then per stage (stage_started,
    any progress and job_stalled, stage_finished), then job_finished."""
    sequence = "".join(_LETTERS[name] for name in names)
    return re.fullmatch(rf"J(?:S[PT]*F){{{stages}}}E", sequence) is not None


# -- the state machine -----------------------------------------------------------------

#: Where the rules cancel: inside a stage (a cancel before the first request is a unit test's).
STAGE_STATES = IN_STAGE


class JobRules(RuleBasedStateMachine):
    """sdjobs' promises about one job, checked under any order of events.

    Each rule is one event of the world: the server's answers (or errors), a
    progress sample, a cancel in each mode, time passing (stalls, late answers),
    a plugin that raises.  Subclass and override `plugins()` to run your own
    plugins inside the job; add `@rule`s for what they do.  The invariants stay.
    """

    def plugins(self) -> list[object]:
        """Extra plugins to register for each run."""
        return []

    @initialize(
        spec=job_specs(),
        task_tracking=st.booleans(),
        calm=st.booleans(),
        stall_interrupt_after=st.none() | st.sampled_from([90.0, 200.0]),
        problems=st.sampled_from([(), (), (), ("unknown sampler 'Euler z'",)]),
    )
    def start_job(
        self,
        spec: JobSpec,
        task_tracking: bool,
        calm: bool,
        stall_interrupt_after: float | None,
        problems: tuple[str, ...],
    ) -> None:
        """A job of ``spec``, begun and checked (``problems``: what preflight found).

        In a ``calm`` run nobody cancels and nothing fails (so jobs end done
        often); the samples are as wild as ever.
        """
        self._tmp = tempfile.TemporaryDirectory()
        self.clock = FakeClock()
        self.webui = FakeWebUI(task_tracking=task_tracking, folder=JobFolder.create(Path(self._tmp.name), "job-1"))
        self.recorder = HookRecorder()
        self.pm = make_plugin_manager(load_entry_points=False, disabled=["sdjobs.plugins.progress_poller"])
        self.pm.register(self.recorder, name="recorder")
        self.pm.register(self.webui, name="fake-webui")
        for plugin in self.plugins():
            self.pm.register(plugin)
        self.spec = spec
        self.job = Job(
            spec=spec,
            job_id="job-1",
            hooks=Hooks(self.pm),
            port=self.webui,
            settings=JobSettings(
                stall_after=60.0, stall_interrupt_after=None if calm else stall_interrupt_after, cancel_grace=30.0
            ),
            clock=self.clock,
            wall_clock=self.clock,
        )
        self.calm = calm
        self.cancels: list[tuple[CancelMode, str, int]] = []  # mode, the state then, stages started then
        self.cancelled_at: float | None = None  # the fake clock when the first cancel "now" came
        self.sent_at_cancel = 0
        self.progress_at_cancel = 0
        self.stall_interrupted = False
        self.handed_back = False  # a hand-back came (SIGTERM, `queue pause --now`)
        self.raising = False
        self.ticked_at = float("-inf")
        self.downs: list[tuple[int, int, int]] = []  # stage index, request number, images kept, at each down
        self.wrong_answers = 0  # answers with another seed in stage 1, or no ADetailer mark
        self.job.begin()
        self.job.prepared(folder=self.webui.folder, problems=[] if calm else list(problems))

    def teardown(self) -> None:
        if hasattr(self, "job") and not self.job.finished:
            event("outcome: not finished")
        if hasattr(self, "_tmp"):
            self._tmp.cleanup()

    # -- the server ---------------------------------------------------------------------

    @precondition(lambda self: not self.job.finished)
    @rule(bent=quirks())
    def serve(self, bent: Quirks) -> None:
        """The server does what the job waits for: a probe's sample, a request's answer."""
        if self.job.awaiting_probe:
            self.job.probed(info=None, task=None)
        elif self.job.awaiting_answer:
            stage = self.job.stage.spec.type
            wrong = (bent.seed_shift and self.job.stage.index == 0) or (not bent.adetailer_mark and stage == "adetailer")
            event(f"answer: {'wrong' if wrong else 'grid first' if bent.grids else 'as asked'}")
            self.wrong_answers += bool(wrong)
            quiet = not self.cancels and not self.stall_interrupted and self.job.state in WORKING
            self.job.returned(result=self.webui.answer(self.spec, bent))
            if wrong and quiet:
                assert self.job.outcome is JobState.FAILED, f"{self.job.state}: a wrong answer was taken"
                assert ("seed" if bent.seed_shift else "ADetailer did not run") in self.job.error

    @precondition(lambda self: not self.job.finished)
    @rule(times=st.integers(2, 12))
    def serve_a_while(self, times: int) -> None:
        """The server answers `times` things in a row as asked: jobs get to their end often."""
        for _ in range(times):
            if self.job.finished:
                return
            self.serve(Quirks())

    @precondition(lambda self: not self.job.finished)
    @rule(info=progress_samples(), task=task_samples())
    def poll(self, info: ProgressInfo | None, task: TaskProgress | None) -> None:
        if not self.webui.task_tracking:
            task = None
        self.clock.advance(0.5)
        self.job.sample(info=info, task=task)

    @precondition(lambda self: self.job.state in ("generating", "generating_then_stop"))
    @rule()
    def our_job_runs(self) -> None:
        """A sample that says the server runs our job (which a cancel then interrupts)."""
        self.clock.advance(0.5)
        self.job.sample(info=sample(1, 10), task=active_task(0.1) if self.webui.task_tracking else None)

    @precondition(lambda self: self.job.awaiting_probe)
    @rule(info=progress_samples(), task=task_samples())
    def probe_answers(self, info: ProgressInfo | None, task: TaskProgress | None) -> None:
        if self.webui.probes[-1] is None:  # a global sample was asked for
            task = None
        else:
            info = None
        self.job.probed(info=info, task=task)


    @precondition(lambda self: self.job.state in ("generating", "generating_then_stop"))
    @rule()
    def server_silent(self) -> None:
        """A sample that timed out: the server took the request and answers nothing."""
        self.clock.advance(5.0)
        self.job.sample(info=None, task=None, silent=True)

    @precondition(lambda self: self.job.awaiting_answer and not self.cancels and not self.calm)
    @rule()
    def server_error(self) -> None:
        self.job.failed(error=WebUIServerError("http://webui/sdapi/v1/txt2img", 500, "boom"))

    @precondition(lambda self: self.job.state in ("generating", "generating_then_stop") and not self.calm)
    @rule(gateway=st.booleans())
    def server_down(self, gateway: bool) -> None:
        """The server goes down under the request: the connection drops, or a gateway answers 502."""
        url = "http://webui/sdapi/v1/txt2img"
        sent, started = len(self.webui.sent), self.recorder.names().count("stage_started")
        self.downs.append((self.job.stage.index, self.job.stage.request_number, len(self.job.stage.paths)))
        error = WebUIServerError(url, 502, "Bad Gateway") if gateway else WebUIUnreachable(url, None, "refused")
        self.job.failed(error=error)
        assert self.job.state in WAITING_FOR_WEBUI, f"{self.job.state}: a down server failed the job"
        assert (len(self.webui.sent), self.recorder.names().count("stage_started")) == (sent, started)

    @precondition(lambda self: self.job.state in ("interrupting", "stall_interrupting") and not self.calm)
    @rule()
    def interrupt_unanswered(self) -> None:
        """The server answers not even the interrupt (frozen): the job ends at once, not after the grace."""
        self.job.unanswered(error=WebUITimeout("http://webui/sdapi/v1/interrupt", 1.0, "timed out after 1 s"))
        assert self.job.finished

    @precondition(lambda self: self.job.state in WAITING_FOR_WEBUI)
    @rule()
    def server_back(self) -> None:
        """The server answers a ping: the stage sends the request it lost, by the same number."""
        index, number, kept = self.downs[-1]
        self.job.reached()
        if self.job.stage is not None and not self.job.finished:
            assert (self.job.stage.index, self.job.stage.request_number) == (index, number)
            assert len(self.job.stage.paths) == kept, "the stage's answered requests were lost"

    # -- the user -------------------------------------------------------------------------

    @precondition(lambda self: self.job.state in STAGE_STATES and len(self.cancels) < 2 and not self.calm)
    @rule(mode=st.sampled_from(CancelMode))
    def cancel(self, mode: CancelMode) -> None:
        self._cancel(mode)

    @precondition(lambda self: self.job.state in STAGE_STATES and not self.cancels and not self.calm)
    @rule(first=st.sampled_from(CancelMode), second=st.sampled_from(CancelMode))
    def cancel_twice(self, first: CancelMode, second: CancelMode) -> None:
        """Two cancels in a row, as from a Tk button and then Ctrl-C."""
        self._cancel(first)
        if not self.job.finished:
            self._cancel(second)

    @precondition(lambda self: self.job.state in STAGE_STATES and not self.handed_back and not self.calm)
    @rule()
    def hand_back(self) -> None:
        """SIGTERM or `queue pause --now`: a cancel "now" whose end is `handed_back`."""
        self.handed_back = True
        self._cancel(CancelMode.NOW, fire=self.job.hand_back)

    def _cancel(self, mode: CancelMode, fire: Callable[[], object] | None = None) -> None:
        self.cancels.append((mode, self.job.state, self.recorder.names().count("stage_started")))
        if mode is CancelMode.NOW and self.cancelled_at is None:
            self.cancelled_at = self.clock.now
            self.sent_at_cancel = len(self.webui.sent)
            self.progress_at_cancel = self.recorder.names().count("progress")
        if fire is None:
            self.job.cancel(mode=mode)
        else:
            fire()

    # -- time and plugins ---------------------------------------------------------------------

    @precondition(lambda self: not self.job.finished)
    @rule(seconds=st.floats(0.1, 120.0))
    def time_passes(self, seconds: float) -> None:
        self.ticked_at = self.clock.advance(seconds)
        interrupts = self.webui.interrupts
        self.job.tick()
        if self.webui.interrupts > interrupts and self.cancelled_at is None:
            self.stall_interrupted = True
            event("stall interrupt")

    @precondition(lambda self: not self.raising and not self.job.finished)
    @rule()
    def observer_raises(self) -> None:
        self.pm.register(RaisingObserver(), name="raising-observer")
        self.raising = True

    @precondition(lambda self: self.job.finished)
    @rule(trigger=st.sampled_from(TRIGGERS))
    def an_ended_job_refuses_every_trigger(self, trigger: str) -> None:
        """The ends are absorbing: whatever arrives late, the runner must drop it."""
        state = self.job.state
        try:
            self.job.trigger(trigger)
        except MachineError:
            pass
        else:
            raise AssertionError(f"{trigger} was accepted in {state}")
        assert self.job.state == state

    # -- invariants -----------------------------------------------------------------

    def _statuses(self) -> list[RuntimeStatus]:
        """Every status handed to a hook, in order."""
        return [kwargs["status"] for _, kwargs in self.recorder.calls if "status" in kwargs]

    @invariant()
    def progress_is_monotonic_and_in_range(self) -> None:
        stage, progress, job = 0, 0.0, 0.0
        for status in self._statuses():
            assert 0.0 <= status.progress <= 1.0 and 0.0 <= status.job_progress <= 1.0
            assert status.stage_index >= stage, "the stage index went back"
            if status.stage_index == stage:
                assert status.progress >= progress, "stage progress went back"
            stage, progress = status.stage_index, status.progress
            assert status.job_progress >= job, "job progress went back"
            job = status.job_progress

    @invariant()
    def a_stage_shows_100_percent_only_once_finished(self) -> None:
        for name, kwargs in self.recorder.calls:
            if name == "progress":
                assert kwargs["status"].progress < 1.0, "a running stage showed 100 %"

    @invariant()
    def nothing_after_the_terminal_hook(self) -> None:
        names = self.recorder.names()
        if "job_finished" in names:
            assert names.index("job_finished") == len(names) - 1
            assert names.count("job_finished") == 1

    @invariant()
    def hooks_follow_the_documented_order(self) -> None:
        names = self.recorder.names()
        if self.job.finished and names.count("stage_started"):
            assert follows_documented_order(names, names.count("stage_started"))

    @invariant()
    def a_poller_runs_only_while_its_request_is_out(self) -> None:
        running = [poller for poller in self.webui.pollers if not poller.stopped]
        assert len(running) <= 1
        if running:
            assert self.job.state in ("generating", "generating_then_stop", "stall_interrupting")

    @invariant()
    def a_cancel_now_ends_the_job_promptly_and_sends_nothing_more(self) -> None:
        if self.cancelled_at is None:
            return
        assert len(self.webui.sent) == self.sent_at_cancel, "a request was sent after cancel"
        assert self.recorder.names().count("progress") == self.progress_at_cancel, "progress after cancel"
        assert not any(not poller.stopped for poller in self.webui.pollers), "a poller runs after cancel"
        # Cancelled once the interrupted request answers, or at the first tick past the time
        # to learn whether the request is ours and the grace time to answer the interrupt.
        settings = self.job.settings
        grace_over = self.ticked_at >= self.cancelled_at + settings.probe_timeout + settings.cancel_grace
        if not self.job.awaiting_answer or grace_over:
            assert self.job.finished
        if self.job.finished and self._first(CancelMode.NOW)[1] not in ("queued", *END_STATES):
            assert self.job.outcome is (JobState.HANDED_BACK if self.handed_back else JobState.CANCELLED)

    @invariant()
    def a_cancel_after_this_stage_starts_no_further_stage(self) -> None:
        mode, state, started = self._first(CancelMode.AFTER_STAGE)
        if mode is None or state in ("queued", "preparing", *END_STATES):
            return
        assert self.recorder.names().count("stage_started") == started, "a stage started after 'after this stage'"
        if self.job.outcome is JobState.DONE:
            assert started == len(self.spec.stages), "done before the last stage"

    @invariant()
    def a_cancel_after_this_stage_is_never_forgotten(self) -> None:
        """Within the stage it was asked in, the job stays in a `*_then_stop` state, or stops sooner."""
        mode, state, started = self._first(CancelMode.AFTER_STAGE)
        if mode is None or state in ("queued", "preparing") or self.job.stage is None:
            return
        if self.job.stage.index == started - 1:
            assert self.job.state not in WORKING, f"{self.job.state}: the stop after this stage was forgotten"

    @invariant()
    def a_cancel_after_this_job_stops_nothing(self) -> None:
        if self.cancels and all(mode is CancelMode.AFTER_JOB for mode, _, _ in self.cancels):
            assert self.job.outcome is not JobState.CANCELLED
            assert self.job.state not in STOPPING

    @invariant()
    def a_stall_interrupt_fails_the_job(self) -> None:
        if self.stall_interrupted and self.job.finished and self.cancelled_at is None:
            assert self.job.outcome is JobState.FAILED
            assert "stalled" in self.job.error or "stopped answering" in self.job.error, self.job.error

    @invariant()
    def a_down_server_is_waited_for_as_long_as_the_settings_say(self) -> None:
        """Only a wait that ran out fails the job, and only once the time is up."""
        if self.job.gave_up_on_webui:
            assert self.job.outcome is JobState.FAILED and "unreachable" in self.job.error
        if self.job.state in WAITING_FOR_WEBUI:
            assert self.job.deadline is not None and self.job.deadline <= self.clock.now + 30.0

    @invariant()
    def a_finished_job_says_how(self) -> None:
        if not self.job.finished:
            return
        assert self.job.outcome in (JobState.DONE, JobState.FAILED, JobState.CANCELLED, JobState.HANDED_BACK)
        assert self.job.status.state is self.job.outcome
        event(f"outcome: {self.job.outcome}")
        if self.job.outcome is JobState.DONE:
            assert self.recorder.names().count("stage_finished") == len(self.spec.stages)
            assert self.job.status.job_progress == 1.0
            assert not self.wrong_answers, "done on an answer with another seed or without ADetailer's mark"
            self._check_saved_images()
        if self.job.outcome is JobState.FAILED:
            assert self.job.error

    def _check_saved_images(self) -> None:
        """Every picture saved is one of the answers' pictures, never a grid, and its provenance
        names its own seed (the one in its infotext), not the job's."""
        for path in sorted(self.webui.folder.path.rglob("*.png")):
            data = path.read_bytes()
            with Image.open(io.BytesIO(data)) as image:
                assert image.size != GRID_SIZE, f"{path.name}: a grid was saved as a picture"
                own_seed = int(image.text["parameters"].rpartition("Seed: ")[2].split(",")[0])
            assert read_provenance(data)["seed"] == own_seed, f"{path.name}: provenance seed is not the image's"

    def _first(self, wanted: CancelMode) -> tuple[CancelMode | None, str | None, int]:
        """The first cancel of mode ``wanted``: the mode, the job's state then, stages started then."""
        return next(((mode, state, n) for mode, state, n in self.cancels if mode is wanted), (None, None, 0))
