"""A job's whole life, as one `transitions` state machine.

Read this table to learn what a job does.  The runner feeds a job the events
of the world, one at a time on its own thread, as *triggers*: `begin`,
`prepared`, `sample`, `probed`, `returned`, `failed`, `reached`, `unanswered`,
`cancel`, `hand_back`, `tick` and `abort`.  *Conditions* decide where each trigger leads; *callbacks* do the
work and fire the hooks.  The conditions and callbacks are named here and
written as methods of the model, `sdjobs.job.Job`.

The states::

    queued             waiting to start
    preparing          the server is checked (preflight lists, task ids), the folder made (or
                       reopened: a resumed job goes on at its first unfinished stage)
    waiting_to_prepare the server was down or hung (no answer in time) for the checks; it is
                       pinged with backoff until it answers (then `preparing` again) or
                       `wait_for_webui` runs out (`failed`)
    requesting         the stage's next request is built (its payload amended by plugins)
    baseline           a sample of what the server runs before ours is taken (no task ids)
    generating         our request is out and its progress followed
    asking             a cancel came: is the request the server runs ours? (no task ids)
    interrupting       our request was interrupted for a cancel; its answer is awaited, unless
                       the interrupt itself went unanswered (`unanswered`: a frozen server)
    stall_interrupting our request was interrupted because nothing moved; its answer is awaited,
                       unless the interrupt went unanswered
    waiting_for_webui  the server went down under our request (refused, dropped, a gateway's
                       502/503/504); it is pinged with backoff, and once it answers the stage
                       goes on with that request again (`requesting`); its answered requests stay
    done, failed, cancelled    the ends, absorbing
    handed_back        the end of an attempt stopped as a cancel "now" stops it, but given back to
                       the queue to resume later (SIGTERM, a second Ctrl-C, `queue pause --now`):
                       every transition to `cancelled` has a twin to `handed_back`, taken instead
                       once `hand_back` came (`handing_back`); also the end of an attempt whose next
                       stage runs on another server (`passed_on`), back in the queue for it

and `requesting`, `baseline`, `generating`, `waiting_for_webui` each have a twin ending in
``_then_stop``: the same work, after a cancel "after this stage", so that the
stage's end leads to `cancelled` (or to `done`, after the last stage).

**Why flat, with the stage index as model data.**  Every stage goes through
the same few states, so a `HierarchicalMachine` with one nested copy per stage
would repeat the table once per stage and make a new machine's size depend on
the job; here the table is one page, whatever the job, and the stage number is
data beside it (`Job.stage`), as the step number is.

Triggers that may come late are listed too and change nothing (a probe's
answer after its deadline, a sample once the request is being stopped).  Any
other trigger that does not apply raises `MachineError`, the ends included:
nothing passes silently.
"""

from __future__ import annotations

from typing import Any

from transitions import Machine, MachineError

__all__ = [
    "END_STATES",
    "MachineError",
    "STATES",
    "TRANSITIONS",
    "TRIGGERS",
    "new_machine",
]

END_STATES = ("done", "failed", "cancelled", "handed_back")

#: The states where the stage goes on; each has a twin for "stop after this stage".
WORKING = ("requesting", "baseline", "generating", "waiting_for_webui")
STOPPING = tuple(f"{state}_then_stop" for state in WORKING)

STATES = ("queued", "preparing", "waiting_to_prepare", *WORKING, *STOPPING, "asking", "interrupting", "stall_interrupting", *END_STATES)

#: The states of a running stage.
IN_STAGE = (*WORKING, *STOPPING, "asking", "interrupting", "stall_interrupting")
#: The states where a request is out and its answer awaited.
AWAITING_ANSWER = ("generating", "generating_then_stop", "asking", "interrupting", "stall_interrupting")

#: The states where the server is down and pinged until it answers.
WAITING = ("waiting_to_prepare", "waiting_for_webui", "waiting_for_webui_then_stop")

#: What the runner feeds a job, and what the job fires itself from a callback (`ready`, `stall`).
TRIGGERS = ("begin", "prepared", "ready", "sample", "probed", "returned", "failed", "reached", "unanswered",
            "cancel", "hand_back", "stall", "tick", "abort")  # fmt: skip


