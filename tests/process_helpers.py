"""The `sdjobs` command as a user runs it: in a process of its own, read as it writes; and a
call in a fork of the test process, for what must happen in another process (or as another user)
to the very code under test."""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from sdjobs.sqlite_store import QUEUE_ENV

#: The command, as `subprocess` takes it; arguments follow.
SDJOBS = [sys.executable, "-m", "sdjobs"]


def environment() -> dict[str, str]:
    """This process's environment without sdjobs' own variables, so only the arguments count;
    but the test's own queue file (see conftest), so no command touches the user's queue."""
    return {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("SDJOBS_") or key == QUEUE_ENV
    }


def sdjobs(
    *args: str | Path, timeout: float = 30.0, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the command; ``env`` adds to the environment (see `environment`)."""
    return subprocess.run(
        [*SDJOBS, *map(str, args)],
        capture_output=True,
        text=True,
        env=environment() | dict(env or {}),
        timeout=timeout,
        check=False,
    )


def start(
    *args: str | Path, env: Mapping[str, str] | None = None
) -> subprocess.Popen[str]:
    """Start the command, its stdout and stderr piped (read them with `Lines`); ``env`` as for `sdjobs`."""
    return subprocess.Popen(
        [*SDJOBS, *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=environment() | dict(env or {}),
    )


@contextmanager
def killable_sim(*options: str | Path) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """`sdjobs sim` in a process of its own (so a test can kill it), and its URL."""
    sim = start("sim", "--port", "0", *options)
    try:
        yield sim, re.search(r"http://\S+", sim.stdout.readline()).group(0)
    finally:
        sim.kill()
        sim.wait(timeout=10)


class Lines:
    """A pipe's lines, read on a thread as they come; a test can wait for one."""

    def __init__(self, pipe) -> None:
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, args=(pipe,), daemon=True)
        self._reader.start()

    def _read(self, pipe) -> None:
        for line in pipe:
            with self._changed:
                self.lines.append(line)
                self._changed.notify_all()

    def wait_for(self, text: str, timeout: float = 30.0) -> bool:
        with self._changed:
            return self._changed.wait_for(
                lambda: any(text in line for line in self.lines), timeout
            )

    def text(self, timeout: float = 10.0) -> str:
        """Everything, once the pipe has closed."""
        self._reader.join(timeout)
        return "".join(self.lines)


#: The user `in_fork` drops to for a check that binds root to nothing (file permissions, signals).
NOBODY = 65534


def in_fork(call: Callable[[], object], *, user: int | None = None, timeout: float = 30.0) -> tuple[str, int]:
    """Run ``call`` in a fork of this process, as user ``user`` when given (which needs root).

    Returns what it returned, or the error it raised, as text ("" if the fork was killed first),
    and how the fork ended (`os.waitpid`'s status).  The fork runs this process's code as it is:
    under `./dev mutate`, the mutant too, unlike a process started anew.
    """
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the fork: never returns into pytest
        try:
            os.close(read)
            if user is not None:
                os.setgid(user)
                os.setuid(user)
            try:
                answer = str(call())
            except Exception as error:
                answer = f"{type(error).__name__}: {error}"
            os.write(write, answer.encode())
        finally:
            os._exit(0)
    os.close(write)
    chunks = []
    deadline = time.monotonic() + timeout
    try:
        while select.select([read], [], [], max(0.0, deadline - time.monotonic()))[0]:
            if not (chunk := os.read(read, 65536)):
                break  # the fork has ended
            chunks.append(chunk)
        else:
            os.kill(pid, signal.SIGKILL)
            raise AssertionError(f"the forked call did not end within {timeout} s")
    finally:
        os.close(read)
        _, status = os.waitpid(pid, 0)
    return b"".join(chunks).decode(), status
