"""What a front end is, and how the one the user asked for is found.

A front end is a class registered under the entry-point group `sdjobs.frontends`
(the built-in ones too, so a third party adds one exactly as sdjobs does).  The
built-ins are also listed in `BUILTIN_FRONTENDS`, so a checkout whose installed
entry points are stale still has them.  The command line picks a name with
`choose_frontend`, loads the class with `load_frontend`, makes one from
`FrontendOptions`, registers the instance as a pluggy plugin, so its
`hookimpl`s see every event, and calls `run(session)` on the main thread.
Front ends never import the runner: `Session` is all they see of it.
"""

from __future__ import annotations

from collections.abc import Mapping
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from typing import ClassVar, Protocol

import attrs

from sdjobs.status import CancelMode

ENTRY_POINT_GROUP = "sdjobs.frontends"

#: The environment variable that names a front end when `--frontend` is absent.
FRONTEND_ENV = "SDJOBS_FRONTEND"

#: The front ends sdjobs ships; an entry point of the same name is a duplicate and skipped.
BUILTIN_FRONTENDS = {
    "console": "sdjobs.frontends.console:ConsoleFrontend",
    "jsonl": "sdjobs.frontends.jsonl:JsonlFrontend",
    "log": "sdjobs.frontends.log:LogFrontend",
    "tk": "sdjobs.frontends.tk:TkFrontend",
}

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
    """

    log_file: Path | None = None
    log_level: str = "INFO"
    log_format: str | None = None
    preview: bool = False
    close_when_done: bool = False


class Frontend(Protocol):
    """A front end class, as found through the entry-point group."""

    name: ClassVar[str]
    description: ClassVar[str]

    def __init__(self, options: FrontendOptions) -> None: ...

    def run(self, session: Session) -> int | None:
        """Show ``session`` while it runs it; return an exit status to force one.

        Called on the main thread.  None leaves the status to the jobs' outcomes.
        Raises `FrontendUnavailable`, before the session runs, when it cannot
        show anything here.
        """


class FrontendError(Exception):
    """The front end asked for cannot be used: a usage error (exit 2), nothing ran."""


class UnknownFrontendError(FrontendError, ValueError):
    """No front end of that name is installed; the message lists the ones that are."""

    def __init__(self, name: str, valid: list[str], source: str | None = None) -> None:
        self.name = name
        self.valid = valid
        choices = ", ".join(valid) or "none is installed"
        named = f"{name!r}" if source is None else f"{name!r} (from {source})"
        super().__init__(f"unknown front end {named}; choose one of: {choices}")


class FailedToLoadFrontend(FrontendError):
    """A front end's entry point is there, but importing it raised."""

    def __init__(self, name: str, value: str, error: BaseException) -> None:
        self.name = name
        self.error = error
        super().__init__(f"front end {name!r} ({value}) failed to load: {type(error).__name__}: {error}")


class FrontendUnavailable(FrontendError):
    """A front end cannot run here (the Tk window without a display)."""


def available_frontends() -> dict[str, EntryPoint]:
    """Every installed front end by name, sorted; loading them is left to `load_frontend`."""
    found = {name: EntryPoint(name, value, ENTRY_POINT_GROUP) for name, value in BUILTIN_FRONTENDS.items()}
    for entry_point in entry_points(group=ENTRY_POINT_GROUP):
        found.setdefault(entry_point.name, entry_point)  # a built-in, then the first on sys.path, wins
    return dict(sorted(found.items()))


def choose_frontend(flag: str | None, env: Mapping[str, str], isatty: bool) -> str:
    """The front end to use: ``flag``, else `SDJOBS_FRONTEND`, else console or log.

    The default is `console` when output goes to a terminal and `log` when it
    does not.  A name that is not installed raises `UnknownFrontendError`, which
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
    valid = list(available_frontends())
    if name not in valid:
        raise UnknownFrontendError(name, valid, source)
    return name


def load_frontend(name: str) -> type[Frontend]:
    """The front end class installed as ``name``.

    Raises `UnknownFrontendError` when there is none, and `FailedToLoadFrontend`,
    naming it, when importing it fails.
    """
    installed = available_frontends()
    if name not in installed:
        raise UnknownFrontendError(name, list(installed))
    entry_point = installed[name]
    try:
        return entry_point.load()
    except Exception as exc:  # a broken plugin is reported by name, not as a traceback
        raise FailedToLoadFrontend(name, entry_point.value, exc) from exc


def describe_frontends() -> dict[str, str]:
    """Each installed front end's one-line description, as `sdjobs frontends` lists them.

    One that fails to load is listed with the reason instead of hiding the others.
    """
    described = {}
    for name in available_frontends():
        try:
            described[name] = load_frontend(name).description
        except FrontendError as exc:
            described[name] = f"(unusable) {exc}"
    return described
