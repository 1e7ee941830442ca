"""The job state machine: its states, triggers and absorbing ends."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sdjobs.machine import TERMINAL_STATES, TRIGGERS, JobMachine, MachineError

CHAIN = ["txt2img", "img2img", "adetailer", "upscale"]


def test_every_trigger_is_bound_on_the_model():
    # transitions silently skips names the model already has: check they are there.
    machine = JobMachine(CHAIN)
    for trigger in TRIGGERS:
        assert callable(getattr(machine.model, trigger)), trigger


def test_states_are_queued_one_per_stage_and_the_ends():
    machine = JobMachine(CHAIN)
    assert machine.stages == (
        "stage1_txt2img",
        "stage2_img2img",
        "stage3_adetailer",
        "stage4_upscale",
    )
    assert set(machine._machine.states) == {"queued", *machine.stages, *TERMINAL_STATES}


def test_a_job_walks_its_stages_in_order_to_done():
    machine = JobMachine(CHAIN)
    seen = [machine.state]
    machine.fire("start")
    seen.append(machine.state)
    for _ in CHAIN:
        machine.fire("advance")
        seen.append(machine.state)
    assert seen == ["queued", *machine.stages, "done"]
    assert machine.terminal and machine.stage_index is None


def test_no_automatic_to_state_triggers():
    machine = JobMachine(CHAIN)
    assert not hasattr(machine.model, "to_done")


@pytest.mark.parametrize("end", ["fail", "cancel"])
def test_a_running_job_can_fail_or_be_cancelled(end):
    machine = JobMachine(CHAIN)
    machine.fire("start")
    machine.fire("advance")
    machine.fire(end)
    assert machine.state == {"fail": "failed", "cancel": "cancelled"}[end]


def test_advance_while_queued_raises():
    with pytest.raises(MachineError):
        JobMachine(CHAIN).fire("advance")


def test_an_unknown_trigger_raises():
    with pytest.raises(MachineError):
        JobMachine(CHAIN).fire("to_done")


def test_a_job_needs_a_stage():
    with pytest.raises(ValueError):
        JobMachine([])


@given(
    chain=st.lists(st.sampled_from(CHAIN), min_size=1, max_size=5),
    triggers=st.lists(st.sampled_from(TRIGGERS), max_size=12),
)
def test_terminal_states_are_absorbing_and_invalid_triggers_raise(chain, triggers):
    machine = JobMachine(chain)
    for trigger in triggers:
        before = machine.state
        try:
            machine.fire(trigger)
        except MachineError:
            assert machine.state == before  # a refused trigger changes nothing
            continue
        assert before not in TERMINAL_STATES, f"{trigger} left terminal state {before}"
    if machine.terminal:
        for trigger in TRIGGERS:
            with pytest.raises(MachineError):
                machine.fire(trigger)
