"""The Tk front end in a real window, on a private X server (Xvfb).

The session runs on the front end's worker thread; the tests look at the window
through `TkFrontend.call_soon`, which runs a function on the Tk thread after
every hook call made before it, so what a test reads is what that hook showed.
"""

from __future__ import annotations

import base64
import io
import logging
import queue
import re
import signal
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import attrs
import pytest
from PIL import Image
from scripted import UNREACHABLE, ScriptedSession, job_spec
from tkwindow import close_window, double_click, on_tk, rows, session_threads, texts

from sdjobs.exits import EXIT_CANCELLED
from sdjobs.frontend import FrontendOptions, FrontendUnavailable, QueueControl
from sdjobs.runner import Runner
from sdjobs.status import CancelMode, JobState
from sdjobs.frontends import tk as tk_frontend
from sdjobs.frontends.tk import TkFrontend
from sdjobs.frontends.tk_panel import JobPanel
from sdjobs.store import JobRecord
from sdjobs.worker import Worker

pytestmark = pytest.mark.usefixtures("x_display")


def test_the_panel_shows_job_stage_progress_eta_seed_step_and_the_queue(make_session, capsys):
    frontend = TkFrontend(FrontendOptions())
    seen: dict[str, dict[str, Any]] = {}

    def watch(hook, status):
        if hook == "job_started" and status.name == "sea":
            seen["started"] = on_tk(frontend, texts)
        elif hook == "progress" and status.name == "sea" and status.stage_index == 1:
            seen.setdefault("calculating", on_tk(frontend, texts))
            if status.eta is not None:
                seen.setdefault("known", on_tk(frontend, texts))
        elif hook == "job_started" and status.name == "sky":
            seen["second"] = on_tk(frontend, texts)
        elif hook == "queue_drained":
            seen["drained"] = on_tk(frontend, texts)
            frontend.call_soon(close_once_the_session_ended)

    def close_once_the_session_ended(panel: JobPanel) -> None:
        if session_threads():
            panel.after(10, close_once_the_session_ended, panel)
        else:
            seen["after the session"] = texts(panel)  # the window stayed open on the final state
            close_window(panel)

    session = make_session(frontend, [job_spec("sea"), job_spec("sky", stages=("txt2img",))], watch=watch)
    assert frontend.run(session) is None
    assert seen["started"] | {"bar": 0.0} == {
        "name": "sea", "stage": "Stage: 1/2 txt2img", "bar": 0.0, "state": "Starting", "eta": "ETA: calculating...",
        "seed": "Seed: 1234567890", "step": "Step: -", "queued": ["sky"], "cancel": True,
    }  # fmt: skip
    assert seen["calculating"] | {"seed": "", "queued": [], "cancel": True} == {
        "name": "sea", "stage": "Stage: 2/2 img2img", "bar": 25.0, "state": "Running (25%)", "eta": "ETA: calculating...",
        "step": "Step: 5/20", "seed": "", "queued": [], "cancel": True,
    }  # fmt: skip
    assert (seen["known"]["eta"], seen["known"]["state"], seen["known"]["step"]) == ("ETA: 5s", "Running (50%)", "Step: 10/20")
    assert (seen["second"]["name"], seen["second"]["stage"], seen["second"]["queued"]) == ("sky", "Stage: 1/1 txt2img", [])
    assert seen["drained"] == seen["after the session"]
    assert (seen["drained"]["name"], seen["drained"]["state"], seen["drained"]["cancel"]) == ("Finished", "2 jobs: 2 done", False)
    assert session.cancels == []  # closed after every job ended: nothing to cancel
    assert session_threads() == []
    assert "Traceback" not in capsys.readouterr().err


@pytest.mark.parametrize(
    ("button", "mode", "sea_stages"),
    [("cancel_button", CancelMode.NOW, 1), ("cancel_after_stage_button", CancelMode.AFTER_STAGE, 1)],
)
def test_a_cancel_button_cancels_the_running_job_and_the_next_one_starts(make_session, button, mode, sea_stages):
    frontend = TkFrontend(FrontendOptions(close_when_done=True))
    finished: dict[str, str] = {}
    after_press: list[dict[str, Any]] = []
    results: dict[str, int] = {}

    def watch(hook, status):
        if hook == "progress" and status.name == "sea" and not after_press:
            after_press.append(on_tk(frontend, lambda panel: (getattr(panel, button).invoke(), texts(panel))[1]))
        elif hook == "stage_finished":
            results[status.name] = status.stage_index + 1
        elif hook == "job_finished":
            finished[status.name] = on_tk(frontend, lambda panel: str(panel.state["text"]))

    session = make_session(frontend, [job_spec("sea"), job_spec("sky")], watch=watch)
    assert frontend.run(session) is None  # close_when_done: the window closed itself
    assert session.cancels == [(mode, False)]
    assert after_press[0]["state"].startswith("Cancelling")
    assert finished == {"sea": "Cancelled: 2 images", "sky": "Done: 4 images"}
    assert results == {"sea": sea_stages, "sky": 2}
    assert session_threads() == []


