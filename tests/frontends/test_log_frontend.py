"""The log front end: standard logging records, progress at most every 10 % of a stage."""

from __future__ import annotations

import logging
import re
import time
import types
from datetime import datetime

import pytest
from scripted import UNREACHABLE, job_spec

from sdjobs import hookimpl
from sdjobs.client import WebUIClient
from sdjobs.frontend import FrontendError, FrontendOptions
from sdjobs.frontends.log import LogFrontend
from sdjobs.hooks import Hooks, make_plugin_manager, plugin_loggers
from sdjobs.job import JobSettings
from sdjobs.runner import Runner
from sdjobs.status import JobState
from sdjobs.store import JobRecord


def test_a_record_per_stage_start_and_finish_and_the_outcome(make_session, capsys):
    frontend = LogFrontend(FrontendOptions(log_format="%(levelname)s %(name)s %(message)s"))
    assert frontend.run(make_session(frontend, [job_spec("sea"), job_spec("sky", stages=("txt2img",))])) is None
    lines = capsys.readouterr().err.splitlines()
    assert all(line.startswith("INFO sdjobs.jobs ") for line in lines)
    messages = [line.removeprefix("INFO sdjobs.jobs ") for line in lines]
    assert messages[:3] == [
        "queued sea: 2 stages, seed 1234567890, id job-1",
        "queued sky: 1 stage, seed 1234567890, id job-2",
        "sea: started (job 1/2), seed 1234567890",
    ]
    assert "sea: Stage 1/2 txt2img started" in messages
    assert "sea: Stage 2/2 img2img · step 10/20 · 50% · ETA 5s · seed 1234567890" in messages
    assert any(re.fullmatch(r"sea: Stage 1/2 txt2img finished in 1m 05s · 2 images in \S+/01-txt2img: 001.png, 002.png", m) for m in messages)
    assert re.fullmatch(r"sea: done in \d+s · 4 images", messages[messages.index("sky: started (job 2/2), seed 1234567890") - 1])
    assert messages[-1] == "2 jobs: 2 done"


def test_progress_is_logged_at_most_every_ten_percent_of_a_stage(make_session, capsys):
    frontend = LogFrontend(FrontendOptions(log_format="%(message)s"))
    every_percent = [percent / 100 for percent in range(1, 100)]
    frontend.run(make_session(frontend, [job_spec("sea")], samples=every_percent))
    logged = [
        (stage, int(percent))
        for stage, percent in re.findall(r"^sea: Stage (\d)/2 \w+ · step \d+/20 · (\d+)%", capsys.readouterr().err, re.M)
    ]
    tens = [10, 20, 30, 40, 50, 60, 70, 80, 90]
    assert logged == [("1", p) for p in tens] + [("2", p) for p in tens]


def test_a_failure_is_an_error_with_the_servers_message_and_a_stall_a_warning(make_session, tmp_path):
    log_file = tmp_path / "jobs.log"
    options = FrontendOptions(log_file=log_file, log_level="warning", log_format="%(levelname)s|%(message)s")
    frontend = LogFrontend(options)
    session = make_session(frontend, [job_spec("sea")], fail={0: "HTTP 500 from /sdapi/v1/img2img: CUDA out of memory"}, stall=(0, 1))
    frontend.run(session)
    assert log_file.read_text().splitlines() == [
        "WARNING|sea: no progress for 1m 00s in stage 2/2 img2img",
        "ERROR|sea: failed after 0s · 2 images: HTTP 500 from /sdapi/v1/img2img: CUDA out of memory",
    ]


def test_each_ping_of_a_webui_that_is_down_is_a_warning_naming_the_job(make_session, tmp_path):
    log_file = tmp_path / "jobs.log"
    frontend = LogFrontend(FrontendOptions(log_file=log_file, log_level="warning", log_format="%(levelname)s|%(message)s"))
    frontend.run(make_session(frontend, [job_spec("sea")], unreachable=(0, 1)))
    assert log_file.read_text().splitlines() == [
        f"WARNING|sea: WebUI unreachable ({UNREACHABLE}), retrying in 1 s",
        f"WARNING|sea: WebUI unreachable ({UNREACHABLE}), retrying in 2 s",
    ]


def test_a_real_webui_that_stays_down_is_one_warning_per_ping_and_the_failure(closed_port_url, tmp_path):
    """The runner's own records reach the same log: each ping is said once, not by the job module too."""
    pings = []

    class Pings:
        @hookimpl
        def sdjobs_webui_unreachable(self, retry_in):
            pings.append(retry_in)

    log_file = tmp_path / "jobs.log"
    frontend = LogFrontend(FrontendOptions(log_file=log_file, log_level="warning", log_format="%(levelname)s|%(message)s"))
    hooks = Hooks(make_plugin_manager(load_entry_points=False, disabled=(), plugins=[frontend, Pings()]))
    with WebUIClient(closed_port_url, retries=0) as client:
        runner = Runner([job_spec("sea")], client, hooks, tmp_path / "out", settings=JobSettings(wait_for_webui=1.5))
        frontend.run(runner)
    lines = log_file.read_text().splitlines()
    said = [line for line in lines if "WebUI unreachable (" in line]
    assert len(said) == len(pings) == 2  # at 0 s, and at 1 s for the last 0.5 s
    assert all(re.fullmatch(rf"WARNING\|sea: WebUI unreachable \(cannot reach {closed_port_url}/\S+: .+\), retrying in \d s", line) for line in said)
    assert any(line.startswith("ERROR|sea: failed after ") and "the WebUI stayed unreachable for 1.5 s" in line for line in lines)


