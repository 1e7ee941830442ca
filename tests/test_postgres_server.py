"""The throwaway PostgreSQL server of the tests: one that a killed test run left behind is stopped
by the next run."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import psycopg
import pytest

from sdjobs.postgres_server import FOLDER_PREFIX, reap, server_binaries

#: Starts a throwaway server in the folder given, prints its URL, and is killed before it can stop it.
KILLED_RUN = """
import os, signal, sys
from pathlib import Path
from sdjobs.postgres_server import ThrowawayPostgres
print(ThrowawayPostgres(Path(sys.argv[1]), Path(sys.argv[2])).start(), flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.fixture
def temporary():
    """A temporary folder of the test's own that the server's user may enter (pytest's is root's alone)."""
    folder = Path(tempfile.mkdtemp(prefix="sdjobs-reap-test-"))
    folder.chmod(0o755)
    yield folder
    reap(server_binaries(), folder)  # a server the test left, had it failed before reaping
    shutil.rmtree(folder, ignore_errors=True)


def test_a_server_whose_test_run_was_killed_is_stopped_by_the_next_run(postgres_url, temporary):
    binaries = server_binaries()
    left = temporary / f"{FOLDER_PREFIX}left"
    left.mkdir()
    killed = subprocess.run([sys.executable, "-c", KILLED_RUN, str(binaries), str(left)],
                            capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    url = killed.stdout.strip()
    psycopg.connect(url, connect_timeout=5).close()  # still up: nothing stopped it
    running = temporary / f"{FOLDER_PREFIX}running"
    running.mkdir()
    (running / "owner.pid").write_text(str(os.getpid()))  # a live run's: left alone

    assert reap(binaries, temporary) == [left]

    assert not left.exists() and running.exists()
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(url, connect_timeout=5)
