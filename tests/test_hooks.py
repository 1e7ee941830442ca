"""The plugin manager and the `Hooks` facade: loading, the failure rule, blocking, tracing, isolation."""

import importlib
import logging
import subprocess
import sys

import attrs
import pytest
from plugin_helpers import install_distribution

from sdjobs import hookimpl
from sdjobs.hooks import Hooks, PluginError, PluginFailure, describe_plugins, make_plugin_manager
from sdjobs.status import JobState, RuntimeStatus

pytest_plugins = ["pytester"]

STATUS = RuntimeStatus(job_id="j", name="n", stage="txt2img", stage_index=0, stage_count=1)

BUILT_INS = [
    "sdjobs.plugins.progress_poller",
    "sdjobs.frontends.console",
    "sdjobs.frontends.jsonl",
    "sdjobs.frontends.log",
    "sdjobs.frontends.tk",
]


class Recorder:
    def __init__(self):
        self.seen = []

    @hookimpl
    def sdjobs_progress(self, status):
        self.seen.append(status)


class Broken:
    @hookimpl
    def sdjobs_progress(self, status):
        raise RuntimeError("boom")

    @hookimpl
    def sdjobs_amend_payload(self, payload):
        raise RuntimeError("bad amend")


def test_the_built_ins_are_registered_by_their_module_names():
    pm = make_plugin_manager(load_entry_points=False, disabled=())
    assert [name for name, _ in pm.list_name_plugin()] == BUILT_INS
    assert [pm.get_plugin(name) for name in BUILT_INS] == [importlib.import_module(name) for name in BUILT_INS]
    assert pm.failures == [] and pm.warnings == []


def test_disable_env_blocks_a_builtin_and_warns_about_a_name_that_is_no_plugin(monkeypatch):
    monkeypatch.setenv("SDJOBS_DISABLE_PLUGINS", "sdjobs.plugins.progress_poller, sdjobs.frontends.tkk")
    pm = make_plugin_manager(load_entry_points=False)
    assert not pm.has_plugin("sdjobs.plugins.progress_poller")
    assert [plugin["name"] for plugin in describe_plugins(pm)["loaded"]] == sorted(BUILT_INS[1:])
    assert pm.warnings == [
        "SDJOBS_DISABLE_PLUGINS: no plugin is named 'sdjobs.frontends.tkk' (did you mean 'sdjobs.frontends.tk'?)"
    ]


def test_the_installed_entry_points_load_without_a_failure_or_a_duplicate():
    """sdjobs declares its built-ins as entry points too: the loader skips them."""
    pm = make_plugin_manager(load_entry_points=True, disabled=())
    assert [name for name, _ in pm.list_name_plugin()][: len(BUILT_INS)] == BUILT_INS
    assert pm.failures == []


SHOUT = """
from sdjobs import hookimpl

@hookimpl
def sdjobs_amend_payload(payload):
    payload["prompt"] = payload["prompt"].upper()
"""


