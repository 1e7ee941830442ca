"""`FakeClock`: time that moves only when a test says so, for the step-able job core."""

from __future__ import annotations

import attrs


@attrs.define
class FakeClock:
    """Monotonic seconds that only `advance` moves; call it like `time.monotonic`."""

    now: float = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> float:
        self.now += seconds
        return self.now
