"""`sdjobs sim`'s options, as the lead wires them into the `sdjobs` command."""

from __future__ import annotations

import argparse
import re
import socket
import subprocess
import sys

import pytest
import requests

from sdjobs.sim import SimulatedWebUI
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


def _write(tmp_path, text: str):
    path = tmp_path / "catalog.toml"
    path.write_text(text)
    return path


def test_a_catalog_file_sets_what_the_server_offers(tmp_path) -> None:
    path = _write(tmp_path, 'checkpoints = ["sdxl.safetensors", "pony"]\nsamplers = ["Euler a", "My sampler"]\n'
                            'upscalers = ["Lanczos"]\nadetailer = false\n')  # fmt: skip
    settings = settings_from(_parse("--catalog", str(path)))
    with SimulatedWebUI(settings) as sim:
        def get(route):
            return requests.get(sim.url + route, timeout=JOIN_TIMEOUT)

        assert [model["model_name"] for model in get("/sdapi/v1/sd-models").json()] == ["sdxl", "pony"]
        assert get("/sdapi/v1/options").json()["sd_model_checkpoint"].startswith("sdxl.safetensors [")
        assert [sampler["name"] for sampler in get("/sdapi/v1/samplers").json()] == ["Euler a", "My sampler"]
        assert [upscaler["name"] for upscaler in get("/sdapi/v1/upscalers").json()] == ["Lanczos"]
        assert get("/adetailer/v1/ad_model").status_code == 404
        assert "adetailer" not in get("/sdapi/v1/scripts").json()["txt2img"]
        assert requests.post(sim.url + "/sdapi/v1/options", json={"sd_model_checkpoint": "pony"}, timeout=JOIN_TIMEOUT).ok
        unknown = requests.post(sim.url + "/sdapi/v1/options", json={"sd_model_checkpoint": "empty"}, timeout=JOIN_TIMEOUT)
        assert unknown.status_code == 500


def test_a_catalog_file_that_names_nothing_keeps_the_recorded_lists(tmp_path) -> None:
    settings = settings_from(_parse("--catalog", str(_write(tmp_path, ""))))
    with SimulatedWebUI(settings) as sim, SimulatedWebUI() as recorded:
        for route in ("/sdapi/v1/sd-models", "/sdapi/v1/samplers", "/sdapi/v1/upscalers", "/adetailer/v1/ad_model"):
            assert requests.get(sim.url + route, timeout=JOIN_TIMEOUT).json() == requests.get(recorded.url + route, timeout=JOIN_TIMEOUT).json()


@pytest.mark.parametrize(("text", "named"), [
    ("checkpoints = []", "checkpoints: must be a non-empty list"),
    ('samplers = "Euler"', "samplers: must be a non-empty list"),
    ("adetailer = 1", "adetailer: must be true or false"),
    ("loras = []", "loras: unknown key"),
    ("checkpoints = [", "not valid TOML"),
])  # fmt: skip
def test_a_bad_catalog_file_is_one_line_naming_the_file_and_key(tmp_path, capsys, text, named) -> None:
    path = _write(tmp_path, text)
    assert run(_parse("--catalog", str(path))) == 2
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and str(path) in out and named in out


def test_a_missing_catalog_file_is_named(tmp_path, capsys) -> None:
    assert run(_parse("--catalog", str(tmp_path / "none.toml"))) == 2
    assert f"{tmp_path / 'none.toml'}: cannot read" in capsys.readouterr().out
