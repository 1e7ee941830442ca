"""Pytest fixtures for people who test sdjobs plugins (and for sdjobs' own tests).

Installed as a `pytest11` plugin, so the fixtures are there in any project that
has sdjobs installed:

* `sim_settings`: the simulated WebUI's settings; override it in a test module.
* `webui_sim`: a simulated WebUI on a free port on 127.0.0.1, stopped after the test.
* `webui_client`: a `WebUIClient` talking to `webui_sim`.
* `plugin_manager`: sdjobs' plugin manager with the built-ins, no entry points.
* `register_plugin`: registers a plugin for one test and unregisters it after; a plugin
  that sdjobs would skip (a misspelt hook, say) fails the test with the reason.
* `fake_clock`: a clock that moves only when the test says so.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from sdjobs.client import WebUIClient
from sdjobs.clock import FakeClock
from sdjobs.hooks import PluginManager, make_plugin_manager
from sdjobs.sim import SimSettings, SimulatedWebUI


@pytest.fixture
def sim_settings() -> SimSettings:
    """Fast steps, so a test's job takes milliseconds; override to change faults."""
    return SimSettings(step_time=0.002, first_step_time=0.002)


@pytest.fixture
def webui_sim(sim_settings: SimSettings) -> Iterator[SimulatedWebUI]:
    with SimulatedWebUI(sim_settings) as sim:
        yield sim


@pytest.fixture
def webui_client(webui_sim: SimulatedWebUI) -> Iterator[WebUIClient]:
    auth = tuple(webui_sim.settings.api_auth.split(":", 1)) if webui_sim.settings.api_auth else None
    with WebUIClient(webui_sim.url, auth=auth) as client:
        yield client


@pytest.fixture
def plugin_manager() -> PluginManager:
    return make_plugin_manager(load_entry_points=False, disabled=())


@pytest.fixture
def register_plugin(plugin_manager: PluginManager) -> Iterator[Callable[[object], object]]:
    registered: list[object] = []

    def register(plugin: object, name: str | None = None) -> object:
        name = name or f"{getattr(plugin, '__name__', type(plugin).__name__)}-{id(plugin)}"
        reason = plugin_manager.try_register(plugin, name)
        if reason is not None:
            pytest.fail(f"sdjobs would skip the plugin {name!r}: {reason}", pytrace=False)
        registered.append(plugin)
        return plugin

    yield register
    for plugin in registered:
        plugin_manager.unregister(plugin)


@pytest.fixture
def fake_clock() -> FakeClock:
    return FakeClock()
