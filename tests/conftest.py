"""Shared fixtures.  The simulated WebUI fixtures come from sdjobs' own pytest plugin."""

from __future__ import annotations

import json
import os
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from hypothesis import Phase, settings

settings.register_profile("ci", max_examples=200, deadline=None)
settings.register_profile("dev", max_examples=50, deadline=None)
# `./dev mutate` runs the tests once per mutant: fewer examples (and steps), so a full run fits its time, drawn
# the same way every time (so a mutant's verdict does not change from run to run), no example
# database (each mutant's failures would be replayed against the next), and no shrinking: a failure
# kills the mutant as it is, and shrinking it could take until the mutant's timeout.
settings.register_profile(
    "mutate", max_examples=20, stateful_step_count=20, deadline=None, derandomize=True, database=None,
    phases=(Phase.explicit, Phase.generate),
)
settings.load_profile(os.environ.get("SDJOBS_HYPOTHESIS_PROFILE") or ("ci" if os.environ.get("CI") else "dev"))

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


#: What a route answers: (status, body, Content-Type or None for no such header), and optionally
#: the status line's reason phrase and more headers; or a list of them, one per request in turn
#: (the last for every request after).
Answer = tuple | list

NOT_FOUND: Answer = (404, {"detail": "Not Found"}, "application/json")


@pytest.fixture
def routes() -> Iterator[Callable[..., tuple[str, Counter]]]:
    """A real HTTP server on 127.0.0.1 answering each path as told (``default``, 404, for the
    others), counting the requests to each.  Returns ``serve(answers, default) -> (url, counts)``.

    For what the simulator never answers (odd shapes, HTML pages, Forge's and SD.Next's errors).
    """
    servers: list[ThreadingHTTPServer] = []

    def serve(answers: dict[str, Answer], default: Answer = NOT_FOUND) -> tuple[str, Counter]:
        counts: Counter = Counter()

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                path = self.path.split("?")[0]
                counts[path] += 1
                answer = answers.get(path, default)
                if isinstance(answer, list):
                    answer = answer[min(counts[path], len(answer)) - 1]
                status, body, kind, *more = answer
                reason, headers = (more[0] if more else None), (more[1] if len(more) > 1 else {})
                payload = body if isinstance(body, bytes) else body.encode() if isinstance(body, str) else json.dumps(body).encode()
                self.send_response_only(status, reason)
                if kind is not None:
                    self.send_header("Content-Type", kind)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = _answer

            def log_message(self, *args: object) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}", counts

    yield serve
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture
def canned_server(routes) -> Callable[[int, object], str]:
    """`routes` answering every request with one JSON reply (``body`` as given when bytes).
    Returns ``serve(status, body) -> url``."""

    def serve(status: int, body: object) -> str:
        payload = body if isinstance(body, bytes) else json.dumps(body).encode()
        return routes({}, (status, payload, "application/json"))[0]

    return serve


@pytest.fixture
def closed_port_url() -> str:
    """A URL on 127.0.0.1 where nothing listens."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A PostgreSQL server for the session: `$SDJOBS_TEST_POSTGRES`, else a throwaway one on 127.0.0.1.

    Skipped when neither is to be had, but not in CI (`.ci/run` sets `$SDJOBS_REQUIRE_POSTGRES`),
    where the PostgreSQL tests must run: `./dev test` installs the server.
    """
    import os

    from sdjobs.postgres_server import TEST_SERVER_ENV, ThrowawayPostgres, server_binaries

    if os.environ.get(TEST_SERVER_ENV):
        yield os.environ[TEST_SERVER_ENV]
        return
    binaries = server_binaries()
    if binaries is None:
        reason = f"no PostgreSQL server binaries (initdb) on PATH or in /usr/lib/postgresql, and no ${TEST_SERVER_ENV}"
        if os.environ.get("SDJOBS_REQUIRE_POSTGRES"):
            pytest.fail(reason + " (CI must run the PostgreSQL tests)")
        pytest.skip(reason)
    server = ThrowawayPostgres(binaries)
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.fixture
def postgres_queue(postgres_url: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh, migrated PostgreSQL queue of the test's own (a schema on the session's server),
    also in `$SDJOBS_QUEUE` for the commands the test starts."""
    from sdjobs.postgres_server import fresh_url
    from sdjobs.postgres_store import migrate

    url = fresh_url(postgres_url)
    migrate(url)
    monkeypatch.setenv("SDJOBS_QUEUE", url)
    return url


@pytest.fixture(params=["sqlite", "postgres"])
def queue(request: pytest.FixtureRequest, queue_file: Path) -> str:
    """The test's queue on each backend in turn: its location, also in `$SDJOBS_QUEUE`."""
    return str(queue_file) if request.param == "sqlite" else request.getfixturevalue("postgres_queue")
