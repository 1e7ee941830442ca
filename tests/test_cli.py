"""The `sdjobs` command in a subprocess, against the simulated WebUI of the test process."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from plugin_helpers import install_distribution
from process_helpers import Lines, environment, sdjobs
from runner_helpers import GENERATION_PATHS, requests_to
from sdjobs.sim import SimSettings

EXAMPLES = Path(__file__).parent.parent / "examples"
SECRET = "s3cret-pass"

JOB = """\
name = "lighthouse"
prompt = "a lighthouse at dusk"
seed = 1234

[settings]
steps = 8
width = 64
height = 64

[[stages]]
type = "txt2img"

[[stages]]
type = "img2img"
denoising_strength = 0.5
"""


@pytest.fixture
def job_file(tmp_path: Path) -> Path:
    path = tmp_path / "lighthouse.toml"
    path.write_text(JOB)
    return path


def manifest(out_dir: Path) -> dict:
    [path] = out_dir.glob("*/manifest.json")
    return json.loads(path.read_text())


# -- sdjobs run ------------------------------------------------------------------------


def test_run_writes_the_images_and_reports_in_json_lines(webui_sim, job_file, tmp_path):
    out = tmp_path / "out"
    done = sdjobs("run", job_file, "--webui", webui_sim.url, "--frontend", "jsonl", "--out", out)
    assert done.returncode == 0, done.stderr
    events = [json.loads(line) for line in done.stdout.splitlines()]
    assert [event["event"] for event in events if event["event"] not in ("progress", "queue_changed")] == [
        "job_queued",
        "job_started",
        "stage_started",
        "stage_finished",
        "stage_started",
        "stage_finished",
        "job_finished",
        "queue_drained",
    ]
    assert [event["jobs"] for event in events if event["event"] == "queue_changed"][-1] == []
    assert [event for event in events if event["event"] == "job_finished"][0]["outcome"] == "done"
    record = manifest(out)
    assert record["outcome"] == "done"
    assert [image for stage in record["stages"] for image in stage["images"]] == [
        "01-txt2img/001.png",
        "02-img2img/001.png",
    ]
    [folder] = out.iterdir()  # <time>-<slug>-<short id>: the job id is the store's random one
    assert folder.name.endswith(f"-lighthouse-{record['job_id'][:8]}")
    assert all((folder / image).is_file() for image in ["01-txt2img/001.png", "02-img2img/001.png"])


def test_a_bad_job_file_is_one_line_naming_the_file_and_the_key(webui_sim, job_file, tmp_path):
    job_file.write_text(JOB.replace("denoising_strength", "denoise"))
    bad = sdjobs("run", job_file, "--webui", webui_sim.url, "--frontend", "jsonl", "--out", tmp_path / "out")
    assert bad.returncode == 2
    assert bad.stdout == ""
    [line] = bad.stderr.splitlines()
    assert line.startswith(f"sdjobs: error: {job_file}: stages[2].denoise: unknown key")
    assert webui_sim.requests == [] and not (tmp_path / "out").exists()


def test_an_unknown_frontend_is_a_usage_error_listing_the_names(webui_sim, job_file, tmp_path):
    bad = sdjobs("run", job_file, "--webui", webui_sim.url, "--frontend", "nope", "--out", tmp_path / "out")
    assert bad.returncode == 2
    assert bad.stderr == "sdjobs: error: unknown front end 'nope' (from --frontend); choose one of: console, jsonl, log, tk\n"
    assert webui_sim.requests == []


def test_an_unreachable_webui_fails_the_run_naming_the_url(closed_port_url, job_file, tmp_path):
    args = ("run", job_file, "--webui", closed_port_url, "--frontend", "log", "--out", tmp_path / "out")
    failed = sdjobs(*args, "--wait-for-webui", "0")
    assert failed.returncode == 1
    assert "the WebUI stayed unreachable for 0 s" in failed.stderr
    assert f"cannot reach {closed_port_url}/" in failed.stderr
    assert "Traceback" not in failed.stderr


@pytest.mark.parametrize("sim_settings", [SimSettings(step_time=0.001, api_auth=f"alice:{SECRET}")])
def test_auth_reaches_the_server_and_the_password_never_shows(webui_sim, job_file, tmp_path):
    args = ("run", job_file, "--webui", webui_sim.url, "--frontend", "log", "--log-level", "DEBUG")
    done = sdjobs(*args, "--auth", f"alice:{SECRET}", "--out", tmp_path / "good")
    assert done.returncode == 0, done.stderr
    assert SECRET not in done.stdout + done.stderr
    refused = sdjobs(*args, "--auth", "alice:wrong-pass", "--out", tmp_path / "wrong")
    assert refused.returncode == 1
    assert "refused the credentials (401)" in refused.stderr
    assert "wrong-pass" not in refused.stdout + refused.stderr and "Traceback" not in refused.stderr


def test_a_poll_interval_out_of_range_is_a_usage_error(job_file):
    bad = sdjobs("run", job_file, "--poll-interval", "5")
    assert bad.returncode == 2
    assert "--poll-interval: must be between 0.25 and 2.0 seconds, got 5.0" in bad.stderr


@pytest.mark.parametrize(
    ("command", "option", "value"),
    [("demo", "--step-time", "-1"), ("run", "--stall-after", "0"), ("run", "--stall-interrupt-after", "nan")],
)
def test_a_duration_that_is_not_positive_is_a_usage_error(job_file, command, option, value):
    bad = sdjobs(command, *([job_file] if command == "run" else []), option, value)
    assert bad.returncode == 2
    assert bad.stderr.splitlines()[-1] == (  # after argparse's usage lines
        f"sdjobs {command}: error: argument {option}: must be a positive number of seconds, got {value}"
    )
    assert "Traceback" not in bad.stderr


@pytest.mark.parametrize(
    ("url", "shown"),
    [("notaurl", "'notaurl'"), (f"http://alice:{SECRET}@127.0.0.1:port", "'http://127.0.0.1:port'")],
)
def test_a_webui_that_is_not_a_url_is_one_line(job_file, tmp_path, url, shown):
    bad = sdjobs("run", job_file, "--webui", url, "--out", tmp_path / "out")
    assert bad.returncode == 2
    assert bad.stderr == (
        f"sdjobs: error: --webui / SDJOBS_WEBUI: {shown} is not a WebUI URL: expected http(s)://HOST[:PORT]\n"
    )
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["run", "demo"])
def test_an_out_folder_that_cannot_be_made_is_one_line_naming_it(webui_sim, job_file, tmp_path, command):
    (tmp_path / "a-file").write_text("")
    out = tmp_path / "a-file" / "out"
    args = ["run", job_file, "--webui", webui_sim.url] if command == "run" else ["demo"]
    bad = sdjobs(*args, "--frontend", "jsonl", "--out", out)
    assert bad.returncode == 2
    assert bad.stdout == ""
    assert bad.stderr == f"sdjobs: error: --out {out}: cannot create the folder: Not a directory\n"
    assert webui_sim.requests == []


@pytest.mark.parametrize("sim_settings", [SimSettings(stepping=True)])
def test_ctrl_c_cancels_the_running_job_with_status_130(webui_sim, job_file, tmp_path):
    out = tmp_path / "out"
    run = subprocess.Popen(
        [sys.executable, "-m", "sdjobs", "run", str(job_file), str(job_file), "--webui", webui_sim.url]
        + ["--frontend", "log", "--poll-interval", "0.25", "--out", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=environment(),
    )
    try:
        logged = Lines(run.stderr)
        webui_sim.release(2)  # 2 of 8 steps: the log shows the stage at 12 %
        assert logged.wait_for("txt2img · step 1/8 · 12%"), logged.text()
        run.send_signal(signal.SIGINT)
        assert run.wait(timeout=15) == 130, logged.text()  # no more steps released: the interrupt ended it
    finally:
        run.kill()
    assert "Traceback" not in logged.text()
    assert manifest(out)["outcome"] == "cancelled"  # and the second job never started
    assert len(requests_to(webui_sim, GENERATION_PATHS)) == 1
    assert len(requests_to(webui_sim, ["/sdapi/v1/interrupt"])) == 1


# -- the other commands --------------------------------------------------------------------


def test_check_prints_the_plan():
    checked = sdjobs("check", EXAMPLES / "demo.toml")
    assert checked.returncode == 0
    summary, first, *stages, expected = checked.stdout.splitlines()
    assert summary == "1 job, 3 final images"
    # seed = -1: the seed check drew is not the one the run will use
    assert first == f"{EXAMPLES / 'demo.toml'}: 'demo lighthouse', seed random, drawn when queued"
    # each stage's steps per pass as the run will count them (step x/40): tests/test_numbers_agree.py runs them
    assert stages == [
        "  1. txt2img   txt2img            1 request, 3 images, step x/40 per image",
        "  2. img2img   img2img            3 requests, 3 images, step x/25 per image",
        "  3. adetailer img2img            3 requests, 3 images, ADetailer step x/9 per face found",
        "  4. upscale   extra-single-image 3 requests, 3 images, no sampling",
    ]
    assert expected == "  expected duration: unknown: no history for this server yet"
    hires = sdjobs("check", EXAMPLES / "portrait.toml").stdout.splitlines()[2]
    assert hires.endswith("1 request, 1 image, step x/28 then hires x/14 per image")


def test_check_shows_what_a_file_expands_to_the_first_ones_or_all():
    first = sdjobs("check", EXAMPLES / "prompt-pack.toml")
    assert first.returncode == 0
    lines = first.stdout.splitlines()
    assert lines[0] == "24 jobs, 24 final images"
    named = [line for line in lines if line.startswith(str(EXAMPLES))]
    assert len(named) == 10 and lines[-1] == "... and 14 more (--all lists them)"
    assert named[0].endswith("seed 1234") and named[1].endswith("seed 1235")  # seed_policy increment
    everything = sdjobs("check", EXAMPLES / "prompt-pack.toml", "--json")
    names = [job["name"] for job in json.loads(everything.stdout)]
    assert len(set(names)) == 24, "each variation is named apart"


def test_check_against_a_webui_reports_every_unknown_name_before_anything_runs(webui_sim, tmp_path):
    job = tmp_path / "typo.toml"
    job.write_text((EXAMPLES / "demo.toml").read_text().replace("Euler a", "Eulr a"))
    checked = sdjobs("check", job, "--webui", webui_sim.url)
    assert checked.returncode == 2 and checked.stdout == ""
    assert f"the WebUI at {webui_sim.url} does not know" in checked.stderr
    assert "sampler_name 'Eulr a' is not on the server" in checked.stderr and "(did you mean 'Euler a'?)" in checked.stderr
    assert "Traceback" not in checked.stderr
    queued = sdjobs("queue", "add", job, "--check", "--webui", webui_sim.url)
    assert queued.returncode == 2 and queued.stdout == ""
    assert requests_to(webui_sim, GENERATION_PATHS) == []


def test_version():
    shown = sdjobs("--version")
    assert shown.returncode == 0 and shown.stdout.startswith("sdjobs ")


BUILT_IN_FRONTENDS = ["console", "jsonl", "log", "tk"]

#: The stderr of any command, with a misspelled hook and a module that is not there installed.
BROKEN_PLUGIN_WARNINGS = [
    (
        "sdjobs: warning: plugin 'typo' skipped: it implements sdjobs_job_finishd, which is not an sdjobs hook "
        "(did you mean 'sdjobs_job_finished'?)"
    ),
    "sdjobs: warning: plugin 'gone' skipped: cannot be imported: ModuleNotFoundError: No module named 'not_installed_anywhere'",
]


@pytest.fixture
def broken_plugins(tmp_path: Path) -> dict[str, str]:
    """The environment of a command with a real distribution of two broken plugins installed."""
    site = install_distribution(
        tmp_path / "site",
        "sdjobs-broken",
        {"typo": "typo_plugin", "gone": "gone_plugin"},
        {
            "typo_plugin": "from sdjobs import hookimpl\n\n@hookimpl\ndef sdjobs_job_finishd(status):\n    pass\n",
            "gone_plugin": "import not_installed_anywhere\n",
        },
    )
    return {"PYTHONPATH": str(site)}


def test_plugins_lists_each_plugin_with_its_hooks_and_front_ends_as_json():
    listed = sdjobs("plugins")
    assert listed.returncode == 0
    assert listed.stderr == ""
    shown = json.loads(listed.stdout)
    plugins = {plugin["name"]: (plugin["hooks"], plugin["frontends"]) for plugin in shown["loaded"]}
    assert plugins["sdjobs.plugins.progress_poller"] == (["sdjobs_start_polling"], [])
    for name in BUILT_IN_FRONTENDS:
        assert plugins[f"sdjobs.frontends.{name}"] == (["sdjobs_register_frontends"], [name])
    assert shown["failed"] == []


def test_plugins_lists_the_ones_that_could_not_be_loaded_with_why_and_warns_once(broken_plugins):
    listed = sdjobs("plugins", env=broken_plugins)
    assert listed.returncode == 0
    assert listed.stderr.splitlines() == BROKEN_PLUGIN_WARNINGS
    shown = json.loads(listed.stdout)
    assert [f"sdjobs: warning: plugin {f['name']!r} skipped: {f['reason']}" for f in shown["failed"]] == BROKEN_PLUGIN_WARNINGS
    assert {"typo", "gone"}.isdisjoint(plugin["name"] for plugin in shown["loaded"])


def test_a_run_goes_on_without_the_plugins_that_could_not_be_loaded(webui_sim, job_file, tmp_path, broken_plugins):
    out = tmp_path / "out"
    done = sdjobs("run", job_file, "--webui", webui_sim.url, "--frontend", "jsonl", "--out", out, env=broken_plugins)
    assert done.returncode == 0
    assert done.stderr.splitlines() == BROKEN_PLUGIN_WARNINGS
    assert manifest(out)["outcome"] == "done"


CHATTY_PLUGIN = """\
import logging

