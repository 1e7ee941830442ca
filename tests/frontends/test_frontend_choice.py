"""Front ends: registered by plugins through `sdjobs_register_frontends`, chosen by flag, then SDJOBS_FRONTEND, then console or log."""

from __future__ import annotations

import types

import pytest
from plugin_helpers import install_distribution

from sdjobs.frontend import (
    FrontendOptions,
    RegisteredFrontend,
    UnknownFrontendError,
    choose_frontend,
    collect_frontends,
)
from sdjobs.frontends.console import ConsoleFrontend
from sdjobs.hooks import Hooks, PluginFailure, make_plugin_manager

BUILT_IN = ["console", "jsonl", "log", "tk"]

FANCY = '''
from sdjobs import hookimpl


class FancyFrontend:
    name = "fancy"
    description = "a third party's front end"

    def __init__(self, options):
        self.options = options

    def run(self, session):
        session.run()

    @hookimpl
    def sdjobs_progress(self, status):
        pass


@hookimpl
def sdjobs_register_frontends(register):
    register(FancyFrontend)
'''


def frontends_of(pm):
    return collect_frontends(Hooks(pm))


def test_each_built_in_front_end_is_registered_by_its_own_plugin():
    pm = make_plugin_manager(load_entry_points=False, disabled=())
    found = frontends_of(pm)
    assert list(found) == BUILT_IN
    assert {name: (frontend.plugin, frontend.cls.name) for name, frontend in found.items()} == {
        name: (f"sdjobs.frontends.{name}", name) for name in BUILT_IN
    }
    assert pm.failures == []


@pytest.mark.parametrize("name", BUILT_IN)
def test_each_built_in_front_end_describes_itself_in_a_line_and_makes_one_without_opening_anything(name):
    cls = frontends_of(make_plugin_manager(load_entry_points=False, disabled=()))[name].cls
    assert cls.description and "\n" not in cls.description
    cls(FrontendOptions())


def test_a_disabled_front_end_plugin_offers_nothing():
    pm = make_plugin_manager(load_entry_points=False, disabled=["sdjobs.frontends.tk"])
    assert list(frontends_of(pm)) == ["console", "jsonl", "log"]


def test_a_front_end_from_another_distribution_is_chosen_by_name(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(install_distribution(tmp_path, "sdjobs-fancy", {"fancy": "sdjobs_fancy"}, {"sdjobs_fancy": FANCY}))
    pm = make_plugin_manager(load_entry_points=True, disabled=())
    found = frontends_of(pm)
    assert choose_frontend("fancy", {}, True, found) == "fancy"
    assert found["fancy"].plugin == "fancy"
    assert (found["fancy"].cls.__module__, found["fancy"].plugin_name) == ("sdjobs_fancy", "frontend:fancy")
    assert pm.failures == []


def register_module(pm, name, source):
    """Register ``source`` as the plugin module ``name``, as the loader would."""
    module = types.ModuleType(name)
    exec(compile(source, name, "exec"), module.__dict__)
    pm.register(module, name=name)


@pytest.mark.parametrize(
    ("source", "reason"),
    [
        (
            FANCY.replace('name = "fancy"', 'name = "console"'),
            "front end 'console' is taken already, by plugin 'sdjobs.frontends.console'",
        ),
        (
            FANCY.replace("def sdjobs_progress", "def sdjobs_progres"),
            (
                "front end 'fancy': it implements sdjobs_progres, which is not an sdjobs hook "
                "(did you mean 'sdjobs_progress'?)"
            ),
        ),
        (
            FANCY.replace("register(FancyFrontend)", 'register("fancy")'),
            "it registered 'fancy', which is not a front-end class (a class with a str name and description)",
        ),
    ],
    ids=["taken name", "misspelled hook", "not a class"],
)
def test_a_plugin_offering_a_bad_front_end_is_skipped_and_the_others_stay(source, reason):
    pm = make_plugin_manager(load_entry_points=False, disabled=())
    register_module(pm, "fancy", source)
    found = frontends_of(pm)
    assert pm.failures == [PluginFailure("fancy", reason)]
    assert not pm.has_plugin("fancy")
    assert list(found) == BUILT_IN
    assert found["console"] == RegisteredFrontend(ConsoleFrontend, "sdjobs.frontends.console")


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
    assert choose_frontend(flag, env, isatty, BUILT_IN) == chosen


@pytest.mark.parametrize(
    ("flag", "env", "source"),
    [("fancy", {}, "--frontend"), (None, {"SDJOBS_FRONTEND": "fancy"}, "SDJOBS_FRONTEND")],
)
def test_an_unknown_name_is_an_error_that_lists_the_valid_ones(flag, env, source):
    with pytest.raises(UnknownFrontendError, match=rf"^unknown front end 'fancy' \(from {source}\); choose one of: console, jsonl, log, tk$"):
        choose_frontend(flag, env, True, BUILT_IN)


@pytest.mark.parametrize(
    ("isatty", "default", "source"),
    [(True, "console", "the default for a terminal"), (False, "log", "the default without a terminal")],
)
def test_a_default_that_is_not_there_is_an_error_that_says_it_is_the_default(isatty, default, source):
    pm = make_plugin_manager(load_entry_points=False, disabled=[f"sdjobs.frontends.{default}"])
    with pytest.raises(UnknownFrontendError, match=rf"^unknown front end '{default}' \(from {source}\); choose one of: "):
        choose_frontend(None, {}, isatty, frontends_of(pm))
