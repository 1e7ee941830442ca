"""`JobMachine`: a job's life as a `transitions` state machine.

States: ``queued``, one state per stage of the job (``stage1_txt2img``,
``stage2_img2img``, ...), then one of the absorbing ``done``, ``failed`` and
``cancelled``.  Triggers: ``start``, ``advance`` (to the next stage, or to
``done`` after the last), ``fail`` and ``cancel``.  There are no automatic
``to_<state>`` triggers, and a trigger that does not apply raises
`transitions.MachineError`, so a mistake in the runner cannot pass silently.

Only the runner's thread fires triggers.  The machine has no callbacks that do
work: the runner reads the new state and acts.
"""

from __future__ import annotations

from collections.abc import Sequence

from transitions import Machine, MachineError

__all__ = ["JobMachine", "MachineError", "TERMINAL_STATES", "TRIGGERS", "stage_state"]

TERMINAL_STATES = ("done", "failed", "cancelled")
TRIGGERS = ("start", "advance", "fail", "cancel")


def stage_state(index: int, stage_type: str) -> str:
    """The machine state of stage ``index`` (0-based): ``stage2_img2img``."""
    return f"stage{index + 1}_{stage_type}"


class Lifecycle:
    """The model the machine binds to: it holds ``state`` and the trigger methods."""

    state: str


class JobMachine:
    """The state machine of one job whose stages are ``stage_types``, in order.

    The machine runs over its own model, a bare `Lifecycle`: `transitions` binds
    ``state`` and the triggers there, and would silently skip any name the model
    already had.  Fire triggers with `fire`.
    """

    def __init__(self, stage_types: Sequence[str]) -> None:
        if not stage_types:
            raise ValueError("a job needs at least one stage")
        self.stages = tuple(stage_state(i, t) for i, t in enumerate(stage_types))
        active = ["queued", *self.stages]
        transitions = [
            {"trigger": "start", "source": "queued", "dest": self.stages[0]},
            *(
                {"trigger": "advance", "source": here, "dest": there}
                for here, there in zip(self.stages, [*self.stages[1:], "done"])
            ),
            {"trigger": "fail", "source": active, "dest": "failed"},
            {"trigger": "cancel", "source": active, "dest": "cancelled"},
        ]
        self.model = Lifecycle()
        self._machine = Machine(
            model=self.model,
            states=[*active, *TERMINAL_STATES],
            transitions=transitions,
            initial="queued",
            auto_transitions=False,
            queued=True,
        )

    def fire(self, trigger: str) -> None:
        """Fire ``trigger``; raise `MachineError` if it does not apply in this state."""
        if trigger not in TRIGGERS:
            raise MachineError(f"no trigger named {trigger!r}")
        getattr(self.model, trigger)()

    @property
    def state(self) -> str:
        """The current state's name: ``queued``, a stage state, or an end."""
        return self.model.state

    @property
    def terminal(self) -> bool:
        """The job has ended; no trigger applies any more."""
        return self.state in TERMINAL_STATES

    @property
    def stage_index(self) -> int | None:
        """0-based index of the running stage; None while queued or once ended."""
        try:
            return self.stages.index(self.state)
        except ValueError:
            return None
