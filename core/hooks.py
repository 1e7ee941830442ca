"""The plugin manager and `Hooks`, the typed facade through which sdjobs calls hooks.

One rule for every plugin, built-in or installed: one that cannot be imported,
that pluggy refuses, that implements a hook sdjobs does not have, or whose
registration hook fails is recorded as a `PluginFailure` (its name and why, in
one line) and skipped.  Loading never raises; the command line reports each
failure once.

No module but this one touches ``pm.hook``.  Observer hooks are called one
implementation at a time, so that a plugin that raises is logged by name and
the others still run; control hooks let errors through as `PluginError`.  Each
implementation is still called through pluggy, so hook-call monitoring
(``SDJOBS_TRACE_PLUGINS``) sees every call.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import inspect
import logging
import os
import sys
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any

import attrs
import pluggy

from sdjobs import hookspecs
from sdjobs.hookspecs import PROJECT

if TYPE_CHECKING:
    from sdjobs.polling import PollRequest, Poller
    from sdjobs.spec import JobSpec, StageSpec
    from sdjobs.status import JobState, RuntimeStatus, StageResult
    from sdjobs.store import JobRecord

log = logging.getLogger(__name__)

#: Built-in plugins, by module name, which is also their plugin name.  They are
#: registered first, and always; pyproject declares them as entry points of the
#: group `sdjobs` too (for packaging tools), which the loader skips.
DEFAULT_PLUGINS: tuple[str, ...] = (
    "sdjobs.plugins.progress_poller",
    "sdjobs.frontends.console",
    "sdjobs.frontends.jsonl",
    "sdjobs.frontends.log",
    "sdjobs.frontends.tk",
)

#: Comma-separated plugin names that must not be loaded.
DISABLE_ENV = "SDJOBS_DISABLE_PLUGINS"

#: Set (to anything but "" or "0") to write every hook call to stderr.
TRACE_ENV = "SDJOBS_TRACE_PLUGINS"


class PluginError(Exception):
    """A control hook's implementation raised; the job fails with this message."""

    def __init__(self, plugin: str, hook: str, error: BaseException) -> None:
        self.plugin = plugin
        self.hook = hook
        super().__init__(f"plugin {plugin!r} failed in {hook}: {error}")


@attrs.frozen
class PluginFailure:
    """A plugin that was skipped, and why.

    Attributes:
        name: The plugin's name (its entry point's, or a built-in's module).
        reason: Why, in one line.
    """

    name: str
    reason: str

    def __str__(self) -> str:
        return f"plugin {self.name!r} skipped: {self.reason}"


