"""Shared fixtures.  The simulated WebUI fixtures come from sdjobs' own pytest plugin."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from hypothesis import settings

settings.register_profile("ci", max_examples=200, deadline=None)
settings.register_profile("dev", max_examples=50, deadline=None)
settings.load_profile("ci" if __import__("os").environ.get("CI") else "dev")

TRACES = Path(__file__).parent / "data" / "traces"


@pytest.fixture(autouse=True)
def queue_file(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test's queue is a file of its own (`SDJOBS_QUEUE`, inherited by the commands it starts):
    no test touches the user's data folder, and no two tests share a queue.  The data folder
    itself moves too, for the commands a test starts without sdjobs' variables."""
    folder = tmp_path_factory.mktemp("queue")
    monkeypatch.setenv("XDG_DATA_HOME", str(folder / "data"))
    monkeypatch.setenv("SDJOBS_QUEUE", str(folder / "queue.db"))
    return folder / "queue.db"


@pytest.fixture
def canned_server() -> Iterator[Callable[[int, object], str]]:
    """A real HTTP server on 127.0.0.1 that answers every request with one canned reply.

    For shapes the simulator does not speak (Forge's and SD.Next's error bodies).
    Returns a function ``serve(status, body) -> url``.
    """
    servers: list[ThreadingHTTPServer] = []

    def serve(status: int, body: object) -> str:
        payload = body if isinstance(body, bytes) else json.dumps(body).encode()

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = _answer

            def log_message(self, *args: object) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield serve
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture
def closed_port_url() -> str:
    """A URL on 127.0.0.1 where nothing listens."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"