def test_the_handler_is_there_only_while_the_session_runs(make_session, tmp_path):
    root, sdjobs_logger = logging.getLogger(), logging.getLogger("sdjobs")
    before = (list(root.handlers), sdjobs_logger.level)
    during = []
    frontend = LogFrontend(FrontendOptions(log_file=tmp_path / "jobs.log", log_level="DEBUG"))
    session = make_session(
        frontend, [job_spec("sea")], watch=lambda hook, status: during.append((len(root.handlers), sdjobs_logger.level))
    )
    frontend.run(session)
    assert set(during) == {(len(before[0]) + 1, logging.DEBUG)}
    assert (list(root.handlers), sdjobs_logger.level) == before
    # sdjobs' own records (the runner's, a failing plugin's) go to the same place meanwhile
    assert "queued sea" in (tmp_path / "jobs.log").read_text()


def test_a_plugins_records_are_written_at_the_level_asked_for_and_other_libraries_only_warnings(make_session, tmp_path):
    """A plugin logs under its own logger (`FrontendOptions.loggers`), not under `sdjobs`."""

    class Chatty:
        @hookimpl
        def sdjobs_stage_started(self, status):
            logging.getLogger("chatty.plugin").debug("%s: a stage, seen by chatty", status.name)
            logging.getLogger("some_library").info("a library's chatter")
            logging.getLogger("some_library").warning("a library's warning")

    log_file = tmp_path / "jobs.log"
    options = FrontendOptions(log_file=log_file, log_level="DEBUG", log_format="%(levelname)s %(name)s: %(message)s", loggers=("sdjobs", "chatty"))
    frontend = LogFrontend(options)
    session = make_session(frontend, [job_spec("sea", stages=("txt2img",))])
    session.pm.register(Chatty())
    frontend.run(session)
    lines = log_file.read_text().splitlines()
    assert "DEBUG chatty.plugin: sea: a stage, seen by chatty" in lines
    assert "WARNING some_library: a library's warning" in lines
    assert not any("chatter" in line for line in lines)
    assert logging.getLogger("chatty").level == logging.NOTSET  # as it was


def test_plugin_loggers_are_each_plugins_top_level_package_and_sdjobs():
    class Chatty:
        pass

    module = types.ModuleType("mylora.plugin")
    pm = make_plugin_manager(load_entry_points=False, disabled=(), plugins=[Chatty(), module])
    assert plugin_loggers(pm) == ("sdjobs", *sorted({Chatty.__module__.partition(".")[0], "mylora"}))


def test_an_unknown_level_is_a_usage_error_listing_the_levels():
    with pytest.raises(FrontendError, match=r"unknown log level 'LOUD'; choose one of: DEBUG, INFO, WARNING, ERROR, CRITICAL$"):
        LogFrontend(FrontendOptions(log_level="LOUD"))


@pytest.mark.parametrize("bad", ["%(message)", "%(bogus)s"], ids=["syntax", "a field no record has"])
def test_a_bad_format_is_a_usage_error(bad):
    with pytest.raises(FrontendError, match=f"bad log format {re.escape(repr(bad))}"):
        LogFrontend(FrontendOptions(log_format=bad))


def test_a_log_file_that_cannot_be_written_is_a_usage_error_and_nothing_runs(make_session, tmp_path):
    missing = tmp_path / "no-such-folder" / "jobs.log"
    frontend = LogFrontend(FrontendOptions(log_file=missing))
    session = make_session(frontend, [job_spec("sea")])
    with pytest.raises(FrontendError, match=re.escape(f"{missing}: cannot write the log there: No such file or directory")):
        frontend.run(session)
    assert not session.ran


def test_queue_changes_are_logged(caplog):
    frontend = LogFrontend(FrontendOptions())
    jobs = tuple(JobRecord(job_id, job_spec(name), state, n) for n, (job_id, name, state) in
                 enumerate((("a1", "sea", JobState.RUNNING), ("b2", "sky", JobState.QUEUED))))  # fmt: skip
    end = time.time() + 605
    with caplog.at_level(logging.INFO, logger="sdjobs.jobs"):
        frontend.sdjobs_queue_changed(jobs, None)
        frontend.sdjobs_queue_changed(jobs, None)  # the same jobs waiting: nothing to say
        frontend.sdjobs_queue_changed(jobs, end)  # a job ended elsewhere: now the history knows
        frontend.sdjobs_queue_paused()
        frontend.sdjobs_queue_resumed()
        frontend.sdjobs_queue_changed(jobs[:1], end)
        frontend.sdjobs_queue_changed((), None)
    clock = datetime.fromtimestamp(end).strftime("%H:%M")
    messages = [(record.levelname, record.getMessage()) for record in caplog.records]
    assert messages[:1] + messages[2:4] + messages[5:] == [
        ("INFO", "queue: 1 waiting, next sky; queue end unknown"),
        ("WARNING", "queue paused: no job starts until it is resumed"),
        ("INFO", "queue resumed"),
        ("INFO", "queue: 0 waiting"),
    ]
    assert re.fullmatch(rf"queue: 1 waiting, next sky; queue ends about (\w{{3}} )?{clock} \(in 10m 0\ds\)", messages[1][1])
    assert re.fullmatch(rf"queue: 0 waiting; queue ends about (\w{{3}} )?{clock} \(in 10m 0\ds\)", messages[4][1])
