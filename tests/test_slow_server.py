"""A server slow to say whether it follows task ids holds up neither a job nor its cancel.

A real proxy on 127.0.0.1 stands between sdjobs and the simulated WebUI: it
passes every request on at once, and holds the answers of `/internal/*` (the
task-id detection) for ten seconds.
"""

from __future__ import annotations

import http.server
import threading
import time
from collections.abc import Iterator

import pytest
import requests
from runner_helpers import ALL_STAGES, GENERATION_PATHS, PROGRESS_PATHS, Background, in_stage, job_spec, make_runner

from sdjobs.client import WebUIClient
from sdjobs.sim import SimSettings
from sdjobs.status import CancelMode, JobState

HELD_FOR = 10.0


class SlowInternalProxy(http.server.ThreadingHTTPServer):
    """Forwards to ``upstream``; answers `/internal/*` only after `HELD_FOR` seconds, or at `close`."""

    daemon_threads = True

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.released = threading.Event()
        self.held_answers_sent = 0
        super().__init__(("127.0.0.1", 0), _Forward)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def close(self) -> None:
        self.released.set()
        self.shutdown()
        self.server_close()


class _Forward(http.server.BaseHTTPRequestHandler):
    server: SlowInternalProxy

    def _forward(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        answer = requests.request(
            self.command, self.server.upstream + self.path, data=body, headers={"Content-Type": "application/json"}
        )
        if self.path.startswith("/internal/"):
            if not self.server.released.wait(HELD_FOR):
                self.server.held_answers_sent += 1
        self.send_response(answer.status_code)
        self.send_header("Content-Type", answer.headers.get("Content-Type", "application/json"))
        self.send_header("Content-Length", str(len(answer.content)))
        self.end_headers()
        self.wfile.write(answer.content)

    do_GET = do_POST = _forward

    def log_message(self, format: str, *args: object) -> None:
        """Quiet."""


@pytest.fixture
def slow_proxy(webui_sim) -> Iterator[SlowInternalProxy]:
    proxy = SlowInternalProxy(webui_sim.url)
    serving = threading.Thread(target=proxy.serve_forever, daemon=True)
    serving.start()
    yield proxy
    proxy.close()
    serving.join(timeout=5)


@pytest.mark.parametrize("sim_settings", [SimSettings(step_time=0.02, first_step_time=0.02)])
def test_a_ctrl_c_in_stage_two_ends_the_job_at_once_with_one_interrupt(webui_sim, slow_proxy, tmp_path):
    with WebUIClient(slow_proxy.url) as client:
        runner, log = make_runner(client, [job_spec(ALL_STAGES, steps=30)], tmp_path)
        running = Background(runner.run)
        assert log.wait_for("progress", in_stage(1), timeout=10)
        cancelled_at = time.monotonic()
        runner.cancel(CancelMode.NOW, rest=True)  # what Ctrl-C does
        running.join(timeout=5)
    assert runner.outcomes == {log.one("job_queued")["job_id"]: JobState.CANCELLED}
    assert log.time_of("job_finished") - cancelled_at < 3.0
    assert [path for _, _, path in webui_sim.requests].count("/sdapi/v1/interrupt") == 1
    ended = log.time_of("job_finished")
    assert webui_sim_requests_after(webui_sim, ended) == []
    # The job never waited for the detection: no held answer came back before it ended.
    assert slow_proxy.held_answers_sent == 0


def webui_sim_requests_after(sim, moment: float) -> list[str]:
    paths = (*GENERATION_PATHS, *PROGRESS_PATHS, "/sdapi/v1/interrupt")
    return [path for when, _, path in sim.requests if when > moment and path in paths]


@pytest.mark.parametrize("sim_settings", [SimSettings(step_time=0.002, first_step_time=0.002)])
def test_a_job_runs_to_the_end_without_waiting_for_the_detection(webui_sim, slow_proxy, tmp_path):
    with WebUIClient(slow_proxy.url) as client:
        runner, log = make_runner(client, [job_spec(ALL_STAGES)], tmp_path)
        Background(runner.run).join(timeout=HELD_FOR / 2)
    assert list(runner.outcomes.values()) == [JobState.DONE]
    assert slow_proxy.held_answers_sent == 0
