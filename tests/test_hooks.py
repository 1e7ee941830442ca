"""The plugin manager and the `Hooks` facade: loading, blocking, isolation."""

import logging
import textwrap

import pytest

import sdjobs.plugins.progress_poller
from sdjobs import hookimpl
from sdjobs.hooks import DEFAULT_PLUGINS, Hooks, PluginError, describe_plugins, make_plugin_manager
from sdjobs.status import RuntimeStatus

STATUS = RuntimeStatus(job_id="j", name="n", stage="txt2img", stage_index=0, stage_count=1)


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


def test_builtins_are_registered_like_any_plugin():
    pm = make_plugin_manager(load_entry_points=False, disabled=())
    assert [name for name, _ in pm.list_name_plugin()] == list(DEFAULT_PLUGINS)
    assert all(pm.get_plugin(name) is not None for name in DEFAULT_PLUGINS)


def test_disable_env_blocks_a_builtin(monkeypatch):
    monkeypatch.setenv("SDJOBS_DISABLE_PLUGINS", "sdjobs.plugins.progress_poller, other")
    pm = make_plugin_manager(load_entry_points=False)
    assert pm.get_plugins() == set()
    assert pm.is_blocked("other")
    assert describe_plugins(pm) == []


@pytest.mark.parametrize("load_entry_points", [False, True])
@pytest.mark.parametrize("name", ["progress", "sdjobs.plugins.progress_poller"])
def test_a_builtin_is_blocked_by_its_entry_point_name_or_its_module(name, load_entry_points):
    pm = make_plugin_manager(load_entry_points=load_entry_points, disabled=[name])
    assert sdjobs.plugins.progress_poller not in pm.get_plugins()


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


def test_describe_plugins_lists_each_plugin_and_its_hooks():
    pm = make_plugin_manager(load_entry_points=False, disabled=())
    pm.register(Recorder(), name="recorder")
    assert describe_plugins(pm) == [
        {"name": "recorder", "hooks": ["sdjobs_progress"]},
        {"name": "sdjobs.plugins.progress_poller", "hooks": ["sdjobs_start_polling"]},
    ]


@pytest.fixture
def installed_plugin(tmp_path, monkeypatch):
    """A real distribution on sys.path declaring a plugin in the entry-point group `sdjobs`."""
    (tmp_path / "shout_plugin.py").write_text(
        textwrap.dedent(
            """
            from sdjobs import hookimpl

            @hookimpl
            def sdjobs_amend_payload(payload):
                payload["prompt"] = payload["prompt"].upper()
            """
        )
    )
    info = tmp_path / "shout_plugin-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: shout-plugin\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[sdjobs]\nshout = shout_plugin\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return "shout"


def test_entry_point_plugins_load_only_when_asked(installed_plugin):
    assert not make_plugin_manager(load_entry_points=False, disabled=()).has_plugin(installed_plugin)
    pm = make_plugin_manager(load_entry_points=True, disabled=())
    assert pm.has_plugin(installed_plugin)
    payload = {"prompt": "quiet"}
    Hooks(pm).amend_payload(payload, stage=None, status=STATUS)
    assert payload["prompt"] == "QUIET"


def test_entry_point_plugins_can_be_disabled(installed_plugin):
    pm = make_plugin_manager(load_entry_points=True, disabled=[installed_plugin])
    assert not pm.has_plugin(installed_plugin)
