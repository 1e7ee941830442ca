"""A simulated AUTOMATIC1111 WebUI: a real HTTP server that behaves like A1111 where a client can see it.

It follows the recorded server (dev c8a5322d, about 1.8): the progress formula and its
quirks, one generation at a time in arrival order, global interrupt and skip, task ids
with `/internal/progress`, ADetailer's extra passes, `--api-auth`, and A1111's error
bodies.  Time is either simulated (`step_time` seconds per step) or driven by a test
(`stepping=True` with `release()`).
"""

from .catalog import CatalogChoice
from .server import SimulatedWebUI
from .settings import SimSettings
from .state import StateSnapshot

__all__ = ["CatalogChoice", "SimSettings", "SimulatedWebUI", "StateSnapshot"]