def _did_you_mean(name: str, names: Iterable[str]) -> str:
    """`` (did you mean 'X'?)`` with the closest of ``names``, or nothing when none is close."""
    close = difflib.get_close_matches(name, list(names), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


class PluginManager(pluggy.PluginManager):
    """pluggy's plugin manager for sdjobs' hooks, keeping what went wrong while loading.

    Attributes:
        failures: Each plugin skipped, in the order it happened.
        warnings: Other problems worth a line: a name to disable that matches no plugin.
    """

    def __init__(self) -> None:
        super().__init__(PROJECT)
        self.add_hookspecs(hookspecs)
        self.hook_names = frozenset(
            name for name, caller in vars(self.hook).items() if isinstance(caller, pluggy.HookCaller)
        )
        self.failures: list[PluginFailure] = []
        self.warnings: list[str] = []

    def load(self, name: str, import_plugin: Callable[[], object]) -> None:
        """Import a plugin with ``import_plugin()`` and register it as ``name``; one that fails is skipped."""
        try:
            plugin = import_plugin()
        except Exception as exc:  # a broken plugin is reported, not raised
            self.failures.append(PluginFailure(name, f"cannot be imported: {type(exc).__name__}: {exc}"))
            return
        reason = self.try_register(plugin, name)
        if reason is not None:
            self.failures.append(PluginFailure(name, reason))

    def try_register(self, plugin: object, name: str) -> str | None:
        """Register ``plugin`` as ``name``, or leave it out and say why not, in one line."""
        if self.has_plugin(name):
            return f"another plugin is registered as {name!r}"
        if self.is_registered(plugin):
            return f"it is registered already, as {self.get_name(plugin)!r}"
        try:
            self.register(plugin, name=name)
        except pluggy.PluginValidationError as exc:
            return "; ".join(str(exc).splitlines())
        unknown = [
            caller.name
            for caller in self.get_hookcallers(plugin) or ()
            if not caller.has_spec()
            and any(impl.plugin is plugin and not impl.optionalhook for impl in caller.get_hookimpls())
        ]
        if not unknown:
            return None
        self.unregister(plugin)
        return "; ".join(
            f"it implements {hook}, which is not an sdjobs hook{_did_you_mean(hook, self.hook_names)}"
            for hook in sorted(unknown)
        )

    def skip(self, name: str, reason: str) -> None:
        """Unregister the plugin ``name``, which turned out broken after it was loaded."""
        self.unregister(name=name)
        self.failures.append(PluginFailure(name, reason))


def disabled_plugins(environ: Mapping[str, str] = os.environ) -> frozenset[str]:
    """The plugin names listed in ``SDJOBS_DISABLE_PLUGINS`` (comma-separated, blanks ignored)."""
    return frozenset(name.strip() for name in environ.get(DISABLE_ENV, "").split(",") if name.strip())


def tracing(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether ``SDJOBS_TRACE_PLUGINS`` asks for every hook call to be written out."""
    return environ.get(TRACE_ENV, "") not in ("", "0")


def make_plugin_manager(
    *,
    load_entry_points: bool = True,
    disabled: Iterable[str] | None = None,
    plugins: Iterable[object] = (),
    trace: bool | None = None,
) -> PluginManager:
    """A plugin manager with the built-ins, the entry-point plugins and ``plugins``.

    Built-ins and entry points that fail are skipped and listed in
    `PluginManager.failures`; ``plugins``, given by code, must be valid (pluggy
    raises otherwise).  ``disabled`` (default: from ``SDJOBS_DISABLE_PLUGINS``)
    names plugins not to load; one that matches no built-in or entry point is
    added to `PluginManager.warnings`.  ``trace`` (default: from
    ``SDJOBS_TRACE_PLUGINS``) writes every hook call to stderr.  Tests pass
    ``load_entry_points=False``.
    """
    pm = PluginManager()
    blocked = disabled_plugins() if disabled is None else frozenset(disabled)
    for name in blocked:
        pm.set_blocked(name)
    for name in DEFAULT_PLUGINS:
        if not pm.is_blocked(name):
            pm.load(name, functools.partial(importlib.import_module, name))
    known = set(DEFAULT_PLUGINS)
    if load_entry_points:
        known |= _load_entry_points(pm)
    pm.warnings += [
        f"{DISABLE_ENV}: no plugin is named {name!r}{_did_you_mean(name, known)}" for name in sorted(blocked - known)
    ]
    for plugin in plugins:
        pm.register(plugin)
    pm.check_pending()
    if (tracing() if trace is None else trace):
        pm.add_hookcall_monitoring(_trace_call, _trace_outcome)
    return pm


def _load_entry_points(pm: PluginManager) -> set[str]:
    """Load the group `sdjobs`, but what is blocked and the built-ins; returns every name seen."""
    seen = set()
    for ep in entry_points(group=PROJECT):
        seen.add(ep.name)
        if ep.value not in DEFAULT_PLUGINS and not pm.is_blocked(ep.name):
            pm.load(ep.name, ep.load)
    return seen


def _trace_call(hook: str, impls: Sequence[pluggy.HookImpl], kwargs: Mapping[str, Any]) -> None:
    arguments = ", ".join(f"{name}={value!r}" for name, value in kwargs.items())
    plugins = ", ".join(repr(impl.plugin_name) for impl in impls)
    print(f"sdjobs: trace: {hook}({arguments}) -> {plugins}", file=sys.stderr, flush=True)


def _trace_outcome(
    outcome: pluggy.Result[Any], hook: str, impls: Sequence[pluggy.HookImpl], kwargs: Mapping[str, Any]
) -> None:
    plugins = ", ".join(repr(impl.plugin_name) for impl in impls)
    error = outcome.exception
    result = f"raised {type(error).__name__}: {error}" if error else f"returned {outcome.get_result()!r}"
    print(f"sdjobs: trace: {hook} <- {plugins} {result}", file=sys.stderr, flush=True)


def plugin_loggers(pm: PluginManager) -> tuple[str, ...]:
    """The loggers plugins log to, by convention: each loaded plugin's top-level package
    (``logging.getLogger(__name__)`` in `mylora.plugin` logs under `mylora`); `sdjobs` first.

    The log front end writes their records as it writes sdjobs' own.
    """
    names = set()
    for plugin in pm.get_plugins():
        module = plugin.__name__ if inspect.ismodule(plugin) else getattr(plugin, "__module__", None)
        if isinstance(module, str) and module != "__main__":
            names.add(module.partition(".")[0])
    return ("sdjobs", *sorted(names - {"sdjobs"}))


def describe_plugins(
    pm: PluginManager, frontends: Mapping[str, str] | None = None
) -> dict[str, list[dict[str, Any]]]:
    """What `sdjobs plugins` prints: each loaded plugin with its hooks and front ends, each skipped one with why.

    ``frontends`` maps each front end's name to the plugin that registered it.
    """
    frontends = frontends or {}
    hooks_by_plugin: dict[str, list[str]] = {}
    for name, caller in vars(pm.hook).items():
        if isinstance(caller, pluggy.HookCaller):
            for impl in caller.get_hookimpls():
                hooks_by_plugin.setdefault(impl.plugin_name, []).append(name)
    loaded = [
        {
            "name": name,
            "hooks": sorted(hooks_by_plugin.get(name, ())),
            "frontends": sorted(frontend for frontend, owner in frontends.items() if owner == name),
        }
        for name, plugin in sorted(pm.list_name_plugin())
        if plugin is not None  # blocked names are listed with no plugin
    ]
    return {"loaded": loaded, "failed": [attrs.asdict(failure) for failure in pm.failures]}


class Hooks:
    """Calls the hooks of one plugin manager, one method per hook.

    Every implementation is called on its own, so wrappers (``wrapper=True`` or
    ``hookwrapper=True``) have nothing to wrap: they are skipped, with a warning
    naming the plugin, the first time their hook is called.  An observer that
    raises is logged with its traceback the first time in a job; its later
    failures in that hook are counted and summed up in one line when the job ends,
    so a plugin failing on every progress tick does not flood the display.
    """

    def __init__(self, pm: PluginManager) -> None:
        self.pm = pm
        self._skipped: set[tuple[str, str]] = set()
        self._failures: Counter[tuple[str, str]] = Counter()
        self._failures_lock = threading.Lock()  # a worker's watch thread fires hooks too

    def _impls(self, hook: str) -> Iterator[pluggy.HookImpl]:
        """Each implementation of ``hook`` but wrappers, in pluggy's calling order."""
        for impl in reversed(getattr(self.pm.hook, hook).get_hookimpls()):
            if impl.wrapper or impl.hookwrapper:
                self._skip_wrapper(impl.plugin_name, hook)
            else:
                yield impl

    def _call(self, hook: str, impl: pluggy.HookImpl, kwargs: dict[str, Any]) -> Any:
        """Call one implementation as pluggy calls a hook, where hook-call monitoring sees it.

        pluggy has no public way to call one implementation alone; `_hookexec`
        is what its hook callers call, and what `add_hookcall_monitoring` wraps.
        """
        return self.pm._hookexec(hook, (impl,), kwargs, True)

    def _skip_wrapper(self, plugin: str, hook: str) -> None:
        if (plugin, hook) not in self._skipped:
            self._skipped.add((plugin, hook))
            log.warning("plugin %r: %s is a wrapper, which sdjobs does not call; it is skipped", plugin, hook)

    def _observe(self, hook: str, **kwargs: Any) -> None:
        for impl in self._impls(hook):
            try:
                self._call(hook, impl, kwargs)
            except Exception:
                failure = (impl.plugin_name, hook)
                with self._failures_lock:
                    self._failures[failure] += 1
                    first = self._failures[failure] == 1
                if first:
                    log.exception("plugin %r failed in %s; the job goes on", *failure)

    def _sum_up_failures(self, job_id: str) -> None:
        """One line per plugin and hook that failed again after its first, logged, failure."""
        with self._failures_lock:
            failures = sorted(self._failures.items())
            self._failures.clear()
        for (plugin, hook), count in failures:
            if count > 1:
                log.warning("plugin %r failed %d more times in %s during job %s", plugin, count - 1, hook, job_id)

    def _control(self, hook: str, *, first: bool = False, **kwargs: Any) -> Any:
        for impl in self._impls(hook):
            try:
                result = self._call(hook, impl, kwargs)
            except Exception as exc:
                raise PluginError(impl.plugin_name, hook, exc) from exc
            if first and result is not None:
                return result
        return None

    # registration hooks ----------------------------------------------------

    def register_frontends(self) -> dict[str, list[object]]:
        """What each plugin registers in `sdjobs_register_frontends`, by plugin name.

        In the order the plugins were registered, so the built-ins come first.
        A plugin whose implementation raises is skipped (`PluginManager.skip`)
        with all it registered.
        """
        hook = "sdjobs_register_frontends"
        order = {name: index for index, (name, _) in enumerate(self.pm.list_name_plugin())}
        offered: dict[str, list[object]] = {}
        for impl in sorted(self._impls(hook), key=lambda impl: order[impl.plugin_name]):
            registered: list[object] = []
            try:
                self._call(hook, impl, {"register": registered.append})
            except Exception as exc:
                self.pm.skip(impl.plugin_name, f"{hook} raised {type(exc).__name__}: {exc}")
            else:
                offered[impl.plugin_name] = registered
        return offered

    # observer hooks --------------------------------------------------------

    def job_queued(self, job_id: str, spec: JobSpec) -> None:
        self._observe("sdjobs_job_queued", job_id=job_id, spec=spec)

    def queue_drained(self, outcomes: Mapping[str, JobState]) -> None:
        self._observe("sdjobs_queue_drained", outcomes=outcomes)

    def queue_changed(self, jobs: tuple[JobRecord, ...], expected_end: float | None = None) -> None:
        self._observe("sdjobs_queue_changed", jobs=jobs, expected_end=expected_end)

    def history_changed(self, jobs: tuple[JobRecord, ...]) -> None:
        self._observe("sdjobs_history_changed", jobs=jobs)

    def queue_paused(self) -> None:
        self._observe("sdjobs_queue_paused")

    def queue_resumed(self) -> None:
        self._observe("sdjobs_queue_resumed")

    def server_up(self, server: str, url: str) -> None:
        self._observe("sdjobs_server_up", server=server, url=url)

    def server_down(self, server: str, url: str, error: str) -> None:
        self._observe("sdjobs_server_down", server=server, url=url, error=error)

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

    def webui_unreachable(self, status: RuntimeStatus, error: str, retry_in: float, waited: float) -> None:
        self._observe("sdjobs_webui_unreachable", status=status, error=error, retry_in=retry_in, waited=waited)

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
        self._sum_up_failures(status.job_id)

    # control hooks ---------------------------------------------------------

    def amend_payload(self, payload: dict[str, Any], stage: StageSpec, status: RuntimeStatus) -> None:
        self._control("sdjobs_amend_payload", payload=payload, stage=stage, status=status)

    def start_polling(self, request: PollRequest) -> Poller | None:
        return self._control("sdjobs_start_polling", first=True, request=request)
