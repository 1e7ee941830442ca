"""Faults of the WebUI, made real: a hung server, a server killed and restarted on its port, a
server down when the job starts, a gateway answering 502, flapping progress (docs/reliability.md)."""

from __future__ import annotations

import contextlib
import http.client
import logging
import signal
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import attrs
import pytest
from process_helpers import Lines, start
from runner_helpers import (
    DROPPED_IN_STAGE_TWO,
    FAST,
    Background,
    HookLog,
    Said,
    assert_monotonic,
    job_spec,
    make_runner,
)

from sdjobs.client import Timeouts, WebUIClient
from sdjobs.runner import Runner
from sdjobs.sim import SimSettings
from sdjobs.status import CancelMode, JobState

#: Stalls and waits short enough for a test; a progress call times out after 0.5 s.
QUICK = attrs.evolve(FAST, poll_interval=0.1, stall_after=0.5, stall_interrupt_after=1.0, cancel_grace=1.0)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def sim_process(port: int, *extra: str):
    """`sdjobs sim` on ``port`` in a process of its own, once it listens."""
    sim = start("sim", "--port", str(port), "--step-time", "0.02", "--first-step-time", "0.02", *extra)
    line = sim.stdout.readline()
    assert line.startswith("Simulated WebUI at "), line
    return sim


def stop(sim) -> None:
    if sim.poll() is None:
        sim.send_signal(signal.SIGINT)
    sim.wait(timeout=10)


# -- hung ------------------------------------------------------------------------------------


@contextlib.contextmanager
def hung_in_a_long_job(webui_sim, tmp_path, settings) -> Iterator[tuple[Runner, HookLog, Background]]:
    """A long job running in the background with short read timeouts; the WebUI hangs once it shows a step."""
    with WebUIClient(webui_sim.url, timeouts=Timeouts(read=0.5)) as client:
        runner, log = make_runner(client, [job_spec(steps=400)], tmp_path, settings=settings)
        running = Background(runner.run)
        try:
            assert log.wait_for("progress", lambda kwargs: kwargs["status"].step)
            webui_sim.hang()
            yield runner, log, running
        finally:
            webui_sim.hang(False)


@pytest.mark.parametrize("sim_settings", [SimSettings(step_time=0.05)])
def test_a_hung_webui_fails_the_job_saying_it_stopped_answering(webui_sim, tmp_path):
    with hung_in_a_long_job(webui_sim, tmp_path, QUICK) as (runner, log, running):
        running.join(timeout=20)
    [outcome] = runner.outcomes.values()
    error = log.one("job_finished")["error"]
    assert outcome is JobState.FAILED and "the WebUI stopped answering (no progress for " in error
    assert error.endswith("s, interrupt unanswered)")
    assert log.find("job_stalled") is not None


@pytest.mark.parametrize("sim_settings", [SimSettings(step_time=0.05)])
def test_a_cancel_on_a_hung_webui_ends_the_run_at_once(webui_sim, tmp_path, caplog):
    settings = attrs.evolve(QUICK, stall_interrupt_after=None, cancel_grace=30.0)
    timed_out = Said("progress sample failed")
    caplog.set_level(logging.DEBUG, logger="sdjobs.client")
    logging.getLogger("sdjobs.client").addHandler(timed_out)
    try:
        with hung_in_a_long_job(webui_sim, tmp_path, settings) as (runner, log, running):
            assert timed_out.seen.wait(10)  # a sample timed out: the job knows the server is silent
            timed_out.seen.clear()
            assert timed_out.seen.wait(10)  # and the next: the first one's report is on its way
            runner.cancel(CancelMode.NOW)
            running.join(timeout=2)  # not the 30 s of grace for an interrupt nobody will answer
    finally:
        logging.getLogger("sdjobs.client").removeHandler(timed_out)
    assert list(runner.outcomes.values()) == [JobState.CANCELLED]


