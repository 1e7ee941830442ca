"""Runtime values: what the WebUI says about progress, and what sdjobs tells its hooks.

Everything here is a frozen `attrs` value.  The runner makes a new one for every
change and hands it to hooks, so a plugin can keep a reference without seeing it
change underneath it.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs


def _unit_interval(instance: object, attribute: attrs.Attribute, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{attribute.name} must be within [0, 1], got {value!r}")


#: The largest count (step, pass, queue place, preview id) taken from a server;
#: a larger one is nonsense, and arithmetic on it could overflow a float.
MAX_COUNT = 2**31 - 1


def _count(value: Any, *, least: int = 0) -> int | None:
    """``value`` when it is a JSON whole number within [least, MAX_COUNT]; None otherwise."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if not least <= value <= MAX_COUNT or value != int(value):  # NaN fails the bounds
        return None
    return int(value)


def _real(value: Any, *, least: float = -math.inf) -> float | None:
    """``value`` as a finite float not below ``least``; None for anything else (10**400 too)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) and number >= least else None


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _scalars(state: Mapping[Any, Any]) -> dict[str, Any]:
    """The entries of ``state`` that hold one usable JSON value; nested ones are dropped."""
    return {
        key: value
        for key, value in state.items()
        if isinstance(key, str) and (value is None or isinstance(value, str | bool) or _real(value) is not None)
    }


@attrs.frozen
class ProgressInfo:
    """One answer of `GET /sdapi/v1/progress`.

    The endpoint is global: it describes whatever the server is running, which is
    not necessarily our job (see `job_timestamp`).

    Attributes:
        progress: The server's own figure, `0.01 + job_no/job_count + step fraction`.
        eta_relative: Seconds left as the server guesses them; wild in the first step.
        current_step: `state.sampling_step`.
        total_steps: `state.sampling_steps` (stale when idle).
        job_no: `state.job_no`, the pass being sampled (0-based).
        job_count: `state.job_count`; -1 for a moment when a job begins, 0 when idle.
        job_timestamp: `state.job_timestamp`; changes with every job the server begins.
        current_image: Base64 preview, when asked for and sent.
        textinfo: Free text some servers send.
        state: The raw `state` dict, for anything not lifted out above.
    """

    progress: float
    eta_relative: float
    current_step: int | None = None
    total_steps: int | None = None
    job_no: int = 0
    job_count: int = 0
    job_timestamp: str | None = None
    current_image: str | None = None
    textinfo: str | None = None
    state: Mapping[str, Any] = attrs.field(factory=dict, repr=False)

    @property
    def idle(self) -> bool:
        """True when the server runs nothing (A1111 answers `job_count == 0`, progress 0)."""
        return self.job_count == 0 and self.progress == 0

    @property
    def interrupted(self) -> bool:
        return bool(self.state.get("interrupted"))

    @classmethod
    def from_response(cls, data: Any) -> ProgressInfo:
        """Parse a decoded `/sdapi/v1/progress` body, whatever the server sent.

        A field that is unusable (wrong type, not finite, out of bounds, a
        negative count) counts as missing.  Raises ValueError only when the
        body cannot be a sample at all: not an object, no usable `progress`
        (finite, not negative), or a `state` that is not an object.
        """
        if not isinstance(data, Mapping):
            raise ValueError("the answer is not an object")
        progress = _real(data.get("progress"), least=0.0)
        if progress is None:
            raise ValueError("the answer has no usable 'progress'")
        state = data.get("state") or {}
        if not isinstance(state, Mapping):
            raise ValueError("'state' is not an object")
        return cls(
            progress=progress,
            eta_relative=_real(data.get("eta_relative")) or 0.0,
            current_step=_count(state.get("sampling_step")),
            total_steps=_count(state.get("sampling_steps")),
            job_no=_count(state.get("job_no")) or 0,
            job_count=_count(state.get("job_count"), least=-1) or 0,
            job_timestamp=_text(state.get("job_timestamp")),
            current_image=_text(data.get("current_image")),
            textinfo=_text(data.get("textinfo")),
            state=_scalars(state),
        )


@attrs.frozen
class TaskProgress:
    """One answer of `POST /internal/progress` for a task id we sent as `force_task_id`.

    Attributes:
        active: Our task is the one running.
        queued: Our task waits behind another; `queue_position` says where.
        completed: Our task is among the server's last 16 finished ones.
        progress: `job_no/job_count + step fraction` *without* the 0.01 offset; None unless active.
        eta: The server's guess in seconds; None until the first step.
        queue_position: `(i, n)` parsed from "In queue: i/n", when queued.
        live_preview: A `data:` URI preview, when asked for and sent.
        id_live_preview: The preview's id, to send back so the same one is not sent twice.
        textinfo: The server's text ("Waiting...", "In queue: 1/2", ...).
    """

    active: bool
    queued: bool
    completed: bool
    progress: float | None = None
    eta: float | None = None
    queue_position: tuple[int, int] | None = None
    live_preview: str | None = None
    id_live_preview: int = -1
    textinfo: str | None = None

    @classmethod
    def from_response(cls, data: Any) -> TaskProgress:
        """Parse a decoded `/internal/progress` body, whatever the server sent.

        An unusable optional field counts as missing (see `ProgressInfo.from_response`).
        Raises ValueError only when the body is not an object or one of
        `active`, `queued`, `completed` is not a boolean.
        """
        if not isinstance(data, Mapping):
            raise ValueError("the answer is not an object")
        flags = [data.get(name) for name in ("active", "queued", "completed")]
        if not all(isinstance(flag, bool) for flag in flags):
            raise ValueError("'active', 'queued' and 'completed' are not all booleans")
        textinfo = _text(data.get("textinfo"))
        preview_id = _count(data.get("id_live_preview"), least=-1)
        return cls(
            *flags,
            progress=_real(data.get("progress"), least=0.0),
            eta=_real(data.get("eta")),
            queue_position=_queue_position(textinfo),
            live_preview=_text(data.get("live_preview")),
            id_live_preview=-1 if preview_id is None else preview_id,
            textinfo=textinfo,
        )


def _queue_position(textinfo: str | None) -> tuple[int, int] | None:
    """`(i, n)` from A1111's "In queue: i/n"; None for any other text."""
    if textinfo is None or not textinfo.startswith("In queue:"):
        return None
    i, _, n = textinfo.removeprefix("In queue:").strip().partition("/")
    try:
        position, length = _count(int(i)), _count(int(n))
    except ValueError:  # not numbers, or too many digits to read
        return None
    return None if position is None or length is None else (position, length)


