"""Every front end shows a real job's life: the real runner against the simulated WebUI.

`sdjobs run examples/demo.toml --frontend NAME` runs in a subprocess, as a user
runs it, against a simulated WebUI in this process; each front end must show
the same four stages, progress, the seed, the outcome and the images that are
then on disk.  The Tk window is also driven in-process, with the simulator in
stepping mode, so a test decides when each sampling step happens: it presses
Cancel and closes the window mid-step.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
from scripted import job_spec
from tkwindow import close_window, grab, on_tk, session_threads, texts

from sdjobs import hookimpl
from sdjobs.client import WebUIClient
from sdjobs.clock import FakeClock
from sdjobs.frontend import FrontendOptions
from sdjobs.frontends.jsonl import FIELDS
from sdjobs.frontends.tk import TkFrontend
from sdjobs.frontends.tk_panel import JobPanel
from sdjobs.hooks import Hooks, make_plugin_manager
from sdjobs.job import JobSettings
from sdjobs.runner import Runner
from sdjobs.sim import SimSettings, SimulatedWebUI
from sdjobs.spec import JobSpec, load_job
from sdjobs.status import CancelMode, JobState, RuntimeStatus

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "examples" / "demo.toml"
SCREENSHOT = ROOT / "docs" / "tk-panel.png"

#: The demo's stages, as every front end labels them.
STAGES = ("1/4 txt2img", "2/4 img2img", "3/4 adetailer", "4/4 upscale")

#: The fastest progress polling sdjobs allows, so short stages still get samples.
POLL = 0.25

#: Where a stepping simulator waits for the test to release its next step.
STEPPING = SimSettings(stepping=True)

#: The in-process Tk tests open their window on a private X server.
needs_display = pytest.mark.usefixtures("x_display")


@pytest.fixture
def sim_settings() -> SimSettings:
    """Steps slow enough that the demo's txt2img (120 steps) spans a few progress polls."""
    return SimSettings(step_time=0.006, first_step_time=0.006)


@attrs.frozen
class WrittenJob:
    """A finished job as it is on disk: its manifest and its images per stage."""

    job_id: str
    seed: int
    outcome: str
    images: dict[str, list[Path]]  # stage folder name -> its images, in order

    @classmethod
    def read(cls, out: Path) -> WrittenJob:
        [folder] = [path for path in out.iterdir() if path.is_dir()]
        manifest = json.loads((folder / "manifest.json").read_text())
        images = {stage.name: sorted(stage.glob("*.png")) for stage in sorted(folder.iterdir()) if stage.is_dir()}
        return cls(manifest["job_id"], manifest["seed"], manifest["outcome"], images)

    def stage_images(self, index: int) -> list[Path]:
        return list(self.images.values())[index]

    def finished_line(self, index: int) -> str:
        """A regex for the stage's finished line, as `stage_finished_line` writes it."""
        images = self.stage_images(index)
        names = ", ".join(path.name for path in images)
        where = re.escape(f"{len(images)} images in {images[0].parent}: {names}")
        return rf"Stage {STAGES[index]} finished in \d+s · {where}"


def sdjobs_run(url: str, frontend: str, out: Path, *options: str, **env: str) -> subprocess.CompletedProcess[str]:
    """`sdjobs run examples/demo.toml` as a user types it, with none of the caller's SDJOBS_ settings."""
    environ = {name: value for name, value in os.environ.items() if not name.startswith(("SDJOBS_", "FORCE_COLOR", "TTY_"))}
    command = [sys.executable, "-m", "sdjobs", "run", str(DEMO), "--webui", url, "--frontend", frontend]
    command += ["--out", str(out), "--poll-interval", str(POLL), *options]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, env=environ | env, cwd=ROOT)


