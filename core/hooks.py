"""The plugin manager and `Hooks`, the typed facade through which sdjobs calls hooks.

No module but this one touches ``pm.hook``.  Observer hooks are called one
implementation at a time, so that a plugin that raises is logged by name and
the others still run; control hooks let errors through as `PluginError`.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import pluggy

from sdjobs import hookspecs
from sdjobs.hookspecs import PROJECT

if TYPE_CHECKING:
    from sdjobs.polling import PollRequest, Poller
    from sdjobs.spec import JobSpec, StageSpec
    from sdjobs.status import JobState, RuntimeStatus, StageResult

log = logging.getLogger(__name__)

#: Built-in plugins, registered like third-party ones under their module name,
#: each mapped to the name pyproject gives it in the entry-point group `sdjobs`:
#: blocking either name blocks it.
DEFAULT_PLUGINS: Mapping[str, str] = {"sdjobs.plugins.progress_poller": "progress"}

#: Comma-separated plugin names that must not be loaded.
DISABLE_ENV = "SDJOBS_DISABLE_PLUGINS"


class PluginError(Exception):
    """A control hook's implementation raised; the job fails with this message."""

    def __init__(self, plugin: str, hook: str, error: BaseException) -> None:
        self.plugin = plugin
        self.hook = hook
        super().__init__(f"plugin {plugin!r} failed in {hook}: {error}")


def disabled_plugins(environ: Mapping[str, str] = os.environ) -> frozenset[str]:
    """The plugin names listed in ``SDJOBS_DISABLE_PLUGINS`` (comma-separated, blanks ignored)."""
    return frozenset(name.strip() for name in environ.get(DISABLE_ENV, "").split(",") if name.strip())


def make_plugin_manager(
    *,
    load_entry_points: bool = True,
    disabled: Iterable[str] | None = None,
    plugins: Iterable[object] = (),
) -> pluggy.PluginManager:
    """A plugin manager with the built-ins, entry-point plugins and ``plugins``.

    ``disabled`` (default: from ``SDJOBS_DISABLE_PLUGINS``) names plugins to
    block; a built-in is blocked by its module or its entry-point name.  Tests
    pass ``load_entry_points=False``.
    """
    pm = pluggy.PluginManager(PROJECT)
    pm.add_hookspecs(hookspecs)
    for name in disabled_plugins() if disabled is None else disabled:
        pm.set_blocked(name)
    for module_name, entry_point_name in DEFAULT_PLUGINS.items():
        if not (pm.is_blocked(module_name) or pm.is_blocked(entry_point_name)):
            pm.register(importlib.import_module(module_name), name=module_name)
    if load_entry_points:
        _load_entry_points(pm)
    for plugin in plugins:
        pm.register(plugin)
    pm.check_pending()
    return pm


def _load_entry_points(pm: pluggy.PluginManager) -> None:
    """Load the group `sdjobs`, skipping built-ins that are also declared there."""
    from importlib.metadata import entry_points

    for ep in entry_points(group=PROJECT):
        # A built-in was registered, or blocked, above under its module name; loading
        # its entry point would register it twice, or undo the block.
        if ep.value in DEFAULT_PLUGINS or pm.is_blocked(ep.name) or pm.has_plugin(ep.name):
            continue
        try:
            plugin = ep.load()
        except Exception as exc:  # one broken plugin must not take sdjobs down
            log.error("plugin %r (%s) failed to load: %s", ep.name, ep.value, exc)
            continue
        pm.register(plugin, name=ep.name)


def describe_plugins(pm: pluggy.PluginManager) -> list[dict[str, Any]]:
    """Each loaded plugin and the hooks it implements, as `sdjobs plugins` prints them."""
    hooks_by_plugin: dict[str, list[str]] = {}
    for name, caller in vars(pm.hook).items():
        if isinstance(caller, pluggy.HookCaller):
            for impl in caller.get_hookimpls():
                hooks_by_plugin.setdefault(impl.plugin_name, []).append(name)
    return [
        {"name": name, "hooks": sorted(hooks_by_plugin.get(name, ()))}
        for name, plugin in sorted(pm.list_name_plugin())
        if plugin is not None  # blocked names are listed with no plugin
    ]


