"""A throwaway PostgreSQL server on 127.0.0.1, for tests and benchmarks of the PostgreSQL store.

`ThrowawayPostgres` runs the distribution's server binaries (`initdb`, `pg_ctl`;
found on PATH or under /usr/lib/postgresql/*/bin) on a data folder in a
temporary folder, on a free port, with authentication `trust` and without
fsync (its data is thrown away).  As root it runs the server as the `postgres`
user, as the server refuses root.  `$SDJOBS_TEST_POSTGRES` names a server to
use instead (`from_environment`).  `fresh_url` gives each test a schema of its
own, so tests never see each other's queue.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from pathlib import Path
from urllib.parse import quote

#: The environment variable naming an existing server for the tests (a `postgresql://` URL).
TEST_SERVER_ENV = "SDJOBS_TEST_POSTGRES"

#: The user a root process runs the server as.
SERVER_USER = "postgres"

#: The folder prefix of every throwaway server, under the temporary folder.
FOLDER_PREFIX = "sdjobs-postgres-"

#: The file, in a throwaway server's folder, naming the process that started it.
OWNER_FILE = "owner.pid"


def server_binaries() -> Path | None:
    """The folder holding `initdb` and `pg_ctl`, or None when PostgreSQL's server is not installed."""
    found = shutil.which("initdb")
    if found:
        return Path(found).parent
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda path: int(path.parts[-3]))
    return versions[-1].parent if versions else None


def schema_url(url: str, schema: str) -> str:
    """`url` with ``search_path`` set to `schema` (libpq's ``options``)."""
    separator = "&" if "?" in url else "?"
    return f"{url}{separator}options={quote(f'-csearch_path={schema}')}"


class ThrowawayPostgres:
    """A PostgreSQL server of its own, started by `start` and gone (with its data) after `stop`."""

    def __init__(self, binaries: Path, folder: Path | None = None) -> None:
        self.binaries = binaries
        self.folder = folder or Path(tempfile.mkdtemp(prefix=FOLDER_PREFIX))
        self.data = self.folder / "data"
        self.port = 0
        self.url = ""

    def _run(self, *command: str) -> None:
        """Run a server binary, as `SERVER_USER` when we are root; its output only in the error."""
        argv = [str(self.binaries / command[0]), *command[1:]]
        if os.geteuid() == 0:
            argv = ["runuser", "-u", SERVER_USER, "--", *argv]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{command[0]} failed ({done.returncode}): {done.stdout}{done.stderr}")

    def start(self) -> str:
        """Make the data folder, start the server, return its URL (database ``postgres``, user ``sdjobs``).

        First stops the servers that killed test runs left behind (`reap`).
        """
        reap(self.binaries, self.folder.parent)
        (self.folder / OWNER_FILE).write_text(str(os.getpid()))
        if os.geteuid() == 0:
            user = pwd.getpwnam(SERVER_USER)
            os.chown(self.folder, user.pw_uid, user.pw_gid)
        self._run("initdb", "-D", str(self.data), "-U", "sdjobs", "-A", "trust", "-E", "UTF8", "--locale=C", "--no-sync")
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        options = (
            f"-p {self.port} -k {self.data} -c listen_addresses=127.0.0.1 -c fsync=off"
            " -c synchronous_commit=off -c full_page_writes=off -c max_connections=200"
        )
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.data / "server.log"), "-w", "-t", "60", "-o", options, "start")
        self.url = f"postgresql://sdjobs@127.0.0.1:{self.port}/postgres"
        return self.url

    def stop(self) -> None:
        """Stop the server at once and remove its data."""
        if self.url or (self.data / "postmaster.pid").exists():
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
            self.url = ""
        shutil.rmtree(self.folder, ignore_errors=True)


def reap(binaries: Path, temporary: Path) -> list[Path]:
    """Stop the throwaway servers under `temporary` whose starter is gone, and remove their data.

    `pg_ctl` detaches the server, so a test run killed (SIGKILL, a timeout) before its
    teardown leaves it running, listening and holding memory; the next run stops it.
    Returns the folders removed.
    """
    reaped = []
    for folder in temporary.glob(f"{FOLDER_PREFIX}*"):
        try:
            owner = int((folder / OWNER_FILE).read_text())
        except (OSError, ValueError):
            continue  # not started yet, or not ours
        if _alive(owner):
            continue
        try:
            ThrowawayPostgres(binaries, folder).stop()
        except (RuntimeError, OSError, subprocess.TimeoutExpired):
            continue  # left for a look by hand
        reaped.append(folder)
    return reaped


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's
    return True


def fresh_url(url: str) -> str:
    """A new, empty schema on the server at `url`: the URL of a queue no one else uses."""
    import psycopg

    schema = f"sdjobs_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(url, autocommit=True) as connection:
        connection.execute(f"CREATE SCHEMA {schema}")
    return schema_url(url, schema)