def test_jsonl_writes_each_event_of_the_job_in_the_documented_order(webui_sim, tmp_path):
    ran = sdjobs_run(webui_sim.url, "jsonl", tmp_path)
    assert (ran.returncode, ran.stderr) == (0, "")
    job = WrittenJob.read(tmp_path)
    events = [json.loads(line) for line in ran.stdout.splitlines()]
    for event in events:
        assert sorted(event) == sorted(["event", "t", *FIELDS[event["event"]]]), event
    told = [event.pop("jobs") for event in events if event["event"] == "queue_changed"]
    assert told[-1] == [] and any(told), told  # `run` shows its own queue, empty as it ends
    events = [event for event in events if event["event"] != "queue_changed"]
    names = " ".join(event["event"] for event in events)
    assert re.fullmatch(r"job_queued job_started (stage_started (progress )*stage_finished ){4}job_finished queue_drained", names)
    running = events[1:-1]
    assert {(e["job"], e["name"], e["seed"], e["stage_count"]) for e in running} == {(job.job_id, "demo lighthouse", job.seed, 4)}
    stages = [e for e in running if e["event"] == "stage_started"]
    assert [f"{e['stage_index'] + 1}/{e['stage_count']} {e['stage']}" for e in stages] == list(STAGES)
    progress = [e for e in running if e["event"] == "progress"]
    assert any(e["stage"] == "txt2img" and 0 < e["progress"] < 1 and e["steps"] in (40, None) for e in progress)
    assert [e["job_progress"] for e in running] == sorted(e["job_progress"] for e in running)  # never back
    finished = [e for e in running if e["event"] == "stage_finished"]
    assert [e["images"] for e in finished] == [[str(p) for p in job.stage_images(i)] for i in range(4)]
    assert [e["partial"] for e in finished] == [False] * 4
    for e in running:  # rounded as documented
        assert (e["progress"], e["job_progress"]) == (round(e["progress"], 4), round(e["job_progress"], 4))
        assert all(e.get(key) is None or e[key] == round(e[key], 2) for key in ("eta", "job_eta", "elapsed"))
    assert (events[-2]["outcome"], events[-2]["error"], events[-2]["job_progress"]) == ("done", None, 1.0)
    assert events[-1]["outcomes"] == {job.job_id: "done"} and job.outcome == "done"


def test_log_writes_a_record_per_stage_start_and_end_and_progress_every_ten_percent(webui_sim, tmp_path):
    ran = sdjobs_run(webui_sim.url, "log", tmp_path / "out")
    assert (ran.returncode, ran.stdout) == (0, "")
    job = WrittenJob.read(tmp_path / "out")
    records = [re.fullmatch(r"\S+ \S+ (\w+) +demo lighthouse: (.*)|\S+ \S+ (\w+) +(.*)", line) for line in ran.stderr.splitlines()]
    assert all(records), ran.stderr
    messages = [record[2] or record[4] for record in records if not (record[4] or "").startswith("queue: ")]
    assert {record[1] or record[3] for record in records} == {"INFO"}
    assert messages[:2] == [f"queued demo lighthouse: 4 stages, seed {job.seed}, id {job.job_id}", f"started (job 1/1), seed {job.seed}"]
    bounds = [m for m in messages if re.match(r"Stage \S+ \w+ (started|finished)", m)]
    assert bounds[0::2] == [f"Stage {stage} started" for stage in STAGES]
    for index, line in enumerate(bounds[1::2]):
        assert re.fullmatch(job.finished_line(index), line)
    for stage in STAGES:
        progress = [m for m in messages if m.startswith(f"Stage {stage} · ")]
        assert len(progress) <= 10  # one per 10 % of the stage, at most
        for line in progress:
            assert re.fullmatch(rf"Stage {stage} · (image [1-3]/3 · )?(step \d+/\d+ · )?\d+% · ETA (\d+s|calculating\.\.\.) · seed {job.seed}", line)
    assert any(m.startswith(f"Stage {STAGES[0]} · ") for m in messages)
    assert re.fullmatch(r"done in \d+s · 12 images", messages[-2])
    assert messages[-1] == "1 job: 1 done"


