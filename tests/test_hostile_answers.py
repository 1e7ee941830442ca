"""Nothing a server says about progress can fail a job or kill a thread.

Every field of `/sdapi/v1/progress` and `/internal/progress` is read
defensively: a huge integer, an infinity, NaN, a wrong type, a negative count or
a body nested deeper than Python can decode counts as missing.  The end-to-end
tests put a real proxy on 127.0.0.1 between the real client and the simulated
WebUI that turns every other progress answer into such a body.  A thread that
died of one would be an error here (pytest's unhandled-thread-exception warning
is an error in this suite).
"""

from __future__ import annotations

import http.server
import logging
import threading
from collections.abc import Iterator

import pytest
import requests
from runner_helpers import Background, assert_monotonic, job_spec, make_runner

from sdjobs.client import WebUIClient
from sdjobs.plugins.progress_poller import ThreadPoller
from sdjobs.polling import PollRequest
from sdjobs.sim import SimSettings
from sdjobs.status import MAX_COUNT, JobState, ProgressInfo, TaskProgress

HUGE = b"1" + b"0" * 400  # 10**400: an int, but no float
DEEP = b"[" * 100_000 + b"]" * 100_000  # json's decoder raises RecursionError

#: Per case, a body for `/sdapi/v1/progress` and one for `/internal/progress`.
HOSTILE = {
    "huge": (
        b'{"progress": 0.5, "eta_relative": %s, "state": {"sampling_step": %s, "sampling_steps": 20, "job_no": 0, "job_count": 1}}'
        % (HUGE, HUGE),
        b'{"active": true, "queued": false, "completed": false, "progress": %s, "eta": %s, "id_live_preview": %s, "textinfo": "In queue: %s/2"}'
        % (HUGE, HUGE, HUGE, HUGE),
    ),
    "infinite": (
        b'{"progress": 0.5, "eta_relative": -1e999, "state": {"sampling_step": NaN, "sampling_steps": Infinity, "job_no": 1e999, "job_count": 1}}',
        b'{"active": true, "queued": false, "completed": false, "progress": NaN, "eta": 1e999, "id_live_preview": -Infinity}',
    ),
    "wrong-types": (
        b'{"progress": 0.5, "current_image": 7, "state": {"sampling_step": "3", "sampling_steps": [20], "job_no": true, "job_count": {"n": 1}, "job_timestamp": []}}',
        b'{"active": "yes", "queued": 0, "completed": null}',
    ),
    "negative": (
        b'{"progress": -0.5, "state": {"sampling_step": -3, "sampling_steps": -20, "job_no": -1, "job_count": -7}}',
        b'{"active": true, "queued": false, "completed": false, "progress": -1, "id_live_preview": -9}',
    ),
    "deep": (DEEP, DEEP),
    "deep-field": (
        b'{"progress": 0.5, "state": {"job_count": 1, "job_timestamp": %s}}' % DEEP,
        b'{"active": true, "queued": false, "completed": false, "textinfo": %s}' % DEEP,
    ),
}


class HostileProxy(http.server.ThreadingHTTPServer):
    """Forwards to ``upstream``; every other progress answer is replaced by ``bodies``' one for its path.

    The task-id detection's probe of `/internal/progress` is always forwarded,
    so the client follows our task and both progress routes are asked.
    """

    daemon_threads = True

    def __init__(self, upstream: str, bodies: tuple[bytes, bytes]) -> None:
        self.upstream = upstream
        self.bodies = dict(zip(("/sdapi/v1/progress", "/internal/progress"), bodies, strict=True))
        self.asked = dict.fromkeys(self.bodies, 0)
        self.hostile_sent = dict.fromkeys(self.bodies, 0)
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _Relay)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def hostile(self, path: str, request: bytes) -> bytes | None:
        """The body to send instead of the upstream's, on every other progress request."""
        if path not in self.bodies or b"sdjobs-probe-" in request:
            return None
        with self.lock:
            self.asked[path] += 1
            if self.asked[path] % 2:
                return None
            self.hostile_sent[path] += 1
        return self.bodies[path]


class _Relay(http.server.BaseHTTPRequestHandler):
    server: HostileProxy

    def _relay(self) -> None:
        request = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        headers = {"Content-Type": "application/json"}
        upstream = requests.request(self.command, self.server.upstream + self.path, data=request, headers=headers)
        body = self.server.hostile(self.path.partition("?")[0], request)
        if body is None:
            body = upstream.content
        self.send_response(upstream.status_code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _relay

    def log_message(self, format: str, *args: object) -> None:
        """Quiet."""


@pytest.fixture
def hostile_proxy(webui_sim, request) -> Iterator[HostileProxy]:
    proxy = HostileProxy(webui_sim.url, HOSTILE[request.param])
    serving = threading.Thread(target=proxy.serve_forever, daemon=True)
    serving.start()
    yield proxy
    proxy.shutdown()
    proxy.server_close()
    serving.join(timeout=5)


@pytest.mark.parametrize("sim_settings", [SimSettings(step_time=0.005, first_step_time=0.005)])
@pytest.mark.parametrize("hostile_proxy", list(HOSTILE), indirect=True)
def test_hostile_progress_answers_change_nothing_and_the_job_ends_done(webui_sim, hostile_proxy, tmp_path, caplog):
    with WebUIClient(hostile_proxy.url) as client:
        runner, log = make_runner(client, [job_spec(steps=20)], tmp_path)
        Background(runner.run).join(timeout=30)
    assert list(runner.outcomes.values()) == [JobState.DONE]
    assert all(hostile_proxy.hostile_sent.values()), hostile_proxy.hostile_sent
    assert_monotonic(log.statuses())
    assert all(0 <= status.progress <= 1 and (status.step or 0) <= MAX_COUNT for status in log.statuses())
    # The poller never saw an exception: the client turned every such answer into a missing sample.
    assert not [record for record in caplog.records if record.levelno >= logging.WARNING]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("sampling_step", 10**400),
        ("sampling_step", float("nan")),
        ("sampling_step", -3),
        ("sampling_step", "3"),
        ("sampling_step", True),
        ("sampling_step", 2.5),
        ("sampling_steps", float("inf")),
        ("sampling_steps", [20]),
    ],
)
def test_an_unusable_step_field_is_missing(field, value):
    info = ProgressInfo.from_response({"progress": 0.5, "state": {field: value, "job_count": 1}})
    assert (info.current_step, info.total_steps) == (None, None)
    assert info.job_count == 1


