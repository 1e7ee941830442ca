"""Ctrl-C in the console, log and jsonl front ends: once cancels cleanly, twice quits at once."""

from __future__ import annotations

import io
import json
import signal
from collections.abc import Callable
from pathlib import Path

import pytest
from rich.console import Console
from scripted import job_spec

from sdjobs.exits import EXIT_CANCELLED
from sdjobs.frontend import FrontendOptions
from sdjobs.status import CancelMode
from sdjobs.frontends.console import ConsoleFrontend
from sdjobs.frontends.jsonl import JsonlFrontend
from sdjobs.frontends.log import LogFrontend

Shown = tuple[object, Callable[[], str]]


def console(tmp_path: Path) -> Shown:
    out = io.StringIO()
    return ConsoleFrontend(FrontendOptions(), console=Console(file=out, width=200)), out.getvalue


def log(tmp_path: Path) -> Shown:
    path = tmp_path / "jobs.log"
    return LogFrontend(FrontendOptions(log_file=path, log_format="%(message)s")), path.read_text


def jsonl(tmp_path: Path) -> Shown:
    out = io.StringIO()
    return JsonlFrontend(FrontendOptions(), stream=out), out.getvalue


FRONTENDS = [console, log, jsonl]


class CtrlC:
    """A watcher that presses Ctrl-C ``times`` times at the first progress event, and notes the jobs started."""

    def __init__(self, times: int) -> None:
        self.times = times
        self.pressed = False
        self.started: list[str] = []

    def __call__(self, hook, status) -> None:
        if hook == "job_started":
            self.started.append(status.name)
        if hook == "progress" and not self.pressed:
            self.pressed = True
            for _ in range(self.times):
                signal.raise_signal(signal.SIGINT)


@pytest.mark.parametrize("make_frontend", FRONTENDS)
def test_one_ctrl_c_cancels_the_running_job_keeps_its_images_and_runs_no_more(make_frontend, make_session, tmp_path):
    frontend, output = make_frontend(tmp_path)
    ctrl_c = CtrlC(times=1)
    session = make_session(frontend, [job_spec("sea"), job_spec("sky")], watch=ctrl_c)
    before = signal.getsignal(signal.SIGINT)
    assert frontend.run(session) is None  # the exit status, 130, follows from the session's state
    assert session.cancels == [(CancelMode.NOW, True)]
    assert ctrl_c.started == ["sea"]
    assert signal.getsignal(signal.SIGINT) is before
    text = output()
    if make_frontend is jsonl:
        [finished] = [event for event in map(json.loads, text.splitlines()) if event["event"] == "job_finished"]
        assert finished["outcome"] == "cancelled"
    else:
        assert "sea: cancelled after 0s · 2 images (the stage's partial images are kept)" in text
        assert "Ctrl-C" in text  # it says what happened


def test_the_console_says_so_and_its_summary_shows_the_job_never_run(make_session, tmp_path):
    frontend, output = console(tmp_path)
    frontend.run(make_session(frontend, [job_spec("sea"), job_spec("sky")], watch=CtrlC(times=1)))
    assert "Cancelled with Ctrl-C: no further job runs." in output()
    assert [line.split("│")[1:3] for line in output().splitlines() if "│" in line] == [
        [" sea ", " cancelled "],
        [" sky ", " not run   "],
    ]


@pytest.mark.parametrize("make_frontend", FRONTENDS)
def test_a_second_ctrl_c_quits_at_once_with_status_130(make_frontend, make_session, tmp_path):
    frontend, output = make_frontend(tmp_path)
    session = make_session(frontend, [job_spec("sea")], watch=CtrlC(times=2))
    before = signal.getsignal(signal.SIGINT)
    assert frontend.run(session) == EXIT_CANCELLED
    assert session.cancels == [(CancelMode.NOW, True)]
    assert signal.getsignal(signal.SIGINT) is before
    assert "job_finished" not in output() and "cancelled after" not in output()