def test_console_without_a_terminal_writes_plain_lines_and_the_summary_table(webui_sim, tmp_path):
    ran = sdjobs_run(webui_sim.url, "console", tmp_path)
    assert (ran.returncode, ran.stderr) == (0, "")
    job = WrittenJob.read(tmp_path)
    assert "\x1b" not in ran.stdout
    lines = ran.stdout.splitlines()
    assert lines[0] == f"demo lighthouse (job 1/1) · 4 stages · seed {job.seed}"
    for index in range(4):
        assert re.fullmatch(r"  ✓ " + job.finished_line(index), lines[1 + index])
    assert re.fullmatch(r"demo lighthouse: done in \d+s · 12 images", lines[5])
    assert lines[6].rstrip() == "Summary"
    assert [cell.strip() for cell in lines[-2].strip("│").split("│")][:3] == ["demo lighthouse", "done", "12"]
    assert lines[-1].startswith("└")


def test_console_on_a_terminal_draws_the_live_status_line_and_both_bars(webui_sim, tmp_path):
    ran = sdjobs_run(webui_sim.url, "console", tmp_path, TTY_COMPATIBLE="1", COLUMNS="120")
    assert (ran.returncode, ran.stderr) == (0, "")
    job = WrittenJob.read(tmp_path)
    screen = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", ran.stdout)  # the frames, without cursor moves and colours
    assert re.search(rf"demo lighthouse  Stage 1/4 txt2img · (image [1-3]/3 · )?(step \d+/40 · )?[1-9]\d?% · ETA \S+ · seed {job.seed}", screen)
    assert re.search(r"stage ━+ *\d+%", screen) and re.search(r"job +━+ *\d+% · ETA ", screen)
    assert "demo lighthouse: done in" in screen and "Summary" in screen


def test_tk_runs_the_job_in_its_window_and_closes_when_done(webui_sim, tmp_path, x_display):
    ran = sdjobs_run(webui_sim.url, "tk", tmp_path, "--close-when-done", DISPLAY=x_display)
    assert (ran.returncode, ran.stdout, ran.stderr) == (0, "", "")
    job = WrittenJob.read(tmp_path)
    assert job.outcome == "done"
    assert [len(images) for images in job.images.values()] == [3, 3, 3, 3]


# -- the Tk window in this process, with the real runner ---------------------------------


@attrs.define(eq=False)
class PanelHistory:
    """A hook plugin that runs after the front end and notes what the panel shows after each hook.

    `shown` is filled on the Tk thread, in hook order; `wait` lets another
    thread wait until the runner has fired a hook.
    """

    frontend: TkFrontend
    shown: list[tuple[str, dict[str, Any]]] = attrs.field(factory=list)
    fired: list[tuple[str, RuntimeStatus | None]] = attrs.field(factory=list)
    _changed: threading.Condition = attrs.field(factory=threading.Condition)

    def _after(self, hook: str, status: RuntimeStatus | None = None) -> None:
        self.frontend.call_soon(lambda panel: self.shown.append((hook, texts(panel))))
        with self._changed:
            self.fired.append((hook, status))
            self._changed.notify_all()

    def wait(self, hook: str, where: Callable[[RuntimeStatus], bool] = lambda status: True) -> RuntimeStatus:
        """The first status ``hook`` fired with that satisfies ``where``, once it has."""

        def found() -> RuntimeStatus | None:
            return next((s for h, s in self.fired if h == hook and s is not None and where(s)), None)

        with self._changed:
            assert self._changed.wait_for(found, timeout=10), f"no {hook} as expected within 10s: {self.fired[-3:]}"
            return found()

    def during(self, hook: str) -> list[dict[str, Any]]:
        return [shown for name, shown in self.shown if name == hook]

    @hookimpl(trylast=True)
    def sdjobs_job_queued(self) -> None:
        self._after("job_queued")

    @hookimpl(trylast=True)
    def sdjobs_job_started(self, status: RuntimeStatus) -> None:
        self._after("job_started", status)

    @hookimpl(trylast=True)
    def sdjobs_stage_started(self, status: RuntimeStatus) -> None:
        self._after("stage_started", status)

    @hookimpl(trylast=True)
    def sdjobs_progress(self, status: RuntimeStatus) -> None:
        self._after("progress", status)

    @hookimpl(trylast=True)
    def sdjobs_stage_finished(self, status: RuntimeStatus) -> None:
        self._after("stage_finished", status)

    @hookimpl(trylast=True)
    def sdjobs_job_finished(self, status: RuntimeStatus) -> None:
        self._after("job_finished", status)

    @hookimpl(trylast=True)
    def sdjobs_queue_drained(self) -> None:
        self._after("queue_drained")


