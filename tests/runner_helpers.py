"""Running real jobs against the simulated WebUI from tests.

`job_spec` builds small jobs, `HookLog` records every hook (the queue's and the servers' too) and
lets a test wait for one, `make_lanes` gives a worker several servers, `Said` waits for a log record, and `Background` runs a blocking call (a runner's
`run`) on a thread that the test joins with a timeout.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from sdjobs import hookimpl
from sdjobs.client import Timeouts, WebUIClient
from sdjobs.hooks import Hooks, make_plugin_manager
from sdjobs.job import JobSettings
from sdjobs.lanes import Lane, Lanes
from sdjobs.runner import Runner
from sdjobs.servers import ServerConfig
from sdjobs.sim import SimulatedWebUI
from sdjobs.spec import JobSpec
from sdjobs.status import RuntimeStatus
from sdjobs.testing import HookRecorder

STEPS = 8
SEED = 1234

#: A stage of each type, as `job_spec` adds it after the txt2img stage.
LATER_STAGES = {
    "img2img": {"type": "img2img", "denoising_strength": 0.5},
    "adetailer": {"type": "adetailer", "ad_model": "face_yolov8n.pt"},
    "upscale": {"type": "upscale", "upscaler": "Lanczos", "scale": 2},
}
ALL_STAGES = ("txt2img", "img2img", "adetailer", "upscale")

#: The simulator's routes that start a generation, and those that report progress.
GENERATION_PATHS = ("/sdapi/v1/txt2img", "/sdapi/v1/img2img", "/sdapi/v1/extra-single-image")
PROGRESS_PATHS = ("/sdapi/v1/progress", "/internal/progress")

#: Fast enough that every stage shows several samples at the simulator's small step times.
FAST = JobSettings(poll_interval=0.02)


def job_spec(
    stages: Sequence[str] = ("txt2img",),
    *,
    name: str = "lighthouse",
    seed: int = SEED,
    steps: int = STEPS,
    **settings: Any,
) -> JobSpec:
    """A job of 64x64 images through ``stages`` (txt2img first); ``settings`` go to `[settings]`."""
    return JobSpec.from_mapping(
        {
            "name": name,
            "prompt": "a lighthouse at dusk",
            "seed": seed,
            "settings": {"steps": steps, "width": 64, "height": 64, "sampler_name": "Euler a", **settings},
            "stages": [{"type": "txt2img"}, *(LATER_STAGES[kind] for kind in stages[1:])],
        }
    )


#: A filter on a hook call's arguments, for `HookLog.wait_for` and `HookLog.find`.
Where = Callable[[dict[str, Any]], bool]


#: With `SimSettings(drop_connection_at_step=6)`: txt2img samples 4 steps, img2img 11 and its
#: connection drops at the 6th.
DROPPED_IN_STAGE_TWO = JobSpec.from_mapping(
    {
        "name": "dropped",
        "prompt": "a lighthouse",
        "seed": 1234,
        "settings": {"steps": 4, "width": 64, "height": 64},
        "stages": [{"type": "txt2img"}, {"type": "img2img", "steps": 20, "denoising_strength": 0.5}],
    }
)


def any_call(kwargs: dict[str, Any]) -> bool:
    return True


def in_stage(index: int) -> Where:
    """Calls whose status is in stage ``index`` (0-based)."""
    return lambda kwargs: kwargs["status"].stage_index == index


class HookLog(HookRecorder):
    """A `HookRecorder` that also records the queue's hooks and a WebUI that is down, and that a
    test can wait on.

    Every call is stamped with `time.monotonic()` in ``times``, comparable with
    the simulator's `requests`.
    """

    def __init__(self) -> None:
        super().__init__()
        self.times: list[float] = []
        self._changed = threading.Condition()

    def _record(self, name: str, **kwargs: Any) -> None:
        with self._changed:
            super()._record(name, **kwargs)
            self.times.append(time.monotonic())
            self._changed.notify_all()

    @hookimpl
    def sdjobs_job_queued(self, job_id, spec):
        self._record("job_queued", job_id=job_id)

    @hookimpl
    def sdjobs_queue_drained(self, outcomes):
        self._record("queue_drained", outcomes=dict(outcomes))

    @hookimpl
    def sdjobs_webui_unreachable(self, status, error, retry_in, waited):
        self._record("webui_unreachable", status=status, error=error, retry_in=retry_in, waited=waited)

    @hookimpl
    def sdjobs_server_up(self, server, url):
        self._record("server_up", server=server, url=url)

    @hookimpl
    def sdjobs_server_down(self, server, url, error):
        self._record("server_down", server=server, url=url, error=error)

    def wait_for(self, name: str, where: Where = any_call, timeout: float = 5.0) -> bool:
        """Wait until hook ``name`` was called with arguments ``where`` accepts; False on timeout."""
        with self._changed:
            return self._changed.wait_for(lambda: self.find(name, where) is not None, timeout)

    def find(self, name: str, where: Where = any_call) -> int | None:
        """Index of the first call of ``name`` that ``where`` accepts, or None."""
        return next((i for i, (n, kwargs) in enumerate(self.calls) if n == name and where(kwargs)), None)

    def time_of(self, name: str) -> float:
        """When hook ``name`` was first called (monotonic seconds)."""
        index = self.find(name)
        assert index is not None, f"{name} was never called"
        return self.times[index]

    def statuses(self, name: str | None = "progress") -> list[RuntimeStatus]:
        """The statuses handed to hook ``name``; to every hook when None."""
        return [kwargs["status"] for n, kwargs in self.calls if name in (n, None) and "status" in kwargs]

    def one(self, name: str) -> dict[str, Any]:
        """The arguments of the one call of ``name``."""
        [kwargs] = [kwargs for n, kwargs in self.calls if n == name]
        return kwargs


def make_runner(
    client: WebUIClient,
    specs: Sequence[JobSpec],
    out_dir: Path,
    *,
    plugins: Iterable[object] = (),
    disabled: Iterable[str] = (),
    settings: JobSettings = FAST,
) -> tuple[Runner, HookLog]:
    """A runner with the built-in plugins (less ``disabled``), ``plugins`` and a `HookLog`."""
    log = HookLog()
    pm = make_plugin_manager(load_entry_points=False, disabled=disabled, plugins=[log, *plugins])
    return Runner(specs=specs, client=client, hooks=Hooks(pm), out_dir=out_dir, settings=settings), log


def make_lanes(urls: dict[str, str], out_dir: Path, *, plugins: Iterable[object] = (), **lanes_options: Any) -> tuple[Lanes, HookLog]:
    """A lane per named server, their runners sharing one `HookLog`'s hooks; the clients' short
    calls time out after 0.5 s, so a hung server is found at once."""
    log = HookLog()
    hooks = Hooks(make_plugin_manager(load_entry_points=False, plugins=[log, *plugins]))
    lanes = [Lane(ServerConfig(name, url), Runner(specs=[], client=WebUIClient(url, timeouts=Timeouts(read=0.5)), hooks=hooks,
                                                  out_dir=out_dir, settings=FAST, server=name))
             for name, url in urls.items()]  # fmt: skip
    return Lanes(lanes, **lanes_options), log


class Said(logging.Handler):
    """Sets `seen` once a record with ``text`` in its message reaches the logger it is added to."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text, self.seen = text, threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if self.text in record.getMessage():
            self.seen.set()