@pytest.mark.parametrize("sim_settings", [SimSettings(step_time=0.05)])
def test_a_cancel_in_the_first_moment_of_a_freeze_ends_the_run_within_2_s(webui_sim, tmp_path, caplog):
    settings = attrs.evolve(QUICK, stall_interrupt_after=None, cancel_grace=30.0)
    with hung_in_a_long_job(webui_sim, tmp_path, settings) as (runner, log, running):
        runner.cancel(CancelMode.NOW)  # before any sample timed out: the server is not known to be silent yet
        running.join(timeout=2)  # the interrupt goes unanswered (1 s), not the 30 s of grace
    assert list(runner.outcomes.values()) == [JobState.CANCELLED]
    assert "lighthouse: the WebUI did not answer the interrupt (" in caplog.text


@pytest.mark.parametrize("sim_settings", [SimSettings(step_time=0.05)])
def test_ctrl_c_on_a_frozen_webui_ends_sdjobs_run_without_waiting_for_the_grace(webui_sim, tmp_path):
    job = tmp_path / "frozen.toml"
    job.write_text('name = "frozen"\nprompt = "a lighthouse"\n[settings]\nsteps = 400\nwidth = 64\nheight = 64\n'
                   '[[stages]]\ntype = "txt2img"\n')
    run = start("run", job, "--webui", webui_sim.url, "--frontend", "log", "--out", tmp_path / "out")
    logged = Lines(run.stderr)
    try:
        assert logged.wait_for(" · step "), logged.text(0)
        webui_sim.hang()
        run.send_signal(signal.SIGINT)
        assert run.wait(timeout=10) == 130  # not the 30 s cancel grace (the 2 s bound is timed in process above)
    finally:
        run.kill()
        webui_sim.hang(False)
    assert "frozen: the WebUI did not answer the interrupt (" in logged.text()


@pytest.mark.parametrize("sim_settings", [SimSettings(step_time=0.05)])
def test_an_unanswered_stall_interrupt_fails_the_job_without_waiting_for_the_grace(webui_sim, tmp_path):
    with hung_in_a_long_job(webui_sim, tmp_path, attrs.evolve(QUICK, cancel_grace=30.0)) as (runner, log, running):
        running.join(timeout=10)  # stall_interrupt_after (1 s) and the unanswered interrupt (1 s), not 30 s
    assert list(runner.outcomes.values()) == [JobState.FAILED]
    assert log.one("job_finished")["error"].endswith("s, interrupt unanswered)")


# -- down --------------------------------------------------------------------------------------


def test_a_webui_killed_mid_stage_and_restarted_on_its_port_finishes_the_job(tmp_path):
    port = free_port()
    spec = DROPPED_IN_STAGE_TWO  # txt2img 4 steps, img2img 11: the process dies in stage 2
    sim = sim_process(port, "--stop-after-steps", "8")
    try:
        with WebUIClient(f"http://127.0.0.1:{port}", retries=0) as client:
            runner, log = make_runner(client, [spec], tmp_path)
            running = Background(runner.run)
            assert sim.wait(timeout=30) != 0  # it crashed, as told
            assert log.wait_for("webui_unreachable", timeout=10)
            sim = sim_process(port)
            running.join(timeout=60)
    finally:
        stop(sim)
    assert list(runner.outcomes.values()) == [JobState.DONE]
    stages = [kwargs["result"] for name, kwargs in log.calls if name == "stage_finished"]
    assert [(r.stage, r.partial, len(r.images)) for r in stages] == [("txt2img", False, 1), ("img2img", False, 1)]
    assert log.names().count("stage_started") == 2
    assert_monotonic(log.statuses())


def test_a_webui_down_when_the_job_starts_is_waited_for(tmp_path):
    port = free_port()
    with WebUIClient(f"http://127.0.0.1:{port}", retries=0) as client:
        runner, log = make_runner(client, [job_spec()], tmp_path)
        running = Background(runner.run)
        assert log.wait_for("webui_unreachable", timeout=10)
        sim = sim_process(port)
        try:
            running.join(timeout=60)
        finally:
            stop(sim)
    assert list(runner.outcomes.values()) == [JobState.DONE]
    assert log.names().count("job_started") == 1