def tk_session(
    options: FrontendOptions, specs: list[JobSpec], client: WebUIClient, out: Path, clock: Callable[[], float] | None = None
) -> tuple[TkFrontend, PanelHistory, Runner]:
    """The Tk front end, a history of its panel, and a real runner whose hooks reach both."""
    frontend = TkFrontend(options)
    history = PanelHistory(frontend)
    pm = make_plugin_manager(load_entry_points=False, disabled=(), plugins=[frontend, history])
    runner = Runner(
        specs=specs,
        client=client,
        hooks=Hooks(pm),
        out_dir=out,
        settings=JobSettings(poll_interval=POLL, preview=options.preview),
        **({} if clock is None else {"clock": clock}),
    )
    return frontend, history, runner


@contextlib.contextmanager
def driving(frontend: TkFrontend, sim: SimulatedWebUI, drive: Callable[[], None]) -> Iterator[None]:
    """Run ``drive`` on a thread of its own while the window runs on this one.

    When ``drive`` fails, every step is released and the window closed, so the
    test ends with the driver's error instead of hanging in the event loop.
    """
    errors: list[BaseException] = []

    def run() -> None:
        try:
            drive()
        except BaseException as exc:
            errors.append(exc)
            sim.release(1_000_000)
            frontend.call_soon(close_window)

    driver = threading.Thread(target=run, name="test-driver")
    driver.start()
    try:
        yield
    finally:
        driver.join(timeout=20)
    assert not driver.is_alive()
    if errors:
        raise errors[0]


def first_step_is_waiting(state) -> bool:
    return state.awaiting_release and state.sampling_step == 0 and state.job_no == 0


def demo() -> JobSpec:
    return load_job(DEMO)


@needs_display
def test_the_window_follows_a_real_job_stage_by_stage(webui_client, tmp_path):
    frontend, history, runner = tk_session(FrontendOptions(close_when_done=True), [demo()], webui_client, tmp_path)
    assert frontend.run(runner) is None
    job = WrittenJob.read(tmp_path)
    assert list(runner.outcomes.values()) == [JobState.DONE]
    assert [shown["stage"] for shown in history.during("stage_started")] == [f"Stage: {stage}" for stage in STAGES]
    progress = history.during("progress")
    assert any(re.fullmatch(r"Running \((\d|[1-9]\d)%\)", shown["state"]) for shown in progress)
    assert {shown["step"] for shown in progress if "txt2img" in shown["stage"]} <= {f"Step: {n}/40" for n in range(41)} | {"Step: -"}
    running = [shown for hook, shown in history.shown if hook not in ("job_queued", "queue_drained")]
    assert {(shown["name"], shown["seed"]) for shown in running} == {("demo lighthouse", f"Seed: {job.seed}")}
    for stage in STAGES:
        bar = [shown["bar"] for shown in progress if shown["stage"] == f"Stage: {stage}"]
        assert bar == sorted(bar)
    assert [shown["state"] for shown in history.during("stage_finished")] == [f"Stage {stage} finished: 3 images" for stage in STAGES]
    [finished] = history.during("job_finished")
    assert (finished["state"], finished["bar"], finished["cancel"]) == ("Done: 12 images", 100.0, False)
    [drained] = history.during("queue_drained")
    assert (drained["name"], drained["state"]) == ("Finished", "1 job: 1 done")