def _twin(state: str) -> str:
    return f"{state}_then_stop"


def _stage_work(trigger: str, source: str, dest: str | None, **extra: Any) -> list[dict[str, Any]]:
    """A transition from a working state, and the same from its stopping twin (to the twin of ``dest``)."""
    # pragma: no mutate block (it runs once, at import, before mutmut switches a mutant on: docs/mutation.md)
    return [
        {"trigger": trigger, "source": source, "dest": dest, **extra},
        {"trigger": trigger, "source": _twin(source), "dest": _twin(dest) if dest in WORKING else dest, **extra},
    ]


def _ignore(trigger: str, sources: list[str]) -> dict[str, Any]:
    """``trigger`` may arrive late in ``sources``; it changes nothing there."""
    # pragma: no mutate block (it runs once, at import, before mutmut switches a mutant on: docs/mutation.md)
    return {"trigger": trigger, "source": sources, "dest": None}


def _or_handed_back(transitions: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each transition to `cancelled` preceded by its twin to `handed_back`, taken for a job handed back."""
    # pragma: no mutate block (it runs once, at import, before mutmut switches a mutant on: docs/mutation.md)
    out = []
    for transition in transitions:
        if transition["dest"] == "cancelled":
            conditions = transition.get("conditions", [])
            conditions = [conditions] if isinstance(conditions, str) else conditions
            out.append({**transition, "dest": "handed_back", "conditions": ["handing_back", *conditions]})
        out.append(transition)
    return out


TRANSITIONS: list[dict[str, Any]] = _or_handed_back([
    # -- leaving the queue: job_started, then the server's answers to the checks ------------------
    {"trigger": "begin", "source": "queued", "dest": "preparing", "after": "prepare"},
    {"trigger": "prepared", "source": "preparing", "dest": "failed", "conditions": "has_problems",
     "before": "fail_with_problems"},
    {"trigger": "prepared", "source": "preparing", "dest": "done", "conditions": "all_stages_finished",
     "before": "skip_finished_job"},
    {"trigger": "prepared", "source": "preparing", "dest": "requesting", "conditions": "resumed",
     "before": "resume_stage", "after": "request"},
    {"trigger": "prepared", "source": "preparing", "dest": "requesting",
     "before": "start_first_stage", "after": "request"},
    {"trigger": "tick", "source": "preparing", "dest": "failed", "conditions": "late", "before": "fail_unprepared"},
    {"trigger": "failed", "source": "preparing", "dest": "waiting_to_prepare", "conditions": "unreachable",
     "after": "wait_for_webui"},
    {"trigger": "failed", "source": "preparing", "dest": "failed", "before": "fail_with_error"},
    {"trigger": "reached", "source": "waiting_to_prepare", "dest": "preparing", "after": "check"},
    # -- one request of a stage: build it, take a baseline sample if needed, send it ---------------
    *_stage_work("ready", "requesting", "baseline", conditions="needs_baseline", after="ask_baseline"),
    *_stage_work("ready", "requesting", "generating", after="send"),
    *_stage_work("probed", "baseline", "generating", before="note_baseline", after="send"),
    *_stage_work("tick", "baseline", "generating", conditions="late", after="send"),
    *_stage_work("sample", "generating", None, after="fold"),
    {"trigger": "sample", "source": "stall_interrupting", "dest": None, "after": "fold"},
    *_stage_work("tick", "generating", None, after="watch_stall"),
    *_stage_work("stall", "generating", "stall_interrupting", after="interrupt"),
    # -- the server goes down under a request: wait for it, then send that request again ------------
    *_stage_work("failed", "generating", "waiting_for_webui", conditions="server_down", before="lose_request",
                 after="wait_for_webui"),
    *_stage_work("reached", "waiting_for_webui", "requesting", after="request"),
    *({"trigger": "tick", "source": state, "dest": "failed", "conditions": ["late", "waited_out"],
       "before": "fail_unreachable"} for state in WAITING),
    {"trigger": "tick", "source": list(WAITING), "dest": None, "conditions": "late", "after": "ping"},
    # -- the request answers: the next request, the next stage, or an end ---------------------------
    *_stage_work("returned", "generating", "failed", conditions="answer_is_wrong",
                 before=["keep", "fail_with_answer"]),
    *_stage_work("returned", "generating", "requesting", conditions="more_requests", before="keep",
                 after="request"),
    {"trigger": "returned", "source": ["generating", "generating_then_stop"], "dest": "done",
     "conditions": "last_stage", "before": ["keep", "finish_stage"]},
    {"trigger": "returned", "source": "generating", "dest": "handed_back", "conditions": "passed_on",
     "before": ["keep", "finish_stage"]},
    {"trigger": "returned", "source": "generating", "dest": "requesting",
     "before": ["keep", "next_stage"], "after": "request"},
    {"trigger": "returned", "source": "generating_then_stop", "dest": "cancelled",
     "before": ["keep", "finish_stage"]},
    {"trigger": "returned", "source": ["asking", "interrupting"], "dest": "cancelled", "before": "keep"},
    {"trigger": "returned", "source": "stall_interrupting", "dest": "failed", "before": ["keep", "fail_stalled"]},
    {"trigger": "failed", "source": ["generating", "generating_then_stop"], "dest": "failed",
     "before": "fail_with_error"},
    {"trigger": "failed", "source": "stall_interrupting", "dest": "failed", "before": "fail_stalled"},
    {"trigger": "failed", "source": ["asking", "interrupting"], "dest": "cancelled"},
    # -- the interrupt itself got no answer (timed out, or refused): a frozen server answers nothing more
    {"trigger": "unanswered", "source": "interrupting", "dest": "cancelled", "before": "note_unanswered"},
    {"trigger": "unanswered", "source": "stall_interrupting", "dest": "failed", "before": "fail_unanswered"},
    # -- cancels: "after this job" changes nothing here; a later cancel may only stop sooner -------
    {"trigger": "cancel", "source": ["queued", "preparing", "waiting_to_prepare"], "dest": "cancelled",
     "unless": "after_job"},
    *({"trigger": "cancel", "source": state, "dest": _twin(state), "conditions": "after_stage"}
      for state in WORKING),
    {"trigger": "cancel", "source": ["requesting", "baseline", "waiting_for_webui", "requesting_then_stop",
                                     "baseline_then_stop", "waiting_for_webui_then_stop"],
     "dest": "cancelled", "conditions": "now"},
    {"trigger": "cancel", "source": ["generating", "generating_then_stop", "stall_interrupting"], "dest": "cancelled",
     "conditions": ["now", "server_silent"], "before": "interrupt"},
    {"trigger": "cancel", "source": ["generating", "generating_then_stop"], "dest": "interrupting",
     "conditions": ["now", "ours_running"], "after": "interrupt"},
    {"trigger": "cancel", "source": ["generating", "generating_then_stop"], "dest": "asking",
     "conditions": "now", "after": "ask_owner"},
    {"trigger": "cancel", "source": "stall_interrupting", "dest": "interrupting", "conditions": "now",
     "after": "await_interrupted"},
    _ignore("cancel", ["queued", "preparing", "waiting_to_prepare", *WORKING, *STOPPING, "asking", "interrupting",
                       "stall_interrupting"]),
    # -- a hand-back: a cancel "now" whose end is `handed_back` ---------------------------------------
    {"trigger": "hand_back", "source": [state for state in STATES if state not in END_STATES], "dest": None,
     "after": "hand_back_now"},
    {"trigger": "probed", "source": "asking", "dest": "interrupting", "prepare": "fold_probe",
     "conditions": "ours_running", "after": "interrupt"},
    {"trigger": "probed", "source": "asking", "dest": "cancelled"},
    {"trigger": "tick", "source": ["asking", "interrupting"], "dest": "cancelled", "conditions": "late"},
    {"trigger": "tick", "source": "stall_interrupting", "dest": "failed", "conditions": "late",
     "before": "fail_unanswered"},
    # -- anything else that goes wrong: a plugin, a disk, a bug ---------------------------------------
    {"trigger": "abort", "source": ["preparing", "waiting_to_prepare", *IN_STAGE], "dest": "failed", "before": "fail_with_error"},
    # -- late arrivals, which change nothing ---------------------------------------------------------
    _ignore("sample", ["preparing", *WAITING, "requesting", "requesting_then_stop", "baseline",
                       "baseline_then_stop", "asking", "interrupting"]),
    _ignore("probed", ["preparing", "requesting", "requesting_then_stop", "generating",
                       "generating_then_stop", "interrupting", "stall_interrupting"]),
    _ignore("tick", ["queued", "preparing", *WAITING, "requesting", "requesting_then_stop", "baseline",
                     "baseline_then_stop", "asking", "interrupting", "stall_interrupting"]),
    _ignore("reached", [state for state in STATES if state not in (*WAITING, *END_STATES)]),
])  # fmt: skip


def new_machine(model: object) -> Machine:
    """Bind a fresh machine to ``model`` (a `Job`), in state ``queued``; every end calls ``model.end``.

    ``queued=True``: a trigger fired from a callback (`ready`, `failed`) runs
    once the current transition is complete, never inside it.  Callbacks get
    the `EventData`, so a trigger's arguments are passed by name.
    """
    return Machine(
        model=model,
        states=[{"name": name, "on_enter": "end"} if name in END_STATES else name for name in STATES],
        transitions=TRANSITIONS,
        initial="queued",
        auto_transitions=False,
        queued=True,
        send_event=True,
    )


def _callbacks(transition: dict[str, Any], key: str) -> list[str]:
    names = transition.get(key, [])
    return [names] if isinstance(names, str) else list(names)


def _sources(transition: dict[str, Any]) -> list[str]:
    source = transition["source"]
    return [source] if isinstance(source, str) else list(source)


def _guard(transition: dict[str, Any]) -> str:
    """The transition's conditions as one label: ``now, ours_running``, ``not after_job``."""
    return ", ".join(
        [*_callbacks(transition, "conditions"), *(f"not {name}" for name in _callbacks(transition, "unless"))]
    )


def rows() -> list[tuple[str, str, str, str, str]]:
    """Every transition as ``(source, trigger, condition, destination, callbacks)``, in the
    order `transitions` tries them; the destination is ``-`` where the state stays."""
    table = []
    for transition in TRANSITIONS:
        work = [*_callbacks(transition, "prepare"), *_callbacks(transition, "before"), *_callbacks(transition, "after")]
        for source in _sources(transition):
            dest = transition["dest"] or "-"
            table.append((source, transition["trigger"], _guard(transition), dest, ", ".join(work)))
    return table


def as_table() -> str:
    """The transitions as a plain-text table, grouped by source state."""
    header = ("state", "trigger", "if", "to", "does")
    lines = sorted(rows(), key=lambda row: STATES.index(row[0]))  # stable: each state's own order stays
    widths = [max(len(row[i]) for row in [header, *lines]) for i in range(len(header))]
    out = ["  ".join(cell.ljust(width) for cell, width in zip(header, widths)).rstrip()]
    out.append("  ".join("-" * width for width in widths))
    out.extend("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in lines)
    return "\n".join(out)


def as_mermaid(stage_types: tuple[str, ...] = ()) -> str:
    """A Mermaid state diagram; ``stage_types`` name the stages a job walks through the stage states.

    Transitions that change nothing (late arrivals, samples, stall watching) are left out.
    """
    out = ["stateDiagram-v2", "    [*] --> queued"]
    for source, trigger, guard, dest, _ in rows():
        if dest != "-":
            label = f"{trigger} [{guard}]" if guard else trigger
            out.append(f"    {source} --> {dest}: {label}")
    out.extend(f"    {end} --> [*]" for end in END_STATES)
    if stage_types:
        stages = " → ".join(f"{i + 1} {kind}" for i, kind in enumerate(stage_types))
        out.append(f"    note right of requesting: each stage in turn: {stages}")
    return "\n".join(out)
