"""The console front end: a live view on a terminal; plain lines and a summary table elsewhere."""

from __future__ import annotations

import io
import re
import time
from datetime import datetime

from rich.console import Console
from scripted import UNREACHABLE, job_spec

from sdjobs.frontend import FrontendOptions
from sdjobs.frontends.console import ConsoleFrontend
from sdjobs.status import JobState
from sdjobs.store import JobRecord


def rendered(renderable) -> str:
    out = io.StringIO()
    Console(file=out, width=120).print(renderable)
    return out.getvalue()


def test_without_a_terminal_it_writes_lines_and_a_table_and_no_escape_codes(make_session):
    out = io.StringIO()
    frontend = ConsoleFrontend(FrontendOptions(), console=Console(file=out, width=120))
    session = make_session(
        frontend, [job_spec("sea"), job_spec("sky", stages=("txt2img",)), job_spec("sun")], fail={1: "HTTP 500: out of memory"}
    )
    assert frontend.run(session) is None
    text = out.getvalue()
    assert "\x1b[" not in text
    lines = text.splitlines()
    assert lines[0] == "sea (job 1/3) · 2 stages · seed 1234567890"
    assert re.fullmatch(r"  ✓ Stage 1/2 txt2img finished in 1m 05s · 2 images in \S+/job-1/01-txt2img: 001.png, 002.png", lines[1])
    assert re.fullmatch(r"sea: done in \d+s · 4 images", lines[3])
    assert "sky: failed after 0s · 0 images: HTTP 500: out of memory" in lines
    rows = {cells[0]: cells[1:] for cells in (re.split(r"\s*│\s*", line.strip("│ ")) for line in lines if "│" in line)}
    assert rows["sea"] == ["done", "4", rows["sea"][2]]
    assert rows["sky"] == ["failed", "0", "0s"]
    assert rows["sun"][:2] == ["done", "4"]
    assert lines[lines.index(next(line for line in lines if "Summary" in line)) + 2].split() == ["┃", "job", "┃", "outcome", "┃", "images", "┃", "time", "┃"]


def test_on_a_terminal_a_live_view_shows_the_status_line_and_both_bars(make_session):
    out = io.StringIO()
    frontend = ConsoleFrontend(FrontendOptions(), console=Console(file=out, width=120, force_terminal=True))
    views = []

    def look(hook, status):
        if hook == "progress" and status.stage_index == 1:
            views.append(rendered(frontend.view()))

    frontend.run(make_session(frontend, [job_spec("sea")], watch=look))
    calculating, known = views[0], views[1]
    assert "sea  Stage 2/2 img2img · step 5/20 · 25% · ETA calculating... · seed 1234567890" in calculating
    assert re.search(r"stage ━+ +25%\s*\n", calculating)
    assert re.search(r"job .+ 62% · ETA calculating...\n", calculating)
    assert "Stage 2/2 img2img · step 10/20 · 50% · ETA 5s" in known
    assert re.search(r"job .+ 75% · ETA 5s\n", known)
    assert rendered(frontend.view()).strip() == ""  # nothing live between jobs
    # The live display drew on the terminal, and the summary came after it.
    assert "Stage 1/2 txt2img · 0% · ETA calculating..." in out.getvalue()
    assert "\x1b[" in out.getvalue()


def test_the_status_line_shows_how_many_jobs_wait_in_the_queue_and_when_the_last_should_end(make_session):
    frontend = ConsoleFrontend(FrontendOptions(), console=Console(file=io.StringIO(), width=160, force_terminal=True))
    views = []
    jobs = tuple(JobRecord(job_id, job_spec("sea"), state, 0) for job_id, state in
                 (("a1", JobState.RUNNING), ("b2", JobState.QUEUED), ("c3", JobState.QUEUED)))  # fmt: skip
    end = time.time() + 3725 + 20

    def look(hook, status):
        if hook == "progress" and status.stage_index == 1 and not views:
            frontend.sdjobs_queue_changed(jobs, None)  # no history for the server yet
            views.append(rendered(frontend.view()))
            frontend.sdjobs_queue_changed(jobs, end)
            views.append(rendered(frontend.view()))

    frontend.run(make_session(frontend, [job_spec("sea")], watch=look))
    unknown, known = views
    assert re.search(r"· seed 1234567890 · 2 queued\n", unknown), unknown
    clock = datetime.fromtimestamp(end).strftime("%H:%M")
    assert re.search(rf"· seed 1234567890 · 2 queued · queue ends about (\w{{3}} )?{clock} \(in\s+1h 02m\)\n", known), known


def test_a_webui_that_is_down_is_one_printed_line_and_a_countdown_in_the_live_view(make_session):
    out = io.StringIO()
    frontend = ConsoleFrontend(FrontendOptions(), console=Console(file=out, width=200, force_terminal=True))
    views = []

    def look(hook, status):
        if hook == "webui_unreachable" or (hook == "progress" and views and len(views) < 3):
            views.append(rendered(frontend.view()))

    frontend.run(make_session(frontend, [job_spec("sea")], unreachable=(0, 1), watch=look))
    first, second, back = views
    assert f"WebUI unreachable for 0s ({UNREACHABLE}) · retrying in 1s" in first
    assert f"WebUI unreachable for 1s ({UNREACHABLE}) · retrying in 2s" in second
    assert "Stage 2/2 img2img · step 10/20" in back and "unreachable" not in back  # running again
    assert out.getvalue().count(f"  WebUI unreachable ({UNREACHABLE}), retrying in 1 s") == 1
    assert "retrying in 2 s" not in out.getvalue()  # one line per outage; the view counts down


def test_without_a_terminal_a_webui_that_is_down_is_one_line(make_session):
    out = io.StringIO()
    frontend = ConsoleFrontend(FrontendOptions(), console=Console(file=out, width=200))
    frontend.run(make_session(frontend, [job_spec("sea")], unreachable=(0, 1)))
    lines = out.getvalue().splitlines()
    assert [line for line in lines if "unreachable" in line] == [f"  WebUI unreachable ({UNREACHABLE}), retrying in 1 s"]
    assert "Stage 1/2 txt2img finished" in lines[1] and "unreachable" in lines[2] and "Stage 2/2 img2img finished" in lines[3]