@pytest.mark.parametrize("sim_settings", [SimSettings(hang=True)])
def test_a_webui_hung_when_the_job_starts_is_waited_for_as_one_that_is_down(webui_sim, tmp_path):
    with WebUIClient(webui_sim.url, timeouts=Timeouts(read=0.5), retries=0) as client:
        runner, log = make_runner(client, [job_spec()], tmp_path)
        running = Background(runner.run)
        try:
            assert log.wait_for("webui_unreachable", timeout=10)  # not failed at the checks
        finally:
            webui_sim.hang(False)
        running.join(timeout=30)
    assert list(runner.outcomes.values()) == [JobState.DONE]
    told = [kwargs["error"] for name, kwargs in log.calls if name == "webui_unreachable"]
    assert "timed out after 0.5 s" in told[0]
    assert log.names().count("job_started") == 1


class Gateway:
    """A reverse proxy to ``upstream`` that answers 502 to the first ``failing`` generation POSTs."""

    def __init__(self, upstream: str, failing: int) -> None:
        self.failing, self.posts = failing, []
        host, port = upstream.removeprefix("http://").split(":")
        gateway = self

        class Handler(BaseHTTPRequestHandler):
            def _forward(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.command == "POST" and self.path.startswith(("/sdapi/v1/txt2img", "/sdapi/v1/img2img")):
                    gateway.posts.append(self.path)
                    if len(gateway.posts) <= gateway.failing:
                        self.send_response(502)
                        self.send_header("Content-Type", "text/html")
                        self.end_headers()
                        self.wfile.write(b"<html><body>502 Bad Gateway</body></html>")
                        return
                upstream = http.client.HTTPConnection(host, int(port), timeout=30)
                upstream.request(self.command, self.path, body or None, dict(self.headers))
                answer = upstream.getresponse()
                data = answer.read()
                self.send_response(answer.status)
                self.send_header("Content-Type", answer.getheader("Content-Type", "application/json"))
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                upstream.close()

            do_GET = do_POST = _forward

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(5)


@pytest.mark.parametrize("sim_settings", [SimSettings(step_time=0.01)])
def test_a_gateway_answering_502_to_the_request_is_waited_out_and_the_request_sent_again(
    webui_sim, tmp_path
):
    gateway = Gateway(webui_sim.url, failing=2)
    try:
        with WebUIClient(gateway.url, retries=0) as client:
            runner, log = make_runner(client, [job_spec()], tmp_path)
            runner.run()
    finally:
        gateway.close()
    assert list(runner.outcomes.values()) == [JobState.DONE]
    assert gateway.posts == ["/sdapi/v1/txt2img"] * 3
    told = [kwargs for name, kwargs in log.calls if name == "webui_unreachable"]
    # Each 502: told when the wait starts, and at the ping (the next one scheduled before it answers).
    assert [kwargs["retry_in"] for kwargs in told] == [1.0, 2.0, 1.0, 2.0]
    assert all(kwargs["error"].startswith(f"{gateway.url}/sdapi/v1/txt2img failed (502)") for kwargs in told)
    waited = [kwargs["waited"] for kwargs in told]
    assert waited == sorted(waited)  # counted from the first 502: no request answered in between


# -- useless answers ---------------------------------------------------------------------------


@pytest.mark.parametrize("sim_settings", [SimSettings(step_time=0.02, progress_error_rate=0.5)])
def test_flapping_progress_neither_stalls_nor_shortens_the_job(webui_sim, webui_client, tmp_path):
    runner, log = make_runner(webui_client, [job_spec(steps=30)], tmp_path, settings=attrs.evolve(QUICK, stall_after=5.0))
    runner.run()
    assert list(runner.outcomes.values()) == [JobState.DONE]
    assert log.find("job_stalled") is None and log.find("progress") is not None
    assert_monotonic(log.statuses())