def test_closing_the_window_cancels_everything_waits_for_the_job_and_leaves_nothing_behind(make_session, capsys):
    frontend = TkFrontend(FrontendOptions())
    started: list[str] = []
    closing: list[str] = []

    def watch(hook, status):
        if hook == "job_started":
            started.append(status.name)
        if hook == "progress" and not closing:
            closing.append(on_tk(frontend, lambda panel: (close_window(panel), str(panel.state["text"]))[1]))

    threads_before = set(threading.enumerate())
    session = make_session(frontend, [job_spec("sea"), job_spec("sky")], watch=watch)
    assert frontend.run(session) is None
    assert session.cancels == [(CancelMode.NOW, True)]
    assert closing == ["Closing: stopping the running job..."]
    assert started == ["sea"]
    assert set(threading.enumerate()) == threads_before
    err = capsys.readouterr().err
    assert "TclError" not in err and "Traceback" not in err


def test_a_job_that_will_not_stop_is_left_behind_after_the_close_timeout(make_session, monkeypatch):
    monkeypatch.setattr(tk_frontend, "CLOSE_TIMEOUT", 0.2)
    frontend = TkFrontend(FrontendOptions())
    release = threading.Event()

    def watch(hook, status):
        if hook == "progress" and not release.is_set():
            on_tk(frontend, close_window)
            release.wait(timeout=10)  # a server that does not answer the interrupt

    session = make_session(frontend, [job_spec("sea")], watch=watch)
    assert frontend.run(session) == EXIT_CANCELLED
    [worker] = session_threads()
    release.set()
    worker.join(timeout=10)
    assert not worker.is_alive()


def test_a_session_that_raises_closes_the_window_and_the_error_surfaces(make_session):
    def watch(hook, status):
        if hook == "job_started":
            raise RuntimeError("the runner broke")

    frontend = TkFrontend(FrontendOptions())
    with pytest.raises(RuntimeError, match="the runner broke"):
        frontend.run(make_session(frontend, [job_spec("sea")], watch=watch))
    assert session_threads() == []


def test_ctrl_c_closes_the_window_like_the_close_button(make_session):
    frontend = TkFrontend(FrontendOptions())
    pressed: list[bool] = []

    def watch(hook, status):
        if hook == "progress" and not pressed:
            pressed.append(True)
            on_tk(frontend, lambda panel: signal.raise_signal(signal.SIGINT))

    before = signal.getsignal(signal.SIGINT)
    session = make_session(frontend, [job_spec("sea"), job_spec("sky")], watch=watch)
    assert frontend.run(session) is None
    assert set(session.cancels) == {(CancelMode.NOW, True)}
    assert signal.getsignal(signal.SIGINT) is before
    assert session_threads() == []


def png_base64(size: tuple[int, int]) -> str:
    """A colourful PNG, as base64: what a server's live preview is."""
    red, green = Image.radial_gradient("L"), Image.linear_gradient("L")
    image = Image.merge("RGB", (red, green, green.rotate(90))).resize(size)
    out = io.BytesIO()
    image.save(out, format="PNG")
    return base64.b64encode(out.getvalue()).decode()


@pytest.mark.parametrize("prefix", ["", "data:image/png;base64,"])
def test_the_live_preview_is_shown_shrunk_to_fit_when_asked_for(make_session, prefix):
    frontend = TkFrontend(FrontendOptions(preview=True, close_when_done=True))
    shown: list[tuple[int, int]] = []

    def preview_size(panel: JobPanel) -> tuple[int, int]:
        [name] = panel.tk.splitlist(panel.preview["image"])
        return int(panel.tk.call("image", "width", name)), int(panel.tk.call("image", "height", name))

    def watch(hook, status):
        if hook == "progress" and not shown:
            shown.append(on_tk(frontend, preview_size))

    frontend.run(make_session(frontend, [job_spec("sea")], watch=watch, preview=prefix + png_base64((512, 384))))
    assert shown == [(256, 192)]


def test_the_state_says_the_webui_is_down_until_the_job_runs_again(make_session):
    frontend = TkFrontend(FrontendOptions(close_when_done=True))
    states: list[str] = []

    def watch(hook, status):
        if hook == "webui_unreachable" or (hook == "progress" and states and len(states) < 3):
            states.append(on_tk(frontend, lambda panel: str(panel.state["text"])))

    frontend.run(make_session(frontend, [job_spec("sea")], unreachable=(0, 1), watch=watch))
    assert states == [
        f"WebUI unreachable for 0s ({UNREACHABLE}): retrying in 1s",
        f"WebUI unreachable for 1s ({UNREACHABLE}): retrying in 2s",
        "Running (50%)",
    ]