class CancelMode(enum.StrEnum):
    """How a cancel stops the running job; a later cancel may only make it stop sooner."""

    NOW = "now"
    """Interrupt the running stage; keep its partial images."""

    AFTER_STAGE = "after-stage"
    """Let the running stage finish, then stop; during the last stage the job ends done."""

    AFTER_JOB = "after-job"
    """Let the running job finish, then run no further one."""

    @property
    def urgency(self) -> int:
        """How soon this mode stops the job: a later cancel never lowers it."""
        return (CancelMode.AFTER_JOB, CancelMode.AFTER_STAGE, CancelMode.NOW).index(self)


class JobState(enum.StrEnum):
    """Where a job is in its life; the stage states are the stages' own names."""

    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"
    #: Stopped and given back to the queue (SIGTERM, a second Ctrl-C, `queue pause --now`): it resumes
    #: later where it was.  An end for the running attempt and its hooks, never for the job in the store.
    HANDED_BACK = "handed_back"

    @property
    def terminal(self) -> bool:
        return self in (JobState.DONE, JobState.FAILED, JobState.CANCELLED)


@attrs.frozen
class RuntimeStatus:
    """A snapshot of one running job, made anew for every change and handed to hooks.

    Attributes:
        job_id: The job's id (also its output folder's name).
        name: The job's name from its spec.
        stage: The running stage's type (`txt2img`, `img2img`, `adetailer`, `upscale`).
        stage_index: 0-based index of the running stage.
        stage_count: How many stages the job has.
        progress: The running stage's progress, 0..1; never goes back within a stage.
        job_progress: The whole job's progress, 0..1; never goes back.
        image: The image being sampled, 1-based, of `images` in this stage; each
            image's steps start again from 1.  None when the stage makes one image.
        images: The images the stage samples one after another (a batch sampled
            together counts as one); None when it makes one.
        step: Sampling step of the current pass, when the server says.
        steps: Sampling steps of the current pass, when the server says.
        pass_kind: What the current pass is, when not the main one: `hires` (hires
            fix's second pass) or `face` (ADetailer inpainting one face).
        face: `(k, n)`: ADetailer is on face k of the n it found in the image.
        server: The name of the WebUI server the job runs on, when a worker has several; else None
            (in `sdjobs watch`: that name, else the server's URL).
        eta: Seconds left in this stage, None while still calculating.
        job_eta: Seconds left in the whole job, None while still calculating.
        seed: The job's seed; known before the first request.
        started_at: Unix time the job started.
        state: Where the job is (`JobState`).
        queue_position: `(i, n)` while the server holds our request in its queue.
        preview: Base64 live preview, when the user asked for one and the server sent it.
        folder: The job's output folder, once it is made (None before, and for a job
            whose folder could not be made).
        worker: The worker running the job, `"3fa2b1c0 on gpu1"`: set in what `sdjobs watch`
            shows (the same hooks, from every worker of the queue); None in a worker's own hooks.
    """

    job_id: str
    name: str
    stage: str
    stage_index: int
    stage_count: int
    progress: float = attrs.field(default=0.0, validator=_unit_interval)
    job_progress: float = attrs.field(default=0.0, validator=_unit_interval)
    image: int | None = None
    images: int | None = None
    step: int | None = None
    steps: int | None = None
    pass_kind: str | None = None
    face: tuple[int, int] | None = None
    server: str | None = None
    eta: float | None = None
    job_eta: float | None = None
    seed: int | None = None
    started_at: float = 0.0
    state: JobState = JobState.QUEUED
    queue_position: tuple[int, int] | None = None
    preview: str | None = attrs.field(default=None, repr=False)
    folder: Path | None = None
    worker: str | None = None

    @property
    def stage_label(self) -> str:
        """`"2/3 img2img"`: the 1-based stage number, the count and the stage type."""
        return f"{self.stage_index + 1}/{self.stage_count} {self.stage}"

    @property
    def percent(self) -> int:
        """The stage's progress as a whole percentage, rounded down."""
        return int(self.progress * 100)

    def to_dict(self) -> dict[str, Any]:
        """The status as plain JSON-ready data, without its preview (for the store's feed)."""
        data = attrs.asdict(self, recurse=False, filter=lambda field, _: field.name != "preview")
        return data | {"state": str(self.state), "folder": None if self.folder is None else str(self.folder)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RuntimeStatus:
        """The status `to_dict` made, rebuilt equal but for the preview (for `sdjobs watch`); a field
        this sdjobs does not know (a newer worker's) is left out."""
        known = {name: value for name, value in data.items() if name in attrs.fields_dict(cls)}
        pairs = {name: None if data.get(name) is None else tuple(data[name]) for name in ("face", "queue_position")}
        folder = None if data.get("folder") is None else Path(data["folder"])
        return cls(**{**known, **pairs, "state": JobState(data["state"]), "folder": folder})


@attrs.frozen
class StageResult:
    """What one finished stage produced.

    Attributes:
        stage: The stage's type.
        stage_index: 0-based index of the stage.
        images: Paths of the images written, in order.
        infos: The server's parsed `info` for each request of the stage.
        seeds: The seeds the server reports it used (`all_seeds`), per image.
        started_at: Unix time the stage started.
        elapsed: Seconds the stage took.
        partial: True when the stage was cut short (a cancel, a failure, a failed check):
            its images, if any, are kept but are not all the stage was to make.
        cut: Where an interrupt cut the stage's last request, when one did: `pass`
            (`main`, `hires` or `face`), `face` (`[k, n]` or None), `step` and
            `steps` (the last step seen before the interrupt: the server may
            finish one more), and `images`, the paths of the images it cut (the
            batch being sampled), which record the same in their PNG text.
        timing: What its requests showed of the server's speed (`StageTracker.timing`),
            which the server's history learns from; None when no step was timed.
        server: The name of the server that ran it, when the worker had several; else None.
    """

    stage: str
    stage_index: int
    images: tuple[Path, ...] = ()
    infos: tuple[Mapping[str, Any], ...] = attrs.field(default=(), repr=False)
    seeds: tuple[int, ...] = ()
    started_at: float = 0.0
    elapsed: float = 0.0
    partial: bool = False
    cut: Mapping[str, Any] | None = None
    timing: Mapping[str, Any] | None = attrs.field(default=None, repr=False)
    server: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The result as plain JSON-ready data (for the manifest and the store)."""
        return {
            "stage": self.stage,
            "stage_index": self.stage_index,
            "images": [str(image) for image in self.images],
            "infos": [dict(info) for info in self.infos],
            "seeds": list(self.seeds),
            "started_at": self.started_at,
            "elapsed": self.elapsed,
            "partial": self.partial,
            "cut": None if self.cut is None else dict(self.cut),
            "timing": None if self.timing is None else dict(self.timing),
            "server": self.server,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StageResult:
        """The result `to_dict` made, rebuilt equal (for a stage read back from the store)."""
        return cls(
            stage=data["stage"],
            stage_index=data["stage_index"],
            images=tuple(Path(image) for image in data["images"]),
            infos=tuple(dict(info) for info in data["infos"]),
            seeds=tuple(data["seeds"]),
            started_at=data["started_at"],
            elapsed=data["elapsed"],
            partial=data["partial"],
            cut=data.get("cut"),  # None in a record written before cuts were recorded
            timing=data.get("timing"),
            server=data.get("server"),  # None in a record written before servers were recorded
        )
