"""The job state machine: its table binds to `Job`, walks the documented paths, documents itself."""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path

import pytest

from sdjobs import cli, hookimpl, machine
from sdjobs.client import WebUIUnreachable
from sdjobs.clock import FakeClock
from sdjobs.hooks import Hooks
from sdjobs.job import Job, JobSettings
from sdjobs.machine import END_STATES, STATES, TRANSITIONS, TRIGGERS, MachineError
from sdjobs.outputs import JobFolder
from sdjobs.spec import JobSpec, load_job
from sdjobs.status import CancelMode, JobState
from sdjobs.testing import FakeWebUI, HookRecorder, active_task

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "examples" / "demo.toml"
CALLBACK_KEYS = ("prepare", "conditions", "unless", "before", "after")


def two_stages() -> JobSpec:
    return JobSpec.from_mapping(
        {
            "name": "two",
            "prompt": "a test",
            "seed": 7,
            "settings": {"steps": 4, "width": 64, "height": 64},
            "stages": [{"type": "txt2img"}, {"type": "img2img", "denoising_strength": 0.5}],
        }
    )


class World:
    """A job over a `FakeWebUI`, with the hooks it fired."""

    def __init__(self, spec: JobSpec, plugin_manager, tmp_path: Path, *, task_tracking: bool = False,
                 settings: JobSettings = JobSettings(), clock: FakeClock | None = None) -> None:  # fmt: skip
        self.spec = spec
        self.webui = FakeWebUI(task_tracking=task_tracking, folder=JobFolder.create(tmp_path, "job-1"))
        self.recorder = HookRecorder()
        plugin_manager.register(self.recorder, name="recorder")
        plugin_manager.register(self.webui, name="fake-webui")
        self.job = Job(spec=spec, job_id="job-1", hooks=Hooks(plugin_manager), port=self.webui, settings=settings,
                       clock=clock or FakeClock())  # fmt: skip
        self.states = [self.job.state]

    def do(self, trigger: str, **kwargs) -> str:
        self.job.trigger(trigger, **kwargs)
        self.states.append(self.job.state)
        return self.job.state

    def answer(self) -> str:
        return self.do("returned", result=self.webui.answer(self.spec))


@pytest.fixture
def world(plugin_manager, tmp_path) -> World:
    return World(two_stages(), plugin_manager, tmp_path)


def test_every_trigger_is_bound_on_the_job():
    # transitions silently skips names the model already has: check that none was skipped.
    with tempfile.TemporaryDirectory() as tmp:
        job = Job(spec=two_stages(), job_id="j", hooks=None, port=FakeWebUI(folder=JobFolder.create(Path(tmp), "j")))
    for trigger in TRIGGERS:
        assert not hasattr(Job, trigger), f"Job defines {trigger}, so the machine cannot bind it"
        assert callable(getattr(job, trigger)), trigger


def test_every_named_condition_and_callback_is_a_job_method():
    named = {"end"}
    for transition in TRANSITIONS:
        for key in CALLBACK_KEYS:
            value = transition.get(key, [])
            named.update([value] if isinstance(value, str) else value)
    missing = sorted(name for name in named if not callable(getattr(Job, name, None)))
    assert missing == []


def test_every_state_is_reachable_and_every_end_is_absorbing():
    sources = {source for transition in TRANSITIONS for source in machine._sources(transition)}
    destinations = {transition["dest"] for transition in TRANSITIONS} - {None}
    assert set(STATES) - destinations == {"queued"}
    assert sources.isdisjoint(END_STATES)


def test_no_automatic_to_state_triggers(world):
    assert not hasattr(world.job, "to_done")


def test_a_job_walks_request_by_request_to_done(world):
    world.do("begin")
    world.do("prepared", folder=world.webui.folder, problems=[])
    world.do("probed", info=None, task=None)  # the baseline, in global mode
    world.answer()
    world.do("probed", info=None, task=None)
    assert world.answer() == "done"
    assert world.states == [
        "queued", "preparing", "baseline", "generating", "baseline", "generating", "done",
    ]  # fmt: skip
    assert world.recorder.names() == [
        "job_started", "stage_started", "stage_finished", "stage_started", "stage_finished", "job_finished",
    ]  # fmt: skip


def test_with_task_ids_no_baseline_is_taken(plugin_manager, tmp_path):
    world = World(two_stages(), plugin_manager, tmp_path, task_tracking=True)
    world.do("begin")
    assert world.do("prepared", folder=world.webui.folder, problems=[]) == "generating"
    assert world.webui.probes == [] and world.webui.sent[0][2] == "sdjobs-job-1-1-1"


def test_each_ping_of_a_down_server_is_told_with_its_wait_and_the_time_waited_so_far(plugin_manager, tmp_path):
    told = []

    class Told:
        @hookimpl
        def sdjobs_webui_unreachable(self, status, error, retry_in, waited):
            told.append((status.stage_index, error, retry_in, waited))

    plugin_manager.register(Told())
    clock = FakeClock()
    world = World(two_stages(), plugin_manager, tmp_path, task_tracking=True, clock=clock,
                  settings=JobSettings(wait_for_webui=10.0))  # fmt: skip
    world.do("begin")
    world.do("prepared", folder=world.webui.folder, problems=[])
    assert world.do("failed", error=WebUIUnreachable("http://webui/sdapi/v1/txt2img", None, "refused")) == "waiting_for_webui"
    while not world.job.finished and len(told) < 10:  # bounded: a job that never gives up fails the test
        clock.advance(world.job.deadline - clock())
        world.do("tick")
    # The wait doubles from 1 s, and the last ping is due when the 10 s run out: not later.
    assert [(retry_in, waited) for _, _, retry_in, waited in told] == [(1.0, 0.0), (2.0, 1.0), (4.0, 3.0), (3.0, 7.0)]
    assert {(stage, error) for stage, error, _, _ in told} == {(0, "cannot reach http://webui/sdapi/v1/txt2img: refused")}
    assert world.webui.pings == 3 and world.job.outcome is JobState.FAILED


