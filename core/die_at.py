"""For tests alone: kill this process at a chosen point of its work, as `kill -9` would there.

``SDJOBS_TEST_DIE_AT=<point>`` (or ``<point>@<n>``: the n-th time) makes the process
SIGKILL itself when it passes `die_at` with that point; tests/test_kill.py uses it to
kill a real `sdjobs worker` at a moment no outside signal could hit.  Never set it
outside tests.  The points:

    sample           a progress sample came while a generation request is out
    stage-written    a stage's images are renamed into place; its store row is not written
    rename-<file>    ``<file>`` (``manifest.json``, ``001.png``) is written and synced in the
                     scratch folder, not yet renamed into place
    between-stages   a stage is recorded and the manifest rewritten; the next one has not started
"""

from __future__ import annotations

import collections
import os
import signal

_passed: collections.Counter[str] = collections.Counter()


def die_at(point: str) -> None:
    """Die here if ``SDJOBS_TEST_DIE_AT`` names this point (and this is its n-th passing)."""
    wanted = os.environ.get("SDJOBS_TEST_DIE_AT")
    if not wanted or wanted.partition("@")[0] != point:
        return
    _passed[point] += 1
    if _passed[point] == int(wanted.partition("@")[2] or 1):
        os.kill(os.getpid(), getattr(signal, "SIGKILL", signal.SIGTERM))