@pytest.mark.parametrize("value", [10**400, float("inf"), float("nan"), -2, "1", None, {"a": 1}])
def test_an_unusable_job_no_or_job_count_reads_as_missing(value):
    info = ProgressInfo.from_response({"progress": 0.5, "state": {"job_no": value, "job_count": value}})
    assert (info.job_no, info.job_count) == (0, 0)


def test_a_job_count_of_minus_one_is_kept():
    assert ProgressInfo.from_response({"progress": 0.01, "state": {"job_count": -1}}).job_count == -1


@pytest.mark.parametrize(
    "body",
    [[], "x", {"progress": float("nan")}, {"progress": 10**400}, {"progress": -0.1}, {"progress": "0.5"}, {"progress": 0.5, "state": [1]}],
)
def test_a_body_that_cannot_be_a_progress_sample_is_a_value_error(body):
    with pytest.raises(ValueError):
        ProgressInfo.from_response(body)


def test_unusable_optional_fields_of_a_sample_are_none_and_nested_state_entries_are_dropped():
    info = ProgressInfo.from_response(
        {
            "progress": 0.5,
            "eta_relative": float("inf"),
            "current_image": ["x"],
            "textinfo": 3,
            "state": {"job_timestamp": {"t": 1}, "interrupted": True, "deep": [[1]], "big": 10**400},
        }
    )
    assert (info.eta_relative, info.current_image, info.textinfo, info.job_timestamp) == (0.0, None, None, None)
    assert info.state == {"interrupted": True}
    assert info.interrupted


def test_unusable_fields_of_a_task_answer_are_missing():
    task = TaskProgress.from_response(
        {
            "active": False,
            "queued": True,
            "completed": False,
            "progress": float("nan"),
            "eta": float("-inf"),
            "id_live_preview": 10**400,
            "live_preview": 5,
            "textinfo": "In queue: " + "9" * 5000 + "/2",
        }
    )
    assert (task.progress, task.eta, task.id_live_preview, task.live_preview, task.queue_position) == (None, None, -1, None, None)
    assert TaskProgress.from_response({"active": False, "queued": True, "completed": False, "textinfo": "In queue: 2/3"}).queue_position == (2, 3)
    assert TaskProgress.from_response({"active": True, "queued": False, "completed": False, "id_live_preview": 0}).id_live_preview == 0


@pytest.mark.parametrize("body", [[], {"active": 1, "queued": False, "completed": False}, {"queued": False}])
def test_a_task_answer_without_its_three_booleans_is_a_value_error(body):
    with pytest.raises(ValueError):
        TaskProgress.from_response(body)


@pytest.mark.parametrize("case", list(HOSTILE))
def test_the_progress_calls_never_raise(canned_server, case):
    progress_body, task_body = HOSTILE[case]
    with WebUIClient(canned_server(200, progress_body)) as client:
        info = client.get_progress()
    with WebUIClient(canned_server(200, task_body)) as client:
        task = client.internal_progress("sdjobs-x")
    for sample in (info, task):
        assert sample is None or isinstance(sample, ProgressInfo | TaskProgress)


# -- the poller outlives what it calls --------------------------------------------------


class FailingReport:
    """A poller's `report` that raises the first ``failures`` times, then counts calls until told enough."""

    def __init__(self, failures: int, wanted: int) -> None:
        self.failures = failures
        self.wanted = wanted
        self.calls = 0
        self.enough = threading.Event()

    def __call__(self, info: ProgressInfo | None, task: TaskProgress | None) -> None:
        self.calls += 1
        if self.calls <= self.failures:
            raise RuntimeError(f"report failed ({self.calls})")
        if self.calls >= self.failures + self.wanted:
            self.enough.set()


def test_a_poller_whose_report_raises_logs_once_and_keeps_sampling(webui_sim, caplog):
    report = FailingReport(failures=3, wanted=3)
    caplog.set_level(logging.DEBUG, logger="sdjobs.plugins.progress_poller")
    with WebUIClient(webui_sim.url) as client:
        poller = ThreadPoller(PollRequest(client=client, interval=0.01, report=report)).start()
        try:
            assert report.enough.wait(5.0), f"sampling stopped after {report.calls} calls"
        finally:
            poller.stop()
    logged = [record for record in caplog.records if record.name == "sdjobs.plugins.progress_poller"]
    warnings = [record for record in logged if record.levelno == logging.WARNING]
    assert len(warnings) == 1 and "report failed (1)" in str(warnings[0].exc_info[1])
    assert len([record for record in logged if record.levelno == logging.DEBUG]) == 2