@needs_display
@pytest.mark.parametrize("sim_settings", [STEPPING], ids=["stepping"])
def test_cancel_in_the_window_stops_the_job_mid_step_and_the_next_one_runs(webui_sim, webui_client, tmp_path, capfd):
    specs = [demo(), job_spec("harbour", stages=("txt2img", "upscale"))]
    frontend, history, runner = tk_session(FrontendOptions(close_when_done=True), specs, webui_client, tmp_path)
    pressed: list[dict[str, Any]] = []

    def press_cancel(panel: JobPanel) -> dict[str, Any]:
        panel.cancel_button.invoke()
        return texts(panel)

    def drive() -> None:
        assert webui_sim.wait_for(first_step_is_waiting)
        webui_sim.release(5)  # txt2img's first pass now waits in step 5 of 40
        history.wait("progress", lambda status: status.step == 4)
        pressed.append(on_tk(frontend, press_cancel))
        history.wait("job_finished", lambda status: status.name == "demo lighthouse")
        webui_sim.release(1_000_000)  # the next job runs freely

    with driving(frontend, webui_sim, drive):
        assert frontend.run(runner) is None
    assert pressed[0]["state"] == "Cancelling..." and not pressed[0]["cancel"]
    assert list(runner.outcomes.values()) == [JobState.CANCELLED, JobState.DONE]
    assert ("POST", "/sdapi/v1/interrupt") in [(method, path) for _, method, path in webui_sim.requests]
    cancelled, done = history.during("job_finished")
    assert (cancelled["name"], cancelled["state"]) == ("demo lighthouse", "Cancelled: 1 image")
    assert (done["name"], done["state"]) == ("harbour", "Done: 2 images")
    assert [shown["queued"] for shown in history.during("job_queued")] == [["demo lighthouse"], ["demo lighthouse", "harbour"]]
    assert [shown["queued"] for shown in history.during("job_started")] == [["harbour"], []]
    assert "Traceback" not in capfd.readouterr().err


@needs_display
@pytest.mark.parametrize("sim_settings", [STEPPING], ids=["stepping"])
def test_closing_the_window_mid_step_cancels_everything_and_leaves_no_thread(webui_sim, webui_client, tmp_path, capfd):
    specs = [demo(), job_spec("harbour", stages=("txt2img", "upscale"))]
    frontend, history, runner = tk_session(FrontendOptions(), specs, webui_client, tmp_path)
    closing: list[str] = []

    def drive() -> None:
        assert webui_sim.wait_for(first_step_is_waiting)
        webui_sim.release(5)
        history.wait("progress", lambda status: status.step == 4)
        closing.append(on_tk(frontend, lambda panel: (close_window(panel), texts(panel)["state"])[1]))

    before = set(threading.enumerate())
    with driving(frontend, webui_sim, drive):
        assert frontend.run(runner) is None  # the window closed once the job had stopped
    assert closing == ["Closing: stopping the running job..."]
    assert runner.stopped and list(runner.outcomes.values()) == [JobState.CANCELLED]
    assert [status.name for hook, status in history.fired if hook == "job_started"] == ["demo lighthouse"]
    left = set(threading.enumerate()) - before
    for thread in left:  # a request thread of the simulator may still be saying goodbye
        thread.join(timeout=5)
    assert [thread.name for thread in left if thread.is_alive()] == []
    err = capfd.readouterr().err
    assert "TclError" not in err and "Traceback" not in err


