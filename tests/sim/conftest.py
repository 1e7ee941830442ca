"""Fixtures for the simulated WebUI's own tests."""

from __future__ import annotations

import base64
import io
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import requests
from PIL import Image

from sdjobs.sim import SimSettings, SimulatedWebUI

JOIN_TIMEOUT = 10.0


class BackgroundCall:
    """A blocking call (usually a generation POST) running on its own thread."""

    def __init__(self, function: Callable[[], Any]) -> None:
        self.done = threading.Event()
        self._value: Any = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(function,), daemon=True)
        self._thread.start()

    def _run(self, function: Callable[[], Any]) -> None:
        try:
            self._value = function()
        except BaseException as exc:  # noqa: BLE001 - handed to the test by result()
            self._error = exc
        finally:
            self.done.set()

    def join(self, timeout: float = JOIN_TIMEOUT) -> None:
        self._thread.join(timeout)

    def result(self, timeout: float = JOIN_TIMEOUT) -> Any:
        """The call's return value (re-raising its exception); fails if it is still running."""
        self.join(timeout)
        assert self.done.is_set(), f"the call did not finish within {timeout} s"
        if self._error is not None:
            raise self._error
        return self._value


@pytest.fixture
def background() -> Iterator[Callable[..., BackgroundCall]]:
    """`background(fn, *args, **kwargs)` runs `fn` on a thread; every one is joined at teardown."""
    calls: list[BackgroundCall] = []

    def start(function: Callable[..., Any], *args: Any, **kwargs: Any) -> BackgroundCall:
        call = BackgroundCall(lambda: function(*args, **kwargs))
        calls.append(call)
        return call

    yield start
    for call in calls:
        call.join()
        assert call.done.is_set(), "a background call outlived its test"


@pytest.fixture
def make_sim(background: Callable[..., BackgroundCall]) -> Iterator[Callable[..., SimulatedWebUI]]:
    """`make_sim(**settings)` starts a simulated WebUI; all are stopped at teardown.

    It depends on `background` so that the simulators stop (letting blocked calls go)
    before the background calls are joined.
    """
    sims: list[SimulatedWebUI] = []

    def make(**settings: Any) -> SimulatedWebUI:
        sim = SimulatedWebUI(SimSettings(**settings)).start()
        sims.append(sim)
        return sim

    yield make
    for sim in sims:
        sim.stop()


@pytest.fixture
def stepping_sim(make_sim: Callable[..., SimulatedWebUI]) -> SimulatedWebUI:
    """A simulator whose sampling steps happen only when the test releases them."""
    return make_sim(stepping=True)


@pytest.fixture
def fast_sim(make_sim: Callable[..., SimulatedWebUI]) -> SimulatedWebUI:
    """A simulator whose steps take no time: for results, not for states."""
    return make_sim(step_time=0.0, first_step_time=0.0)


def png_base64(width: int = 64, height: int = 64, color: tuple[int, int, int] = (90, 120, 150)) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def decode_png(encoded: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(encoded)))
    image.load()
    return image


def post(sim: SimulatedWebUI, path: str, body: Any = None, **kwargs: Any) -> requests.Response:
    return requests.post(sim.url + path, json=body, timeout=JOIN_TIMEOUT, **kwargs)


def get(sim: SimulatedWebUI, path: str, **kwargs: Any) -> requests.Response:
    return requests.get(sim.url + path, timeout=JOIN_TIMEOUT, **kwargs)


TXT2IMG = {"prompt": "a cat", "width": 64, "height": 64, "steps": 4, "seed": 1234, "sampler_name": "Euler a"}