def test_entry_point_plugins_load_only_when_asked(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(install_distribution(tmp_path, "shout", {"shout": "shout_plugin"}, {"shout_plugin": SHOUT}))
    assert not make_plugin_manager(load_entry_points=False, disabled=()).has_plugin("shout")
    pm = make_plugin_manager(load_entry_points=True, disabled=())
    payload = {"prompt": "quiet"}
    Hooks(pm).amend_payload(payload, stage=None, status=STATUS)
    assert payload["prompt"] == "QUIET"


def test_a_disabled_entry_point_is_not_even_imported(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(
        install_distribution(tmp_path, "bomb", {"bomb": "bomb_plugin"}, {"bomb_plugin": "raise SystemExit('imported')"})
    )
    pm = make_plugin_manager(load_entry_points=True, disabled=["bomb"])
    assert not pm.has_plugin("bomb")
    assert pm.failures == [] and pm.warnings == []  # a disabled entry point is a plugin's name


BROKEN_PLUGINS = {
    "typo": (
        """
        from sdjobs import hookimpl

        @hookimpl
        def sdjobs_stage_started(status):
            raise AssertionError("a plugin that was skipped is never called")

        @hookimpl
        def sdjobs_job_finishd(status):
            pass
        """,
        "it implements sdjobs_job_finishd, which is not an sdjobs hook (did you mean 'sdjobs_job_finished'?)",
    ),
    "wrong_arguments": (
        """
        from sdjobs import hookimpl

        @hookimpl
        def sdjobs_progress(status, colour):
            pass
        """,
        (
            "Plugin 'wrong_arguments' for hook 'sdjobs_progress'; hookimpl definition: sdjobs_progress(status, colour); "
            "Argument(s) {'colour'} are declared in the hookimpl but can not be found in the hookspec"
        ),
    ),
    "unimportable": (
        "import not_installed_anywhere\n",
        "cannot be imported: ModuleNotFoundError: No module named 'not_installed_anywhere'",
    ),
}


def test_each_broken_plugin_is_skipped_with_its_reason_and_the_others_load(tmp_path, monkeypatch):
    modules = {f"broken_{name}": source for name, (source, _) in BROKEN_PLUGINS.items()}
    modules["working_plugin"] = SHOUT
    declared = {name: f"broken_{name}" for name in BROKEN_PLUGINS} | {"working": "working_plugin"}
    monkeypatch.syspath_prepend(install_distribution(tmp_path, "mixed", declared, modules))

    pm = make_plugin_manager(load_entry_points=True, disabled=())

    assert sorted(pm.failures, key=str) == sorted(
        (PluginFailure(name, reason) for name, (_, reason) in BROKEN_PLUGINS.items()), key=str
    )
    assert not any(pm.has_plugin(name) for name in BROKEN_PLUGINS)
    assert pm.has_plugin("working")
    Hooks(pm).stage_started(STATUS, stage=None)  # the skipped typo plugin's hook would raise
    assert describe_plugins(pm)["failed"] == [{"name": f.name, "reason": f.reason} for f in pm.failures]
    assert str(pm.failures[0]).startswith(f"plugin {pm.failures[0].name!r} skipped: ")


def test_a_second_plugin_under_a_taken_name_is_skipped(tmp_path, monkeypatch):
    for dist in ("first", "second"):
        install_distribution(tmp_path / dist, dist, {"shout": f"shout_{dist}"}, {f"shout_{dist}": SHOUT})
        monkeypatch.syspath_prepend(tmp_path / dist)
    pm = make_plugin_manager(load_entry_points=True, disabled=())
    assert pm.get_plugin("shout").__name__ == "shout_second"  # first on sys.path
    assert pm.failures == [PluginFailure("shout", "another plugin is registered as 'shout'")]


def test_a_plugin_whose_registration_hook_raises_is_skipped_with_all_it_offers():
    class Offering:
        @hookimpl
        def sdjobs_register_frontends(self, register):
            raise LookupError("no display config")

        @hookimpl
        def sdjobs_progress(self, status):
            raise AssertionError("a plugin that was skipped is never called")

    pm = make_plugin_manager(load_entry_points=False, disabled=())
    pm.register(Offering(), name="offering")
    hooks = Hooks(pm)
    assert "offering" not in hooks.register_frontends()
    assert pm.failures == [PluginFailure("offering", "sdjobs_register_frontends raised LookupError: no display config")]
    hooks.progress(STATUS)


@pytest.mark.parametrize("trace", ["1", "", "0"])
def test_the_trace_env_writes_every_hook_call_and_its_outcome(monkeypatch, capsys, trace):
    monkeypatch.setenv("SDJOBS_TRACE_PLUGINS", trace)
    recorder = Recorder()
    pm = make_plugin_manager(load_entry_points=False, disabled=())
    pm.register(recorder, name="recorder")
    pm.register(Broken(), name="broken")
    hooks = Hooks(pm)
    hooks.progress(STATUS)
    with pytest.raises(PluginError):
        hooks.amend_payload({}, stage=None, status=STATUS)
    expected = [
        f"sdjobs: trace: sdjobs_progress(status={STATUS!r}) -> 'broken'",
        "sdjobs: trace: sdjobs_progress <- 'broken' raised RuntimeError: boom",
        f"sdjobs: trace: sdjobs_progress(status={STATUS!r}) -> 'recorder'",
        "sdjobs: trace: sdjobs_progress <- 'recorder' returned None",
        f"sdjobs: trace: sdjobs_amend_payload(payload={{}}, stage=None, status={STATUS!r}) -> 'broken'",
        "sdjobs: trace: sdjobs_amend_payload <- 'broken' raised RuntimeError: bad amend",
    ]
    assert capsys.readouterr().err.splitlines() == (expected if trace == "1" else [])
    assert recorder.seen == [STATUS]  # traced or not, the hooks ran


class Wrappers:
    def __init__(self):
        self.called = []

    @hookimpl(wrapper=True)
    def sdjobs_progress(self, status):
        self.called.append("sdjobs_progress")
        return (yield)

    @hookimpl(hookwrapper=True)
    def sdjobs_amend_payload(self, payload):
        self.called.append("sdjobs_amend_payload")
        yield


def test_wrappers_are_skipped_with_one_warning_naming_the_plugin(caplog):
    recorder, wrappers = Recorder(), Wrappers()
    pm = make_plugin_manager(load_entry_points=False, disabled=())
    pm.register(recorder, name="recorder")
    pm.register(wrappers, name="wrappers")
    hooks = Hooks(pm)
    with caplog.at_level(logging.WARNING, logger="sdjobs.hooks"):
        for _ in range(2):
            hooks.progress(STATUS)
            hooks.amend_payload({}, stage=None, status=STATUS)
    assert wrappers.called == []
    assert recorder.seen == [STATUS, STATUS]
    assert [record.getMessage() for record in caplog.records] == [
        f"plugin 'wrappers': {hook} is a wrapper, which sdjobs does not call; it is skipped"
        for hook in ("sdjobs_progress", "sdjobs_amend_payload")
    ]


def test_a_raising_observer_is_logged_by_name_and_the_others_still_run(caplog):
    recorder = Recorder()
    pm = make_plugin_manager(load_entry_points=False, disabled=())
    pm.register(recorder, name="recorder")
    pm.register(Broken(), name="broken")
    with caplog.at_level(logging.ERROR, logger="sdjobs.hooks"):
        Hooks(pm).progress(STATUS)
    assert recorder.seen == [STATUS]
    assert "'broken' failed in sdjobs_progress" in caplog.text


def test_an_observer_raising_on_every_tick_logs_one_traceback_and_one_sum_per_job(caplog):
    pm = make_plugin_manager(load_entry_points=False, disabled=())
    pm.register(Broken(), name="broken")
    hooks = Hooks(pm)
    with caplog.at_level(logging.WARNING, logger="sdjobs.hooks"):
        for job in ("j1", "j2"):
            status = attrs.evolve(STATUS, job_id=job)
            for _ in range(5):
                hooks.progress(status)
            hooks.job_finished(status, JobState.DONE, None, ())
    messages = [(record.levelname, record.getMessage(), bool(record.exc_info)) for record in caplog.records]
    assert messages == [
        ("ERROR", "plugin 'broken' failed in sdjobs_progress; the job goes on", True),
        ("WARNING", "plugin 'broken' failed 4 more times in sdjobs_progress during job j1", False),
        ("ERROR", "plugin 'broken' failed in sdjobs_progress; the job goes on", True),
        ("WARNING", "plugin 'broken' failed 4 more times in sdjobs_progress during job j2", False),
    ]


def test_a_raising_control_hook_propagates_naming_the_plugin():
    pm = make_plugin_manager(load_entry_points=False, disabled=())
    pm.register(Broken(), name="broken")
    with pytest.raises(PluginError, match="plugin 'broken' failed in sdjobs_amend_payload: bad amend"):
        Hooks(pm).amend_payload({}, stage=None, status=STATUS)


def test_amend_payload_changes_the_payload_in_place():
    class Lora:
        @hookimpl
        def sdjobs_amend_payload(self, payload):
            payload["prompt"] += " <lora:detail:0.5>"

    pm = make_plugin_manager(load_entry_points=False, disabled=())
    pm.register(Lora())
    payload = {"prompt": "a cat"}
    Hooks(pm).amend_payload(payload, stage=None, status=STATUS)
    assert payload == {"prompt": "a cat <lora:detail:0.5>"}


def test_start_polling_takes_the_first_poller():
    class Mine:
        @hookimpl
        def sdjobs_start_polling(self, request):
            return "mine"

    pm = make_plugin_manager(load_entry_points=False, disabled=())
    pm.register(Mine())
    # The built-in is trylast: a plugin's own poller wins.
    assert Hooks(pm).start_polling(request=None) == "mine"


def test_describe_plugins_lists_each_plugin_with_its_hooks_and_front_ends():
    pm = make_plugin_manager(load_entry_points=False, disabled=())
    pm.register(Recorder(), name="recorder")
    loaded = describe_plugins(pm, {"console": "sdjobs.frontends.console"})["loaded"]
    assert loaded[:2] == [
        {"name": "recorder", "hooks": ["sdjobs_progress"], "frontends": []},
        {"name": "sdjobs.frontends.console", "hooks": ["sdjobs_register_frontends"], "frontends": ["console"]},
    ]
    assert [plugin["name"] for plugin in loaded] == sorted(["recorder", *BUILT_INS])


def test_the_job_core_imports_no_front_end_and_no_pytest():
    """Dependencies point one way: front ends are plugins the core only ever loads by name."""
    code = (
        "import sys, sdjobs.hooks, sdjobs.runner, sdjobs.testing; "
        "print(sorted(m for m in sys.modules if m.startswith(('sdjobs.frontend', 'pytest', '_pytest'))))"
    )
    imported = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert imported.stdout == "[]\n"


def test_the_register_plugin_fixture_fails_a_test_whose_plugin_sdjobs_would_skip(pytester):
    pytester.makepyfile(
        test_misspelt="""
        from sdjobs import hookimpl

        class Late:
            @hookimpl
            def sdjobs_job_finishd(self, status): ...

        def test_it(register_plugin):
            register_plugin(Late())
        """
    )
    result = pytester.runpytest("-p", "no:randomly", "-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*sdjobs would skip the plugin 'Late-*': it implements sdjobs_job_finishd, which is not an sdjobs hook (did you mean 'sdjobs_job_finished'?)"])
