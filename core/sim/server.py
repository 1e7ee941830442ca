"""The simulated WebUI as a real HTTP server on a thread of its own."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from .catalog import Catalog
from .engine import ConnectionDropped, Engine
from .fifo import FifoLock
from .routes import Api, Request
from .settings import SimSettings
from .state import SharedState, SimulatorClosed, StateSnapshot

_POLL_INTERVAL = 0.05  # how quickly serve_forever notices shutdown()


class _HttpServer(ThreadingHTTPServer):
    """One daemon thread per connection, all joined by `server_close()`.

    (The stdlib joins only non-daemon request threads; daemon ones cannot keep the
    interpreter alive when a test forgets to stop its simulator.)  Connections are
    kept open between requests, as A1111's uvicorn keeps them; `server_close()`
    shuts the open ones, so that a thread waiting for a connection's next request ends.
    """

    api: Api
    record: Callable[[str, str], None]

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler]) -> None:
        self._request_threads: list[threading.Thread] = []  # before binding: a failed bind closes
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        self.hang = HangSwitch()
        super().__init__(address, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._connections_lock:
            self._connections.add(request)
        thread = threading.Thread(
            target=self.process_request_thread,
            args=(request, client_address),
            name="sdjobs-sim-request",
            daemon=True,
        )
        self._request_threads = [t for t in self._request_threads if t.is_alive()]
        self._request_threads.append(thread)
        thread.start()

    def shutdown_request(self, request: Any) -> None:
        with self._connections_lock:
            self._connections.discard(request)
        super().shutdown_request(request)

    def server_close(self) -> None:
        super().server_close()
        with self._connections_lock:
            open_connections = list(self._connections)
        for connection in open_connections:
            with contextlib.suppress(OSError):  # closed meanwhile
                connection.shutdown(socket.SHUT_RDWR)
        for thread in self._request_threads:
            thread.join()


class HangSwitch:
    """While on, no request is answered (a hung WebUI); `close()` lets every waiter go."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._on = False
        self._closing = False

    def set(self, on: bool) -> None:
        with self._cond:
            self._on = on
            self._cond.notify_all()

    def wait_off(self) -> None:
        """Return once the switch is off; `SimulatorClosed` if the server stops first."""
        with self._cond:
            self._cond.wait_for(lambda: not self._on or self._closing)
            if self._closing:
                raise SimulatorClosed

    def close(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify_all()


class _Handler(BaseHTTPRequestHandler):
    """Reads a request, lets `Api` answer it, writes JSON with A1111's headers."""

    server: _HttpServer
    protocol_version = "HTTP/1.1"  # connections kept open between requests, as by uvicorn
    timeout = 5  # seconds a connection waits for its next request (uvicorn's keep-alive), or a request for its body
    disable_nagle_algorithm = True  # the body goes at once after the headers, not after the client's delayed ACK

    def do_GET(self) -> None:
        self._serve("GET")

    def do_POST(self) -> None:
        self._serve("POST")

    def do_PUT(self) -> None:
        self._serve("PUT")

    def do_DELETE(self) -> None:
        self._serve("DELETE")

    def _serve(self, method: str) -> None:
        started = time.time()
        url = urlsplit(self.path)
        self.server.record(method, url.path)
        length = int(self.headers.get("Content-Length") or 0)
        request = Request(
            method=method,
            path=url.path,
            query=dict(parse_qsl(url.query)),
            headers=self.headers,  # type: ignore[arg-type]  # case-insensitive get()
            body=self.rfile.read(length) if length else b"",
        )
        try:
            self.server.hang.wait_off()
            response = self.server.api.handle(request)
            self.server.hang.wait_off()  # a request in flight when the server hung stays unanswered
        except (ConnectionDropped, SimulatorClosed):
            self.close_connection = True  # closed with no answer at all
            return
        payload = json.dumps(response.body, ensure_ascii=False, separators=(",", ":")).encode()
        try:
            self.send_response(response.status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.send_header("X-Process-Time", str(round(time.time() - started, 4)))
            self.end_headers()
            self.wfile.write(payload)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up waiting

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        """Quiet: the simulator is a test fixture, not a log producer."""


class SimulatedWebUI:
    """A simulated A1111 WebUI serving on `url` while the `with` block runs.

    Example::

        with SimulatedWebUI(SimSettings(stepping=True)) as sim:
            ...  # POST to sim.url in a thread
            sim.release(3)  # three steps: sampling_step reads 2
            sim.wait_for(lambda s: s.awaiting_release and s.sampling_step == 2)

    Attributes:
        settings: How it behaves.
        requests: `(monotonic time, method, path)` of every request received, in order
            (the path without its query string).
    """

    def __init__(self, settings: SimSettings | None = None, host: str = "127.0.0.1", port: int = 0) -> None:
        self.settings = settings or SimSettings()
        self.requests: list[tuple[float, str, str]] = []
        self._address = (host, port)
        self._state = SharedState(stepping=self.settings.stepping)
        self._queue = FifoLock()
        self._server: _HttpServer | None = None
        self._thread: threading.Thread | None = None

    def __repr__(self) -> str:
        where = self.url if self._server is not None else "not started"
        return f"SimulatedWebUI({where}, {self.settings!r})"

    # -- life cycle ------------------------------------------------------------

    def start(self) -> SimulatedWebUI:
        """Bind and serve on a thread; `port=0` picks a free port."""
        server = _HttpServer(self._address, _Handler)
        server.hang.set(self.settings.hang)
        catalog = Catalog.load(self.settings.version).chosen(self.settings.catalog)
        engine = Engine(self.settings, self._state, catalog, self._queue)
        server.api = Api(self.settings, catalog, self._state, engine, server.server_address[1])
        server.record = lambda method, path: self.requests.append((time.monotonic(), method, path))
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, args=(_POLL_INTERVAL,), name="sdjobs-sim", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving: blocked requests are let go unanswered, every thread is joined."""
        if self._server is None:
            return
        self._server.hang.close()
        self._state.close()
        self._queue.close()
        self._server.shutdown()
        self._server.server_close()
        assert self._thread is not None
        self._thread.join()
        self._server = None

    def __enter__(self) -> SimulatedWebUI:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("the simulated WebUI is not running")
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    # -- what tests drive and observe ------------------------------------------

    def release(self, n: int = 1) -> None:
        """Stepping mode: let `n` more sampling steps happen.

        As in A1111, a step's callback reports the 0-based index of the step just done:
        from the start of a pass, `release(k)` shows `sampling_step == k - 1`, and an
        N-step pass takes N releases (its decode takes no time in stepping mode).
        Interrupt and skip finish a waiting step at once; it shows, then the pass ends.
        """
        self._state.release(n)

    def hang(self, on: bool = True) -> None:
        """Hang (or recover): while hung, connections are accepted and nothing is answered."""
        if self._server is None:
            raise RuntimeError("the simulated WebUI is not running")
        self._server.hang.set(on)

    def wait_for(self, predicate: Callable[[StateSnapshot], bool], timeout: float = 5.0) -> bool:
        """Wait until `predicate(snapshot)` holds; False if `timeout` seconds pass first."""
        return self._state.wait_for(predicate, timeout)

    def snapshot(self) -> StateSnapshot:
        """The state now (a frozen copy)."""
        return self._state.snapshot()

    @property
    def state_changes(self) -> list[tuple[float, StateSnapshot]]:
        """`(monotonic time, snapshot)` for every change a client could see, in order."""
        return self._state.changes
