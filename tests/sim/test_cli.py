"""`sdjobs sim`'s options, as the lead wires them into the `sdjobs` command."""

from __future__ import annotations

import argparse
import re
import socket
import subprocess
import sys

import pytest
import requests

from sdjobs.sim.cli import add_arguments, run, settings_from
from sdjobs.sim.engine import CRASH_STATUS

from .conftest import JOIN_TIMEOUT, TXT2IMG


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(argv)


def test_options_become_settings() -> None:
    args = _parse("--step-time", "0.5", "--faces", "2", "--api-auth", "u:p", "--nowebui", "--progress-stuck")
    settings = settings_from(args)
    assert (settings.step_time, settings.faces, settings.api_auth, settings.ui, settings.progress_stuck) == (0.5, (2, 2), "u:p", False, True)
    assert (args.host, args.port, settings.profile, settings.hang, settings.stop_after_steps) == ("127.0.0.1", 7860, "flat", False, None)


def test_profile_face_range_and_faults() -> None:
    args = _parse("--profile", "h200-sdxl", "--faces", "1-3", "--hang", "--stop-after-steps", "5")
    settings = settings_from(args)
    assert (settings.profile, settings.faces, settings.hang, settings.stop_after_steps) == ("h200-sdxl", (1, 3), True, 5)


@pytest.mark.parametrize("argv", [("--api-auth", "nopassword"), ("--progress-error-rate", "2"), ("--faces", "3-1")])
def test_bad_options_exit_2_without_echoing_credentials(argv, capsys) -> None:
    assert run(_parse(*argv)) == 2
    assert "nopassword" not in capsys.readouterr().out


def test_a_port_in_use_is_one_line_naming_the_port_and_the_option(capsys) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert run(_parse("--port", str(port))) == 2
    out, err = capsys.readouterr()
    assert err == ""
    assert out.count("\n") == 1 and f"port {port}" in out and "--port" in out


def test_stop_after_steps_ends_the_process_like_a_crash() -> None:
    command = [sys.executable, "-m", "sdjobs", "sim", "--port", "0", "--step-time", "0.001", "--stop-after-steps", "3"]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as server:
        try:
            url = re.search(r"http://\S+", server.stdout.readline()).group(0)
            with pytest.raises(requests.ConnectionError):
                requests.post(url + "/sdapi/v1/txt2img", json=TXT2IMG, timeout=JOIN_TIMEOUT)
            assert server.wait(timeout=JOIN_TIMEOUT) == CRASH_STATUS
        finally:
            server.kill()
