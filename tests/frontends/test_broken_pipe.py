"""A reader that goes away early (`sdjobs run ... | head -1`) ends sdjobs quietly.

`sdjobs run` runs in a real subprocess against the simulated WebUI in this
process, its output piped to this test, which reads the first line and closes
the pipe, as `head -1` does.  sdjobs must then stop its job, write no traceback,
and exit with 141 (128 + SIGPIPE), the status of a piped tool the pipe ended.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from sdjobs.sim import SimSettings

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "examples" / "demo.toml"


@pytest.fixture
def sim_settings() -> SimSettings:
    """Slow enough that the demo job is still writing when the reader has gone."""
    return SimSettings(step_time=0.01, first_step_time=0.01)


@pytest.mark.parametrize(
    ("frontend", "options"),
    [("jsonl", ()), ("console", ()), ("log", ("--log-file", "/dev/stdout"))],
    ids=["jsonl", "console", "log"],
)
def test_a_reader_that_closes_after_one_line_ends_sdjobs_quietly(webui_sim, tmp_path, frontend, options):
    environ = {name: value for name, value in os.environ.items() if not name.startswith("SDJOBS_")}
    command = [sys.executable, "-m", "sdjobs", "run", str(DEMO), "--webui", webui_sim.url, "--frontend", frontend]
    command += ["--out", str(tmp_path), "--poll-interval", "0.25", *options]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environ, cwd=ROOT)
    try:
        first = process.stdout.readline()
        process.stdout.close()  # what `head -1` does once it has its line
        status = process.wait(timeout=60)
    finally:
        process.kill()
    errors = process.stderr.read()
    process.stderr.close()
    assert first.strip()
    assert "Traceback" not in errors and "BrokenPipeError" not in errors, errors
    assert status == 141, errors
    # The job stopped: it never reached its last stage (the upscale) behind a closed pipe.
    assert "/sdapi/v1/extra-single-image" not in [path for _, _, path in webui_sim.requests]


def test_a_reader_that_closes_early_ends_sdjobs_check_quietly(tmp_path):
    many = tmp_path / "many.toml"  # 3,000 jobs: far more output than a pipe holds
    many.write_text('name = "many"\nprompt = "a lighthouse"\nseed = 1\ncount = 3000\n[[stages]]\ntype = "txt2img"\n')
    command = [sys.executable, "-m", "sdjobs", "check", str(many), "--all"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert process.stdout.readline().startswith("3000 jobs")
        process.stdout.close()
        status = process.wait(timeout=60)
    finally:
        process.kill()
    errors = process.stderr.read()
    process.stderr.close()
    assert (status, errors) == (141, "")