class Background:
    """A blocking call on a thread of its own; `join` waits for its result with a timeout."""

    def __init__(self, call: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        self.result: Any = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(call, args, kwargs), daemon=True)
        self._thread.start()

    def _run(self, call: Callable[..., Any], args: tuple, kwargs: dict[str, Any]) -> None:
        try:
            self.result = call(*args, **kwargs)
        except BaseException as exc:  # handed to the test by join()
            self.error = exc

    def join(self, timeout: float = 10.0) -> Any:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the call did not return"
        if self.error is not None:
            raise self.error
        return self.result


def assert_monotonic(statuses: Sequence[RuntimeStatus]) -> None:
    """Stages only go forward, stage progress only within a stage, job progress always."""
    for before, after in zip(statuses, statuses[1:]):
        assert after.job_progress >= before.job_progress, (before, after)
        if after.stage_index == before.stage_index:
            assert after.progress >= before.progress, (before, after)
        else:
            assert after.stage_index > before.stage_index, (before, after)


def requests_to(sim: SimulatedWebUI, paths: Sequence[str], *, after: float = 0.0) -> list[tuple[float, str, str]]:
    """The simulator's requests to any of ``paths`` received after monotonic time ``after``."""
    return [request for request in sim.requests if request[2] in paths and request[0] > after]
