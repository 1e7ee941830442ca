"""A real webhook receiver and a real `notify-send` stand-in for the plugin's tests."""

from __future__ import annotations

import json
import os
import queue
import socket
import stat
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import attrs
import pytest


@attrs.frozen
class Delivery:
    """One request the webhook received."""

    path: str
    headers: dict[str, str]
    body: dict[str, Any]


@attrs.define
class Webhook:
    """A webhook on 127.0.0.1: what it received, in order, and the status it answers with."""

    url: str
    received: queue.Queue[Delivery] = attrs.field(factory=queue.Queue)
    status: int = 204

    def next(self) -> Delivery:
        """The next delivery; fails the test if none comes within five seconds."""
        try:
            return self.received.get(timeout=5)
        except queue.Empty:
            pytest.fail("the webhook received nothing")

    def all(self) -> list[Delivery]:
        """Everything received so far (the plugin posts synchronously, so that is all there is)."""
        deliveries = []
        while not self.received.empty():
            deliveries.append(self.received.get_nowait())
        return deliveries


@pytest.fixture
def webhook() -> Iterator[Webhook]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            hook.received.put(Delivery(self.path, dict(self.headers), body))
            self.send_response(hook.status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    hook = Webhook(url=f"http://127.0.0.1:{server.server_address[1]}/hook")
    # A short poll interval, so that shutdown() returns at once at the end of the test.
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    yield hook
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


@pytest.fixture
def closed_port_url() -> str:
    """A URL on 127.0.0.1 where nothing listens."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/hook"


@pytest.fixture
def fake_notify_send(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[[str], Path]:
    """Puts an executable `notify-send` first on PATH; returns the file its arguments go to.

    ``install(script)`` runs ``script`` (shell) after the arguments were written,
    so a test can make it fail or hang.
    """
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    args_file = tmp_path / "notify-send.args"

    def install(script: str = "") -> Path:
        program = bin_dir / "notify-send"
        program.write_text(f"#!/bin/sh\nprintf '%s\\n' \"$@\" > '{args_file}'\n{script}\n")
        program.chmod(program.stat().st_mode | stat.S_IXUSR)
        monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
        return args_file

    return install