from sdjobs import hookimpl

log = logging.getLogger(__name__)


@hookimpl
def sdjobs_job_started(status):
    log.info("%s started, says chatty", status.name)


@hookimpl
def sdjobs_stage_started(status):
    log.debug("%s: stage %s, says chatty", status.name, status.stage_label)
"""


@pytest.mark.parametrize(("level", "expected"), [
    ("DEBUG", ["INFO chatty.plugin: lighthouse started, says chatty",
               "DEBUG chatty.plugin: lighthouse: stage 1/2 txt2img, says chatty",
               "DEBUG chatty.plugin: lighthouse: stage 2/2 img2img, says chatty"]),
    ("INFO", ["INFO chatty.plugin: lighthouse started, says chatty"]),
    ("WARNING", []),
])  # fmt: skip
def test_a_plugins_log_lines_go_where_and_as_the_log_options_say(webui_sim, job_file, tmp_path, level, expected):
    site = install_distribution(tmp_path / "site", "chatty", {"chatty": "chatty.plugin"}, {"chatty/__init__": "", "chatty/plugin": CHATTY_PLUGIN})
    log_file = tmp_path / "jobs.log"
    done = sdjobs(
        "run", job_file, "--webui", webui_sim.url, "--out", tmp_path / "out", "--frontend", "log", "--log-file", log_file,
        "--log-level", level, "--log-format", "%(levelname)s %(name)s: %(message)s", env={"PYTHONPATH": str(site)},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert [line for line in log_file.read_text().splitlines() if "chatty" in line] == expected


def test_frontends_lists_the_built_in_ones():
    listed = sdjobs("frontends")
    assert listed.returncode == 0
    assert [line.split()[0] for line in listed.stdout.splitlines()] == BUILT_IN_FRONTENDS


def test_a_disabled_front_end_is_gone_and_a_name_that_is_no_plugin_is_warned_about():
    listed = sdjobs("frontends", env={"SDJOBS_DISABLE_PLUGINS": "sdjobs.frontends.tk,sdjobs.frontend.log"})
    assert listed.returncode == 0
    assert [line.split()[0] for line in listed.stdout.splitlines()] == ["console", "jsonl", "log"]
    assert listed.stderr == (
        "sdjobs: warning: SDJOBS_DISABLE_PLUGINS: no plugin is named 'sdjobs.frontend.log' "
        "(did you mean 'sdjobs.frontends.log'?)\n"
    )


def test_help():
    helped = sdjobs("--help")
    assert helped.returncode == 0
    assert helped.stdout.startswith("usage: sdjobs ")
    for command in ("demo", "run", "check", "sim", "plugins", "frontends"):
        assert command in helped.stdout
    run_help = " ".join(sdjobs("run", "--help").stdout.split())
    assert "how to show progress: console, jsonl, log, tk (default:" in run_help
