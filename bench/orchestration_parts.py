"""Where the orchestration overhead goes: the same measure as `orchestration.py` at 0 ms a
step, with the durability writes' fsyncs skipped, with only the five preflight lists a job of
this shape needs asked for, and with both.  Prints a table; nothing here is sdjobs' behaviour."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from unittest import mock

import orchestration
from _common import table

from sdjobs.client import WebUIClient

OPTIONAL_LISTS = ("schedulers", "sd_vae", "loras")


@contextlib.contextmanager
def without_fsync() -> Iterator[None]:
    with mock.patch.object(os, "fsync", lambda fd: None):
        yield


@contextlib.contextmanager
def five_lists() -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        for name in OPTIONAL_LISTS:
            stack.enter_context(mock.patch.object(WebUIClient, name, lambda self: None))
        yield


def per_stage() -> str:
    ours, theirs = orchestration.measure(0.0, 15)
    return f"{(ours - theirs) / 4 * 1000:.1f} ms"


def main() -> None:
    rows = [["as it is", per_stage()]]
    with without_fsync():
        rows.append(["no fsync (images and manifest)", per_stage()])
    with five_lists():
        rows.append(["five preflight lists, not eight", per_stage()])
        with without_fsync():
            rows.append(["both", per_stage()])
    print(table(["orchestration at 0 ms a step", "overhead/stage"], rows))


if __name__ == "__main__":
    main()
