"""Control characters in names and messages are shown escaped, never raw.

A job named "a\\nb\\x1b[31m" would otherwise forge a second log line and turn a
terminal red; the log, the console and the Tk window all show it as the
literal text `a\\nb\\x1b[31m`, through `formatting.printable`.
"""

from __future__ import annotations

import io

import pytest
from rich.console import Console
from scripted import job_spec
from tkwindow import close_window, on_tk, texts

from sdjobs.frontend import FrontendOptions
from sdjobs.frontends.console import ConsoleFrontend
from sdjobs.frontends.formatting import printable
from sdjobs.frontends.log import LogFrontend
from sdjobs.frontends.tk import TkFrontend

NAME = "a\nb\x1b[31m"
SHOWN = r"a\nb\x1b[31m"
ERROR = "server says\r\nFAKE LINE\x07\x9b2J"
ERROR_SHOWN = r"server says\r\nFAKE LINE\x07\x9b2J"


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        (NAME, SHOWN),
        ("tab\there", r"tab\there"),
        ("del\x7f nul\x00 c1\x85", r"del\x7f nul\x00 c1\x85"),
        ("line\u2028sep", r"line\u2028sep"),
        ("plain é ✓ 漢字 \\n", "plain é ✓ 漢字 \\n"),
    ],
)
def test_printable_escapes_control_characters_only(text, shown):
    assert printable(text) == shown
    assert printable(printable(text)) == shown


def test_the_log_shows_names_and_server_errors_escaped_on_their_own_line(make_session, capsys):
    frontend = LogFrontend(FrontendOptions(log_format="%(levelname)s %(message)s"))
    frontend.run(make_session(frontend, [job_spec(NAME)], fail={0: ERROR}))
    lines = capsys.readouterr().err.splitlines()
    assert all(line.startswith(("INFO ", "ERROR ")) for line in lines), lines
    assert f"INFO {SHOWN}: started (job 1/1), seed 1234567890" in lines
    assert any(line.startswith(f"ERROR {SHOWN}: failed") and line.endswith(ERROR_SHOWN) for line in lines), lines
    assert not any(char in "".join(lines) for char in "\x1b\x07\x9b\r")


def test_the_console_shows_names_and_server_errors_escaped(make_session):
    out = io.StringIO()
    frontend = ConsoleFrontend(FrontendOptions(), console=Console(file=out, width=400))
    frontend.run(make_session(frontend, [job_spec(NAME)], fail={0: ERROR}))
    written = out.getvalue()
    assert f"{SHOWN} (job 1/1)" in written
    assert ERROR_SHOWN in written
    assert not any(char in written for char in "\x1b\x07\x9b\r")


@pytest.mark.usefixtures("x_display")
def test_the_tk_window_shows_the_name_escaped(make_session):
    frontend = TkFrontend(FrontendOptions())
    seen = {}

    def watch(hook, status):
        if hook == "job_started":
            seen["started"] = on_tk(frontend, texts)
        elif hook == "job_finished":
            seen["finished"] = on_tk(frontend, texts)
        elif hook == "queue_drained":
            frontend.call_soon(close_window)

    frontend.run(make_session(frontend, [job_spec(NAME)], fail={0: ERROR}, watch=watch))
    assert seen["started"]["name"] == SHOWN
    assert seen["finished"]["state"].endswith(ERROR_SHOWN)
