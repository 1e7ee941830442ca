"""What a front end is, and how the one the user asked for is found.

A front end is a class that a plugin offers through the hook
`sdjobs_register_frontends` (the built-in ones too, so a third party adds one
exactly as sdjobs does).  `collect_frontends` gathers them by name; the command
line picks a name with `choose_frontend`, makes one from `FrontendOptions`,
registers the instance as a pluggy plugin, so its `hookimpl`s see every event,
and calls `run(session)` on the main thread.  Front ends never import the
runner: `Session` is all they see of it, and `QueueControl` where the session
runs from the durable queue.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from pathlib import Path
from typing import ClassVar, Protocol, runtime_checkable

import attrs

from sdjobs.hooks import Hooks, PluginManager
from sdjobs.status import CancelMode

#: The environment variable that names a front end when `--frontend` is absent.
FRONTEND_ENV = "SDJOBS_FRONTEND"


class Session(Protocol):
    """The queue of jobs of one `sdjobs run`, as a front end drives it."""

    def run(self) -> None:
        """Run every queued job in order; return when the queue has drained.

        Blocks; a front end with its own event loop calls it on a worker thread.
        """

    def cancel(self, mode: CancelMode = CancelMode.NOW, *, rest: bool = False) -> None:
        """Ask the running job to stop; with ``rest``, run no further job either.

        Safe from any thread, returns at once; repeated calls are harmless.
        """


@runtime_checkable
class QueueControl(Protocol):
    """What a session that runs from the durable queue (a `Worker`) offers besides `Session`.

    Optional: a front end checks ``isinstance(session, QueueControl)`` and offers
    no pause where it fails (a plain `Runner`).  Each call changes the queue for
    every worker on it, and may wait a while for another process's lock.
    """

    def pause_queue(self, *, now: bool = False) -> None:
        """No job starts until `resume_queue`; with ``now`` the running job goes back to the queue too."""

    def resume_queue(self) -> None:
        """Undo `pause_queue`."""


@attrs.frozen
class FrontendOptions:
    """Settings a front end may use; each ignores what it has no use for.

    Attributes:
        log_file: Where the `log` front end writes (None: stderr).
        log_level: A `logging` level name.
        log_format: A `logging` format string (None: the front end's own).
        preview: Show the server's live preview where the front end can.
        close_when_done: The `tk` window closes by itself once every job ended,
            instead of staying open on the final state until the user closes it.
        loggers: The loggers whose records the `log` front end writes at `log_level`:
            sdjobs' own and the plugins' (`sdjobs.hooks.plugin_loggers`).  Any
            other library's warnings and errors are written too.
    """

    log_file: Path | None = None
    log_level: str = "INFO"
    log_format: str | None = None
    preview: bool = False
    close_when_done: bool = False
    loggers: tuple[str, ...] = ("sdjobs",)


class Frontend(Protocol):
    """A front end class, as a plugin registers it."""

    name: ClassVar[str]
    description: ClassVar[str]

    def __init__(self, options: FrontendOptions) -> None: ...

    def run(self, session: Session) -> int | None:
        """Show ``session`` while it runs it; return an exit status to force one.

        Called on the main thread.  None leaves the status to the jobs' outcomes.
        Raises `FrontendUnavailable`, before the session runs, when it cannot
        show anything here.
        """


@attrs.frozen
class RegisteredFrontend:
    """A front end, and the plugin that registered it.

    Attributes:
        cls: The class; ``cls(options)`` makes one.
        plugin: The registering plugin's name.
    """

    cls: type[Frontend]
    plugin: str

    @property
    def plugin_name(self) -> str:
        """The name its instance is registered under while it runs."""
        return f"frontend:{self.cls.name}"


class FrontendError(Exception):
    """The front end asked for cannot be used: a usage error (exit 2), nothing ran."""


class UnknownFrontendError(FrontendError, ValueError):
    """No front end of that name is registered; the message lists the ones that are."""

    def __init__(self, name: str, valid: Collection[str], source: str) -> None:
        self.name = name
        self.valid = sorted(valid)
        choices = ", ".join(self.valid) or "none is installed"
        super().__init__(f"unknown front end {name!r} (from {source}); choose one of: {choices}")


class FrontendUnavailable(FrontendError):
    """A front end cannot run here (the Tk window without a display)."""


def collect_frontends(hooks: Hooks) -> dict[str, RegisteredFrontend]:
    """Every front end the plugins register, by name, sorted.

    A plugin that registers anything but a front-end class (a class with a str
    ``name`` and ``description``), a class whose hooks pluggy refuses or sdjobs
    does not have, or a name an earlier plugin took, is skipped with all it
    registered (see `PluginManager.skip`).
    """
    found: dict[str, RegisteredFrontend] = {}
    for plugin, offered in hooks.register_frontends().items():
        mine: dict[str, RegisteredFrontend] = {}
        for cls in offered:
            frontend = RegisteredFrontend(cls, plugin)
            reason = _refusal(hooks.pm, frontend, taken=found | mine)
            if reason is not None:
                hooks.pm.skip(plugin, reason)
                break
            mine[cls.name] = frontend
        else:
            found |= mine
    return dict(sorted(found.items()))


def _refusal(pm: PluginManager, frontend: RegisteredFrontend, taken: Mapping[str, RegisteredFrontend]) -> str | None:
    """Why ``frontend`` cannot be one, or None.  Its hooks are checked as any plugin's are."""
    cls = frontend.cls
    if not (isinstance(cls, type) and all(isinstance(getattr(cls, key, None), str) for key in ("name", "description"))):
        return f"it registered {cls!r}, which is not a front-end class (a class with a str name and description)"
    if cls.name in taken:
        return f"front end {cls.name!r} is taken already, by plugin {taken[cls.name].plugin!r}"
    reason = pm.try_register(cls, frontend.plugin_name)
    if reason is not None:
        return f"front end {cls.name!r}: {reason}"
    pm.unregister(cls)
    return None


def choose_frontend(flag: str | None, env: Mapping[str, str], isatty: bool, available: Collection[str]) -> str:
    """The front end to use: ``flag``, else `SDJOBS_FRONTEND`, else console or log.

    The default is `console` when output goes to a terminal and `log` when it
    does not.  A name not in ``available`` raises `UnknownFrontendError`, which
    says where the name came from; there is no silent fallback.
    """
    if flag:
        name, source = flag, "--frontend"
    elif env.get(FRONTEND_ENV):
        name, source = env[FRONTEND_ENV], FRONTEND_ENV
    elif isatty:
        name, source = "console", "the default for a terminal"
    else:
        name, source = "log", "the default without a terminal"
    if name not in available:
        raise UnknownFrontendError(name, available, source)
    return name
