"""Fixtures for the front ends: a scripted session and an X server for Tk."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pluggy
import pytest
from scripted import ScriptedSession

from sdjobs import hookspecs
from sdjobs.spec import JobSpec


@pytest.fixture
def make_session(tmp_path: Path) -> Callable[..., ScriptedSession]:
    """``make_session(frontend, specs, **options)``: a session whose hooks reach ``frontend``."""

    def make(frontend: object, specs: Sequence[JobSpec], **options: object) -> ScriptedSession:
        pm = pluggy.PluginManager(hookspecs.PROJECT)
        pm.add_hookspecs(hookspecs)
        pm.register(frontend)
        return ScriptedSession(pm, specs, out_dir=tmp_path / "outputs", **options)

    return make


@pytest.fixture(scope="session")
def x_display() -> Iterator[str]:
    """A private X server (Xvfb) for the session; DISPLAY points at it meanwhile.

    Tk tests always run under it, never on the developer's own screen.
    """
    if shutil.which("Xvfb") is None:
        pytest.skip("Xvfb is not installed (apt-get install xvfb): the Tk front end needs an X display")
    read_end, write_end = os.pipe()
    server = subprocess.Popen(
        ["Xvfb", "-displayfd", str(write_end), "-screen", "0", "1024x768x24", "-nolisten", "tcp"],
        pass_fds=(write_end,),
        stderr=subprocess.DEVNULL,
    )
    os.close(write_end)
    with os.fdopen(read_end) as announced:
        number = announced.readline().strip()  # Xvfb writes it once it accepts clients
    if not number:
        server.kill()
        pytest.fail(f"Xvfb did not start (exit status {server.wait(timeout=10)})")
    display = f":{number}"
    previous = os.environ.get("DISPLAY")
    os.environ["DISPLAY"] = display
    try:
        yield display
    finally:
        if previous is None:
            os.environ.pop("DISPLAY", None)
        else:
            os.environ["DISPLAY"] = previous
        server.terminate()
        server.wait(timeout=10)
