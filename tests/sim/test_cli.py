"""`sdjobs sim`'s options, as the lead wires them into the `sdjobs` command."""

from __future__ import annotations

import argparse

import pytest

from sdjobs.sim.cli import add_arguments, run, settings_from


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(argv)


def test_options_become_settings() -> None:
    args = _parse("--step-time", "0.5", "--faces", "2", "--api-auth", "u:p", "--nowebui", "--progress-stuck")
    settings = settings_from(args)
    assert (settings.step_time, settings.faces, settings.api_auth, settings.ui, settings.progress_stuck) == (0.5, 2, "u:p", False, True)
    assert (args.host, args.port) == ("127.0.0.1", 7860)


@pytest.mark.parametrize("argv", [("--api-auth", "nopassword"), ("--progress-error-rate", "2")])
def test_bad_options_exit_2_without_echoing_credentials(argv, capsys) -> None:
    assert run(_parse(*argv)) == 2
    assert "nopassword" not in capsys.readouterr().out
