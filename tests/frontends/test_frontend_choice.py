"""Choosing a front end at launch: flag, then SDJOBS_FRONTEND, then console or log; built-ins and entry points."""

from __future__ import annotations

import importlib.metadata
import textwrap
from pathlib import Path

import pytest

from sdjobs import frontend
from sdjobs.frontend import (
    FailedToLoadFrontend,
    FrontendOptions,
    UnknownFrontendError,
    available_frontends,
    choose_frontend,
    describe_frontends,
    load_frontend,
)

BUILT_IN = ["console", "jsonl", "log", "tk"]


def install_distribution(site: Path, monkeypatch: pytest.MonkeyPatch, entry_points: str, module: str, source: str) -> None:
    """A real installed distribution, `sdjobs-extra`, on ``sys.path`` for this test."""
    info = site / "sdjobs_extra-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: sdjobs-extra\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[sdjobs.frontends]\n{entry_points}\n")
    (site / f"{module}.py").write_text(textwrap.dedent(source))
    monkeypatch.syspath_prepend(str(site))
    assert importlib.metadata.version("sdjobs-extra") == "1.0"


def test_the_built_in_front_ends_are_entry_points_listed_by_name():
    found = available_frontends()
    assert list(found) == sorted(found)
    assert set(BUILT_IN) <= set(found)
    assert {name: found[name].value for name in BUILT_IN} == {
        "console": "sdjobs.frontends.console:ConsoleFrontend",
        "jsonl": "sdjobs.frontends.jsonl:JsonlFrontend",
        "log": "sdjobs.frontends.log:LogFrontend",
        "tk": "sdjobs.frontends.tk:TkFrontend",
    }


def test_the_built_in_front_ends_are_there_without_their_entry_points(monkeypatch):
    monkeypatch.setattr(frontend, "entry_points", lambda group: [])  # a checkout never reinstalled
    assert list(available_frontends()) == BUILT_IN
    assert [load_frontend(name).name for name in BUILT_IN] == BUILT_IN


def test_an_entry_point_with_a_built_in_name_is_a_duplicate_and_skipped(tmp_path, monkeypatch):
    install_distribution(
        tmp_path, monkeypatch, "console = sdjobs_extra_console:Console", "sdjobs_extra_console", "class Console: ...\n"
    )
    assert available_frontends()["console"].value == "sdjobs.frontends.console:ConsoleFrontend"


@pytest.mark.parametrize("name", BUILT_IN)
def test_each_built_in_front_end_loads_under_its_own_name_and_describes_itself(name):
    cls = load_frontend(name)
    assert cls.name == name
    assert cls.description and "\n" not in cls.description
    assert describe_frontends()[name] == cls.description
    cls(FrontendOptions())  # making one opens nothing


@pytest.mark.parametrize(
    ("flag", "env", "isatty", "chosen"),
    [
        ("jsonl", {"SDJOBS_FRONTEND": "log"}, True, "jsonl"),  # the flag beats the environment
        (None, {"SDJOBS_FRONTEND": "jsonl"}, True, "jsonl"),  # the environment beats the default
        (None, {"SDJOBS_FRONTEND": ""}, True, "console"),  # empty means unset
        (None, {}, True, "console"),
        (None, {}, False, "log"),
    ],
)
def test_the_flag_beats_the_environment_which_beats_the_terminal_default(flag, env, isatty, chosen):
    assert choose_frontend(flag, env, isatty) == chosen


@pytest.mark.parametrize(
    ("flag", "env", "source"),
    [("fancy", {}, "--frontend"), (None, {"SDJOBS_FRONTEND": "fancy"}, "SDJOBS_FRONTEND")],
)
def test_an_unknown_name_is_an_error_that_lists_the_valid_ones(flag, env, source):
    with pytest.raises(UnknownFrontendError) as raised:
        choose_frontend(flag, env, isatty=True)
    assert isinstance(raised.value, ValueError)
    message = str(raised.value)
    assert f"'fancy' (from {source})" in message
    assert "choose one of: console, jsonl, log, tk" in message


@pytest.mark.parametrize(
    ("isatty", "default", "source"),
    [(True, "console", "the default for a terminal"), (False, "log", "the default without a terminal")],
)
def test_a_default_that_is_not_installed_is_an_error_that_says_it_is_the_default(monkeypatch, isatty, default, source):
    monkeypatch.setattr(frontend, "BUILTIN_FRONTENDS", {"jsonl": frontend.BUILTIN_FRONTENDS["jsonl"]})
    monkeypatch.setattr(frontend, "entry_points", lambda group: [])
    with pytest.raises(UnknownFrontendError, match=rf"^unknown front end '{default}' \(from {source}\); choose one of: jsonl$"):
        choose_frontend(None, {}, isatty)


def test_loading_a_name_that_is_not_installed_lists_the_valid_ones():
    with pytest.raises(UnknownFrontendError, match=r"^unknown front end 'fancy'; choose one of: console, jsonl, log, tk$"):
        load_frontend("fancy")


def test_a_front_end_from_another_distribution_is_chosen_by_name(tmp_path, monkeypatch):
    install_distribution(
        tmp_path,
        monkeypatch,
        "fancy = sdjobs_extra_fancy:FancyFrontend",
        "sdjobs_extra_fancy",
        '''
        class FancyFrontend:
            name = "fancy"
            description = "a third party's front end"

            def __init__(self, options):
                self.options = options

            def run(self, session):
                session.run()
        ''',
    )
    assert "fancy" in available_frontends()
    assert choose_frontend("fancy", {}, isatty=True) == "fancy"
    cls = load_frontend("fancy")
    assert (cls.__module__, cls.name) == ("sdjobs_extra_fancy", "fancy")
    assert describe_frontends()["fancy"] == "a third party's front end"


def test_a_front_end_that_fails_to_load_is_reported_by_name(tmp_path, monkeypatch):
    install_distribution(
        tmp_path, monkeypatch, "broken = sdjobs_extra_broken:Broken", "sdjobs_extra_broken", "import not_installed_anywhere\n"
    )
    assert choose_frontend("broken", {}, isatty=True) == "broken"  # listed: it is installed
    with pytest.raises(FailedToLoadFrontend) as raised:
        load_frontend("broken")
    assert str(raised.value) == (
        "front end 'broken' (sdjobs_extra_broken:Broken) failed to load: "
        "ModuleNotFoundError: No module named 'not_installed_anywhere'"
    )
    described = describe_frontends()
    assert described["broken"].startswith("(unusable) front end 'broken'")
    assert described["console"] == load_frontend("console").description


def test_front_end_errors_are_usage_errors_the_command_line_reports():
    for error in (UnknownFrontendError, FailedToLoadFrontend, frontend.FrontendUnavailable):
        assert issubclass(error, frontend.FrontendError)