def test_without_a_display_it_says_so_and_runs_nothing(make_session, monkeypatch):
    monkeypatch.delenv("DISPLAY", raising=False)
    frontend = TkFrontend(FrontendOptions())
    session = make_session(frontend, [job_spec("sea")])
    with pytest.raises(FrontendUnavailable, match=r"the tk front end cannot open a window \(.*display.*\).*--frontend"):
        frontend.run(session)
    assert not session.ran


def record(name: str, state: JobState, position: int, **fields: Any) -> JobRecord:
    return JobRecord(f"id-{name}", job_spec(name), state, position, **fields)


def test_the_queue_shows_each_job_s_position_and_the_history_its_outcome_and_folder(make_session, tmp_path):
    """As a worker's watch thread tells it; a double-click on a job of the history opens its folder."""
    opened: list[Path] = []
    frontend = TkFrontend(FrontendOptions(close_when_done=True), opener=opened.append)
    folder = tmp_path / "20260101-120000-old-1a2b"
    seen: dict[str, Any] = {}

    def watch(hook, status):
        if hook == "job_started" and status.name == "sea":
            frontend.sdjobs_queue_changed((
                record("sea", JobState.RUNNING, 3), record("sky", JobState.QUEUED, 5),
                record("moon", JobState.QUEUED, 9, paused=True),
            ), seen.setdefault("end", time.time() + 605))  # fmt: skip
            frontend.sdjobs_history_changed((
                record("old", JobState.DONE, 1, folder=folder), record("bad", JobState.FAILED, 2, error="HTTP 500"),
            ))  # fmt: skip
        elif hook == "job_started" and status.name == "sky":  # the runner's own idea of the queue comes after
            seen["queue"] = on_tk(frontend, lambda panel: rows(panel.queued))
            seen["queue end"] = on_tk(frontend, lambda panel: str(panel.queue_end["text"]))
            seen["history"] = on_tk(frontend, lambda panel: rows(panel.history))
            on_tk(frontend, lambda panel: (double_click(panel.history, 1), double_click(panel.history, 0)))
            seen["opened"] = list(opened)

    frontend.run(make_session(frontend, [job_spec("sea"), job_spec("sky")], watch=watch))
    assert seen["queue"] == [("1", "sea", "running"), ("2", "sky", "queued"), ("3", "moon", "paused")]
    clock = datetime.fromtimestamp(seen["end"]).strftime("%H:%M")
    assert re.fullmatch(rf"queue ends about (\w{{3}} )?{clock} \(in 10m 0\ds\)", seen["queue end"])
    assert seen["history"] == [("Done", "old", str(folder)), ("Failed", "bad", "-")]
    assert seen["opened"] == [folder]  # the failed job made no folder: nothing to open


def end_screen(panel: JobPanel) -> dict[str, Any]:
    return {
        "state": str(panel.state["text"]),
        "folder": str(panel.folder["text"]),
        "open": panel.open_button.instate(["!disabled"]),
        "job bar": float(panel.job_bar["value"]),
        "job": str(panel.job_text["text"]),
    }


def test_the_job_bar_runs_beside_the_stage_bar_and_the_end_screen_opens_the_output_folder(make_session, tmp_path):
    opened: list[Path] = []
    frontend = TkFrontend(FrontendOptions(), opener=opened.append)
    seen: dict[str, Any] = {}

    def watch(hook, status):
        if hook == "progress" and status.stage_index == 1 and status.eta is not None:
            seen.setdefault("running", on_tk(frontend, end_screen))
        elif hook == "job_finished" and status.name == "sea":
            seen["sea"] = on_tk(frontend, end_screen)
        elif hook == "queue_drained":
            seen["end"] = on_tk(frontend, lambda panel: (panel.open_button.invoke(), end_screen(panel))[1])
            frontend.call_soon(close_window)

    session = make_session(frontend, [job_spec("sea"), job_spec("sky")], watch=watch, fail={1: "HTTP 500: out of memory"})
    assert frontend.run(session) is None
    out = tmp_path / "outputs"
    assert seen["running"] == {
        "state": "Running (50%)", "folder": f"Folder: {out / 'job-1'}", "open": True, "job bar": 75.0, "job": "Job: 75% · ETA 5s",
    }  # fmt: skip
    assert seen["sea"] == {
        "state": "Done: 4 images", "folder": f"Folder: {out / 'job-1'}", "open": True, "job bar": 100.0, "job": "Job: 100% · ETA 0s",
    }  # fmt: skip
    assert seen["end"]["state"] == "2 jobs: 1 done, 1 failed"
    assert seen["end"]["folder"] == f"Folder: {out / 'job-2'}"  # the last job's, failed or not
    assert opened == [out / "job-2"]


