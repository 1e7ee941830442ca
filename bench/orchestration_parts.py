"""Where the orchestration overhead goes: the same measure as `orchestration.py` at 0 ms a
step, with the durability writes' fsyncs skipped, with the server's lists answered from
memory (as for every job of a run after the first that named the same kinds of things),
and with both.  Prints a table; nothing here is sdjobs' behaviour."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from unittest import mock

import orchestration
from _common import four_stage_job, simulator_process, table

from sdjobs import runner
from sdjobs.client import WebUIClient
from sdjobs.preflight import ask_for_lists, lists_needed


@contextlib.contextmanager
def without_fsync() -> Iterator[None]:
    with mock.patch.object(os, "fsync", lambda fd: None):
        yield


@contextlib.contextmanager
def lists_known() -> Iterator[None]:
    with simulator_process(0.0) as url, WebUIClient(url) as client:
        answers = ask_for_lists(client, lists_needed([four_stage_job()]))
    with mock.patch.object(runner, "ask_for_lists", lambda client, lists: {name: answers[name] for name in lists}):
        yield


def per_stage() -> str:
    _, _, overhead = orchestration.measure(0.0, 15)
    return f"{overhead / 4 * 1000:.1f} ms"


def main() -> None:
    rows = [["as it is", per_stage()]]
    with without_fsync():
        rows.append(["no fsync (images and the last manifest)", per_stage()])
    with lists_known():
        rows.append(["the server's lists known", per_stage()])
        with without_fsync():
            rows.append(["both", per_stage()])
    print(table(["orchestration at 0 ms a step", "overhead/stage"], rows))


if __name__ == "__main__":
    main()