def test_a_failed_check_ends_the_job_before_any_stage(world):
    world.do("begin")
    assert world.do("prepared", folder=None, problems=["unknown sampler 'x'"]) == "failed"
    assert world.job.error == "unknown sampler 'x'"
    assert world.recorder.names() == ["job_started", "job_finished"]
    assert world.webui.sent == []


@pytest.mark.parametrize(
    ("answers_before_cancel", "outcome", "stages_finished"),
    [(0, JobState.CANCELLED, 1), (1, JobState.DONE, 2)],
    ids=["in the first stage", "in the last stage"],
)
def test_cancel_after_this_stage_lets_the_stage_finish(world, answers_before_cancel, outcome, stages_finished):
    world.do("begin")
    world.do("prepared", folder=world.webui.folder, problems=[])
    for _ in range(answers_before_cancel):
        world.do("probed", info=None, task=None)
        world.answer()
    world.do("probed", info=None, task=None)
    assert world.do("cancel", mode=CancelMode.AFTER_STAGE) == "generating_then_stop"
    assert world.do("cancel", mode=CancelMode.AFTER_JOB) == "generating_then_stop"  # never downgraded
    world.answer()
    assert world.job.outcome is outcome
    assert world.recorder.names().count("stage_finished") == stages_finished
    assert all(not result.partial for result in world.job.results)


def test_a_cancel_now_after_after_stage_stops_at_once(world):
    world.do("begin")
    world.do("prepared", folder=world.webui.folder, problems=[])
    world.do("cancel", mode=CancelMode.AFTER_STAGE)
    assert world.job.state == "baseline_then_stop"
    assert world.do("cancel", mode=CancelMode.NOW) == "cancelled"
    assert world.webui.sent == [] and world.webui.interrupts == 0


def test_a_hand_back_interrupts_our_request_and_ends_handed_back(plugin_manager, tmp_path):
    world = World(two_stages(), plugin_manager, tmp_path, task_tracking=True)
    world.do("begin")
    world.do("prepared", folder=world.webui.folder, problems=[])
    world.do("sample", info=None, task=active_task(0.1))
    assert world.do("hand_back") == "interrupting" and world.webui.interrupts == 1
    assert world.answer() == "handed_back"
    finished = world.recorder.calls[-1][1]
    assert (finished["outcome"], finished["status"].state) == (JobState.HANDED_BACK, JobState.HANDED_BACK)
    manifest = json.loads((world.webui.folder.path / "manifest.json").read_text())
    assert manifest["outcome"] == "handed_back"


def test_a_hand_back_during_a_cancel_ends_handed_back(world):
    world.do("begin")
    world.do("prepared", folder=world.webui.folder, problems=[])
    world.do("probed", info=None, task=None)
    assert world.do("cancel", mode=CancelMode.NOW) == "asking"
    world.do("hand_back")
    assert world.do("probed", info=None, task=None) == "handed_back"  # not ours: nothing interrupted
    assert world.webui.interrupts == 0


def test_a_cancel_after_this_job_changes_nothing(world):
    world.do("begin")
    world.do("prepared", folder=world.webui.folder, problems=[])
    assert world.do("cancel", mode=CancelMode.AFTER_JOB) == "baseline"


def test_an_invalid_trigger_raises_and_changes_nothing(world):
    with pytest.raises(MachineError):
        world.do("returned", result=None)
    assert world.job.state == "queued"


def test_the_table_names_every_transition():
    table = machine.as_table()
    for source, trigger, _, dest, _ in machine.rows():
        assert re.search(rf"^{source}\s+{trigger}\s.*\s{re.escape(dest)}(\s|$)", table, re.M), (source, trigger, dest)


def test_the_docs_show_the_machine_as_it_is():
    doc = (ROOT / "docs" / "machine.md").read_text(encoding="utf-8")
    stages = tuple(stage.type for stage in load_job(DEMO).stages)
    assert f"```mermaid\n{machine.as_mermaid(stages)}\n```" in doc, "regenerate: sdjobs machine --format mermaid"
    assert f"```text\n{machine.as_table()}\n```" in doc, "regenerate: sdjobs machine"


def test_sdjobs_machine_prints_the_table_and_the_diagram(capsys):
    assert cli.main(["machine"]) == 0
    assert capsys.readouterr().out == machine.as_table() + "\n"
    assert cli.main(["machine", str(DEMO), "--format", "mermaid"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("stateDiagram-v2") and "1 txt2img → 2 img2img → 3 adetailer → 4 upscale" in out


def test_sdjobs_machine_names_a_bad_job_file(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "x"\nprompt = "y"\n[[stages]]\ntype = "txt3img"\n')
    assert cli.main(["machine", str(bad), "--format", "mermaid"]) == 2
    assert str(bad) in capsys.readouterr().err