class Hooks:
    """Calls the hooks of one plugin manager, one method per hook.

    Every implementation is called on its own, so wrappers (``wrapper=True`` or
    ``hookwrapper=True``) have nothing to wrap: they are skipped, with a warning
    naming the plugin, the first time their hook is called.
    """

    def __init__(self, pm: pluggy.PluginManager) -> None:
        self.pm = pm
        self._skipped: set[tuple[str, str]] = set()

    def _impls(self, hook: str, kwargs: dict[str, Any]) -> Iterator[tuple[str, Callable[[], Any]]]:
        """Each implementation of ``hook`` but wrappers, in pluggy's calling order, ready to call."""
        for impl in reversed(getattr(self.pm.hook, hook).get_hookimpls()):
            if impl.wrapper or impl.hookwrapper:
                self._skip_wrapper(impl.plugin_name, hook)
                continue
            args = [kwargs[name] for name in impl.argnames]
            yield impl.plugin_name, functools.partial(impl.function, *args)

    def _skip_wrapper(self, plugin: str, hook: str) -> None:
        if (plugin, hook) not in self._skipped:
            self._skipped.add((plugin, hook))
            log.warning("plugin %r: %s is a wrapper, which sdjobs does not call; it is skipped", plugin, hook)

    def _observe(self, hook: str, **kwargs: Any) -> None:
        for plugin, call in self._impls(hook, kwargs):
            try:
                call()
            except Exception:
                log.exception("plugin %r failed in %s; the job goes on", plugin, hook)

    def _control(self, hook: str, *, first: bool = False, **kwargs: Any) -> Any:
        for plugin, call in self._impls(hook, kwargs):
            try:
                result = call()
            except Exception as exc:
                raise PluginError(plugin, hook, exc) from exc
            if first and result is not None:
                return result
        return None

    # observer hooks --------------------------------------------------------

    def job_queued(self, job_id: str, spec: JobSpec) -> None:
        self._observe("sdjobs_job_queued", job_id=job_id, spec=spec)

    def queue_drained(self, outcomes: Mapping[str, JobState]) -> None:
        self._observe("sdjobs_queue_drained", outcomes=outcomes)

    def job_started(self, status: RuntimeStatus, spec: JobSpec) -> None:
        self._observe("sdjobs_job_started", status=status, spec=spec)

    def stage_started(self, status: RuntimeStatus, stage: StageSpec) -> None:
        self._observe("sdjobs_stage_started", status=status, stage=stage)

    def progress(self, status: RuntimeStatus) -> None:
        self._observe("sdjobs_progress", status=status)

    def stage_finished(self, status: RuntimeStatus, result: StageResult) -> None:
        self._observe("sdjobs_stage_finished", status=status, result=result)

    def job_stalled(self, status: RuntimeStatus, seconds: float) -> None:
        self._observe("sdjobs_job_stalled", status=status, seconds=seconds)

    def job_finished(
        self,
        status: RuntimeStatus,
        outcome: JobState,
        error: str | None,
        results: tuple[StageResult, ...],
    ) -> None:
        self._observe(
            "sdjobs_job_finished", status=status, outcome=outcome, error=error, results=results
        )

    # control hooks ---------------------------------------------------------

    def amend_payload(self, payload: dict[str, Any], stage: StageSpec, status: RuntimeStatus) -> None:
        self._control("sdjobs_amend_payload", payload=payload, stage=stage, status=status)

    def start_polling(self, request: PollRequest) -> Poller | None:
        return self._control("sdjobs_start_polling", first=True, request=request)
