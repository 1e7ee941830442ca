"""How long one observer hook takes to reach 10 plugins.

Target: ≤ 20 µs per event.  Run: python bench/hook_dispatch.py
"""

from __future__ import annotations

import timeit

from sdjobs import hookimpl
from sdjobs.hooks import Hooks, make_plugin_manager
from sdjobs.status import RuntimeStatus

PLUGINS = 10
EVENTS = 20_000


class Counter:
    def __init__(self) -> None:
        self.calls = 0

    @hookimpl
    def sdjobs_progress(self, status: RuntimeStatus) -> None:
        self.calls += 1


def main() -> None:
    pm = make_plugin_manager(load_entry_points=False, disabled=())
    counters = [Counter() for _ in range(PLUGINS)]
    for counter in counters:
        pm.register(counter)
    hooks = Hooks(pm)
    status = RuntimeStatus(job_id="j", name="bench", stage="txt2img", stage_index=0, stage_count=4)
    best = min(timeit.repeat(lambda: hooks.progress(status), number=EVENTS, repeat=5)) / EVENTS
    assert all(counter.calls == EVENTS * 5 for counter in counters)
    print("| measure | value | target |")
    print("| --- | --- | --- |")
    print(f"| hook dispatch, {PLUGINS} observer plugins | {best * 1e6:.1f} µs/event | ≤ 20 µs |")


if __name__ == "__main__":
    main()