@attrs.define(eq=False)
class CancelsNoted:
    """The runner as the front end's session, noting every cancel that reaches it."""

    runner: Runner
    cancels: list[tuple[CancelMode, bool]] = attrs.field(factory=list)

    def run(self) -> None:
        self.runner.run()

    def cancel(self, mode: CancelMode = CancelMode.NOW, *, rest: bool = False) -> None:
        self.cancels.append((mode, rest))
        self.runner.cancel(mode, rest=rest)


@needs_display
def test_closing_the_window_after_every_job_ended_cancels_nothing(webui_sim, webui_client, tmp_path):
    """Closing the window is how a user leaves once the queue drained: the run stays a success."""
    specs = [job_spec("harbour", stages=("txt2img", "upscale"))]
    frontend, history, runner = tk_session(FrontendOptions(), specs, webui_client, tmp_path)
    session = CancelsNoted(runner)
    closed_on: list[dict[str, Any]] = []

    def drive() -> None:
        history.wait("job_started")
        [worker] = session_threads()
        worker.join(timeout=10)  # the session returned: every job has ended
        assert not worker.is_alive()
        closed_on.append(on_tk(frontend, lambda panel: (close_window(panel), texts(panel))[1]))

    with driving(frontend, webui_sim, drive):
        assert frontend.run(session) is None
    assert (closed_on[0]["name"], closed_on[0]["state"]) == ("Finished", "1 job: 1 done")
    assert session.cancels == [] and not runner.stopped
    assert list(runner.outcomes.values()) == [JobState.DONE]


#: Seconds each sampling step takes on the fake clock of the screenshot's run.
SCREENSHOT_STEP = 1.2


@pytest.mark.parametrize("sim_settings", [STEPPING], ids=["stepping"])
def test_the_panel_mid_job_looks_right(webui_sim, webui_client, tmp_path, x_display, monkeypatch):
    """Grabs the window of a real run mid-stage; with SDJOBS_UPDATE_SCREENSHOT=1 it becomes docs/tk-panel.png.

    Steps are released one by one while a fake clock moves, so the ETA reads
    as on a real GPU at `SCREENSHOT_STEP` seconds a step.  The output folder is
    `outputs/`, relative, as `--out` makes it.
    """
    clock = FakeClock()
    specs = [demo(), load_job(ROOT / "examples" / "portrait.toml"), job_spec("harbour at night")]
    monkeypatch.chdir(tmp_path)
    frontend, history, runner = tk_session(FrontendOptions(), specs, webui_client, Path("outputs"), clock=clock)
    seen: dict[str, Any] = {}

    def step(count: int) -> None:
        for _ in range(count):
            before = webui_sim.snapshot()
            clock.advance(SCREENSHOT_STEP)
            webui_sim.release(1)
            assert webui_sim.wait_for(lambda state: state.awaiting_release and state is not before)

    def drive() -> None:
        assert webui_sim.wait_for(first_step_is_waiting)
        step(3 * 40 + 25 + 7)  # txt2img's three passes, img2img's first and a quarter of its second
        history.wait("progress", lambda s: s.stage_index == 1 and s.step == 6)  # where the ETA is timed from
        step(6)
        history.wait("progress", lambda s: s.stage_index == 1 and s.step == 12 and s.eta is not None)
        seen["texts"] = on_tk(frontend, texts)
        seen["image"] = on_tk(frontend, grab)
        on_tk(frontend, close_window)

    with driving(frontend, webui_sim, drive):
        frontend.run(runner)
    shown, image = seen["texts"], seen["image"]
    assert (shown["name"], shown["stage"], shown["step"]) == ("demo lighthouse", "Stage: 2/4 img2img", "Step: 12/25")
    assert re.fullmatch(r"ETA: \d+s", shown["eta"]) and shown["queued"] == ["portrait", "harbour at night"]
    assert image.width > 300 and image.height > 300
    assert len(image.getcolors(maxcolors=100_000) or ()) > 20  # drawn, not a blank rectangle
    image.save(SCREENSHOT if os.environ.get("SDJOBS_UPDATE_SCREENSHOT") == "1" else tmp_path / "tk-panel.png")