def test_without_an_opener_on_the_desktop_open_folder_stays_disabled(make_session, monkeypatch):
    monkeypatch.setattr(tk_frontend.sys, "platform", "linux")
    monkeypatch.setattr(tk_frontend.shutil, "which", lambda command: None)
    frontend = TkFrontend(FrontendOptions())
    seen: list[dict[str, Any]] = []

    def watch(hook, status):
        if hook == "queue_drained":
            seen.append(on_tk(frontend, end_screen))
            frontend.call_soon(close_window)

    frontend.run(make_session(frontend, [job_spec("sea")], watch=watch))
    assert seen[0]["folder"].startswith("Folder: ") and seen[0]["open"] is False


@attrs.frozen
class Controlled:
    """A session with the queue's Pause and Resume, as a worker has; each call is noted in ``asked``."""

    session: ScriptedSession
    asked: queue.SimpleQueue[str] = attrs.field(factory=queue.SimpleQueue)

    def run(self) -> None:
        self.session.run()

    def cancel(self, mode: CancelMode = CancelMode.NOW, *, rest: bool = False) -> None:
        self.session.cancel(mode, rest=rest)

    def pause_queue(self, *, now: bool = False) -> None:
        self.asked.put(f"pause now={now}")

    def resume_queue(self) -> None:
        self.asked.put("resume")


def queue_buttons(panel: JobPanel) -> dict[str, Any]:
    return {
        "label": str(panel.queue_label["text"]),
        "pause": panel.pause_button.instate(["!disabled"]),
        "resume": panel.resume_button.instate(["!disabled"]),
    }


def test_pause_and_resume_ask_the_session_and_follow_the_queue_s_state(make_session):
    frontend = TkFrontend(FrontendOptions(close_when_done=True))
    seen: list[tuple[dict[str, Any], str]] = []

    def press(button: str) -> str:
        on_tk(frontend, lambda panel: getattr(panel, button).invoke())
        return session.asked.get(timeout=10)  # the call runs off the Tk thread

    def watch(hook, status):
        if hook == "job_started":
            seen.append((on_tk(frontend, queue_buttons), press("pause_button")))
            frontend.sdjobs_queue_paused()  # what the worker says once the store is paused
            seen.append((on_tk(frontend, queue_buttons), press("resume_button")))
            frontend.sdjobs_queue_resumed()
            seen.append((on_tk(frontend, queue_buttons), ""))

    session = Controlled(make_session(frontend, [job_spec("sea")], watch=watch))
    assert frontend.run(session) is None
    assert seen == [
        ({"label": "Queue:", "pause": True, "resume": False}, "pause now=False"),
        ({"label": "Queue (paused: no job starts):", "pause": False, "resume": True}, "resume"),
        ({"label": "Queue:", "pause": True, "resume": False}, ""),
    ]


def test_without_queue_control_pause_and_resume_stay_disabled(make_session):
    frontend = TkFrontend(FrontendOptions(close_when_done=True))
    seen: list[dict[str, Any]] = []

    def watch(hook, status):
        if hook == "job_started":
            seen.append(on_tk(frontend, queue_buttons))
            frontend.sdjobs_queue_paused()
            seen.append(on_tk(frontend, queue_buttons))

    frontend.run(make_session(frontend, [job_spec("sea")], watch=watch))
    assert [(shown["pause"], shown["resume"]) for shown in seen] == [(False, False), (False, False)]


def test_a_worker_offers_queue_control_and_a_plain_runner_does_not():
    assert issubclass(Worker, QueueControl)
    assert not issubclass(Runner, QueueControl)


@pytest.mark.parametrize(("platform", "command"), [("linux", "xdg-open"), ("darwin", "open")])
def test_the_opener_runs_the_desktop_s_command_and_a_missing_one_is_logged(monkeypatch, caplog, platform, command):
    started: list[list[str]] = []

    def popen(args, **options):
        started.append(args)
        raise FileNotFoundError(2, "No such file or directory", args[0])

    monkeypatch.setattr(tk_frontend.sys, "platform", platform)
    monkeypatch.setattr(tk_frontend.subprocess, "Popen", popen)
    with caplog.at_level(logging.WARNING, logger=tk_frontend.__name__):
        tk_frontend.open_path(Path("outputs/job"))
    assert started == [[command, "outputs/job"]]
    assert caplog.messages == [f"cannot open outputs/job: [Errno 2] No such file or directory: '{command}'"]
