"""Replays of the recorded A1111 traces against the simulator, compared as a client sees them.

Each blocking request of a trace is sent to a fresh stepping-mode simulator whose
steps are all released in advance, so every state it passes through is recorded in
`state_changes`.  A trace polled every 0.1 s and saw only some of those states, so
its distinct states must be a subsequence of the simulator's.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import requests

from sdjobs.sim import SimSettings, SimulatedWebUI, StateSnapshot
from sdjobs.sim.state import sdapi_progress

from .conftest import JOIN_TIMEOUT, decode_png, png_base64

TRACE_DIR = Path(__file__).parent.parent / "data" / "traces"
UNLIMITED_STEPS = 1_000_000
# The recorded detector "found" 2 faces in trace 16 and none at the default confidence in 21.
FACES = {"16_": 2, "21_": 0}
# Values that are random or wall-clock on every run.
UNREPEATABLE_INFO = {"subseed", "all_subseeds", "job_timestamp"}

StateKey = tuple[int, int, int | None, int]


def _lines(trace: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in trace.read_text().splitlines()]


def _blocking(trace: Path) -> list[dict[str, Any]]:
    return [line for line in _lines(trace) if "elapsed" in line and "auth" not in line]


GENERATION_TRACES = sorted((t for t in TRACE_DIR.glob("*.jsonl") if _blocking(t)), key=lambda t: t.name)


def _settings(trace: Path) -> SimSettings:
    faces = next((n for prefix, n in FACES.items() if trace.name.startswith(prefix)), 1)
    return SimSettings(stepping=True, faces=faces, ui="nowebui" not in trace.name)


def _key(state: dict[str, Any] | StateSnapshot) -> StateKey:
    """What a state shows a client; `sampling_steps` only counts once a step was made."""
    s = state if isinstance(state, dict) else state.as_dict()
    steps = s["sampling_steps"] if s["sampling_step"] else None
    return (s["job_count"], s["job_no"], steps, s["sampling_step"])


def _collapse(keys: list[StateKey]) -> list[StateKey]:
    return [key for i, key in enumerate(keys) if i == 0 or keys[i - 1] != key]


def _is_subsequence(part: list[StateKey], whole: list[StateKey]) -> bool:
    remaining = iter(whole)
    return all(key in remaining for key in part)


def _request_body(trace_lines: list[dict[str, Any]], line: dict[str, Any]) -> bytes:
    """The recorded body, with its images (recorded only as lengths) replaced by real PNGs."""
    if "request" not in line:
        note = next(n for n in trace_lines if n.get("endpoint") == "(note)")
        return note["body"]["raw_request_body"].encode()
    body = dict(line["request"])
    if isinstance(body.get("init_images"), dict):
        body["init_images"] = [png_base64()] * body["init_images"]["count"]
    if isinstance(body.get("image"), dict):
        body["image"] = png_base64()
    return json.dumps(body).encode()


@attrs.frozen
class Replayed:
    """One recorded request and what the simulator made of it."""

    recorded: dict[str, Any]
    response: requests.Response
    states: list[StateSnapshot]  # every state the simulator went through, then the idle one

    def recorded_polls(self, trace_lines: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """`/sdapi/v1/progress` answers of the recorded request's own job, and the one after."""
        start, end = self.recorded["t"], self.recorded["t_end"]
        info = self.recorded["body"].get("info") if isinstance(self.recorded["body"], dict) else None
        polls = [
            line
            for line in trace_lines
            if line.get("endpoint", "").startswith("GET /sdapi/v1/progress")
            and line.get("t") is not None
            and line["t"] >= start
        ]
        if isinstance(info, dict):
            return [p for p in polls if p["body"]["state"]["job_timestamp"] == info["job_timestamp"]]
        during = [p for p in polls if p["t"] <= end]
        after = [p for p in polls if p["t"] > end][:1]
        return during + after


def _replay(trace: Path) -> Iterator[Replayed]:
    trace_lines = _lines(trace)
    for line in _blocking(trace):
        method, path = line["endpoint"].split()[:2]
        with SimulatedWebUI(_settings(trace)) as sim:
            sim.release(UNLIMITED_STEPS)
            response = requests.request(
                method,
                sim.url + path,
                data=_request_body(trace_lines, line),
                headers={"Content-Type": "application/json"},
                timeout=JOIN_TIMEOUT,
            )
            states = [state for _, state in sim.state_changes]
        yield Replayed(line, response, states)


def _trace_id(trace: Path) -> str:
    return trace.stem


@pytest.mark.parametrize("trace", GENERATION_TRACES, ids=_trace_id)
def test_status_and_body(trace: Path) -> None:
    for replayed in _replay(trace):
        recorded = replayed.recorded["body"]
        assert replayed.response.status_code == replayed.recorded["status"]
        body = replayed.response.json()
        assert set(body) == set(recorded)
        if replayed.recorded["status"] != 200:
            assert body == recorded
        elif "info" in recorded:
            assert body["parameters"] == recorded["parameters"]
            info = json.loads(body["info"])
            assert set(info) == set(recorded["info"])
            for key in set(info) - UNREPEATABLE_INFO:
                assert info[key] == recorded["info"][key], key
        else:
            assert body["html_info"] == recorded["html_info"]


@pytest.mark.parametrize("trace", GENERATION_TRACES, ids=_trace_id)
def test_states_and_progress(trace: Path) -> None:
    trace_lines = _lines(trace)
    for replayed in _replay(trace):
        polls = replayed.recorded_polls(trace_lines)
        if not polls:
            pytest.skip("the trace has no /sdapi/v1/progress polls for this request")
        recorded_began = polls[-1]["body"]["state"]["job_timestamp"] != _timestamp_before(trace_lines, replayed)
        if not any(state.job_count == -1 for state in replayed.states):
            assert not recorded_began, "A1111 began a job for this request"
            assert replayed.states == []
            continue
        recorded = _collapse([_key(p["body"]["state"]) for p in polls])
        simulated = _collapse([_key(state) for state in replayed.states])
        assert _is_subsequence(recorded, simulated), (recorded, simulated)
        by_key = {_key(state): state for state in replayed.states}
        for poll in polls:
            state = by_key[_key(poll["body"]["state"])]
            progress, _ = sdapi_progress(state, now=state.time_start or 0.0)
            assert progress == pytest.approx(poll["body"]["progress"], abs=1e-3)


def _timestamp_before(trace_lines: list[dict[str, Any]], replayed: Replayed) -> str | None:
    before = [
        line["body"]["state"]["job_timestamp"]
        for line in trace_lines
        if line.get("endpoint", "").startswith("GET /sdapi/v1/progress") and (line.get("t") or 0) < replayed.recorded["t"]
    ]
    return before[-1] if before else None


@pytest.mark.parametrize("trace", GENERATION_TRACES, ids=_trace_id)
def test_images(trace: Path) -> None:
    decoded = {
        line["endpoint"].removeprefix("(decoded sizes) "): line["body"]["image_sizes_wh"]
        for line in _lines(trace)
        if line.get("endpoint", "").startswith("(decoded sizes)")
    }
    for replayed in _replay(trace):
        recorded = replayed.recorded["body"]
        if replayed.recorded["status"] != 200:
            continue
        body = replayed.response.json()
        pictures = [decode_png(b) for b in body["images"]] if "images" in body else [decode_png(body["image"])]
        if "images" in body:
            assert len(pictures) == recorded["images"]["count"]
        label = replayed.recorded["endpoint"].partition("[")[2].rstrip("]")
        if label in decoded:
            assert [list(p.size) for p in pictures] == decoded[label]
        elif "info" in recorded:  # no decoded sizes recorded: they are the request's, on the 8-px grid
            size = [recorded["info"]["width"] // 8 * 8, recorded["info"]["height"] // 8 * 8]
            assert all(list(p.size) == size for p in pictures)


def _trace(name: str) -> list[dict[str, Any]]:
    return _lines(TRACE_DIR / name)


def _answers(lines: list[dict[str, Any]], endpoint: str) -> list[dict[str, Any]]:
    return [line for line in lines if line.get("endpoint", "").startswith(endpoint)]


def test_internal_progress_of_two_queued_requests(make_sim, background) -> None:
    """Trace 08: task ids waiting, queued, active, completed, and the id-less quirk."""
    lines = _trace("08_force_task_id_internal_progress_two_requests.jsonl")

    def recorded(task: str, **flags: bool) -> dict[str, Any]:
        return next(
            line["body"]
            for line in _answers(lines, f"POST /internal/progress {task}")
            if all(line["body"][flag] == value for flag, value in flags.items())
        )

    sim = make_sim(stepping=True)

    def progress_of(task: str | None) -> dict[str, Any]:
        body = {} if task is None else {"id_task": task, "id_live_preview": -1, "live_preview": False}
        return requests.post(sim.url + "/internal/progress", json=body, timeout=JOIN_TIMEOUT).json()

    assert progress_of("task(test-1)") == recorded("task(test-1)", active=False, completed=False)
    first = background(requests.post, sim.url + "/sdapi/v1/txt2img", json={**_request(lines, "first")}, timeout=JOIN_TIMEOUT)
    assert sim.wait_for(lambda s: s.current_task == "task(test-1)" and s.awaiting_release)
    assert progress_of("task(test-1)") == recorded("task(test-1)", active=True)
    second = background(requests.post, sim.url + "/sdapi/v1/txt2img", json={**_request(lines, "second")}, timeout=JOIN_TIMEOUT)
    assert sim.wait_for(lambda s: "task(test-2)" in s.pending_tasks)
    assert progress_of("task(test-2)") == recorded("task(test-2)", queued=True)
    pending = requests.get(sim.url + "/internal/pending-tasks", timeout=JOIN_TIMEOUT).json()
    assert pending == {"size": 1, "tasks": ["task(test-2)"]}

    sim.release(2)
    assert sim.wait_for(lambda s: s.sampling_step == 1 and s.awaiting_release)
    active = progress_of("task(test-1)")
    assert active["progress"] == pytest.approx(0.125) and active["eta"] is not None
    assert set(active) == set(recorded("task(test-1)", active=True))

    sim.release(6)
    assert sim.wait_for(lambda s: s.current_task == "task(test-2)" and s.awaiting_release)
    assert first.result().status_code == 200
    assert progress_of("task(test-1)") == recorded("task(test-1)", completed=True)
    assert progress_of("task(test-2)") == recorded("task(test-2)", active=True)
    sim.release(4)
    assert second.result().status_code == 200
    assert progress_of("task(test-2)") == recorded("task(test-2)", completed=True)
    assert progress_of(None) == _answers(lines, "POST /internal/progress empty body")[0]["body"]
    assert progress_of("task(never-existed)") == _answers(lines, "POST /internal/progress unknown id")[0]["body"]


def _request(lines: list[dict[str, Any]], label: str) -> dict[str, Any]:
    return next(line["request"] for line in lines if "elapsed" in line and f"[{label}," in line["endpoint"])


AUTH = {"none": None, "wrong": ("user", "wrong"), "right": ("user", "pass"), "wrong_user": ("nobody", "pass")}
UNSIMULATED_PAGES = ("GET /internal/sysinfo", "GET /docs", "GET /openapi.json", "GET /config", "GET /info")


def test_api_auth(make_sim) -> None:
    """Trace 10: --api-auth guards /sdapi/v1/* only, with A1111's bodies and no WWW-Authenticate."""
    sim = make_sim(api_auth="user:pass", step_time=0.0, first_step_time=0.0)
    compared = 0
    for line in _trace("10_api_auth_user_pass.jsonl"):
        method, path = line["endpoint"].split()[:2]
        if "auth" not in line or line["endpoint"].startswith(UNSIMULATED_PAGES) or path == "/":
            continue
        body = {"txt2img": TXT2IMG_STEPS_2, "progress": {"id_task": "task(unknown)"}}.get(path.rsplit("/", 1)[1], {})
        response = requests.request(method, sim.url + path, json=body if method == "POST" else None, auth=AUTH[line["auth"]], timeout=JOIN_TIMEOUT)
        assert response.status_code == line["status"], line["endpoint"]
        assert "WWW-Authenticate" not in response.headers
        if line["status"] == 401 or path.startswith("/internal/") or path.endswith("interrupt"):
            assert response.json() == line["body"], line["endpoint"]
        compared += 1
    assert compared == 27  # every /sdapi and /internal line of the trace


TXT2IMG_STEPS_2 = {"prompt": "a cat", "width": 64, "height": 64, "steps": 2, "seed": 1}


def test_nowebui(make_sim) -> None:
    """Trace 11: with --nowebui the /internal routes are gone; cmd-flags says so (port as a string)."""
    sim = make_sim(ui=False)
    for line in _trace("11_nowebui_endpoints.jsonl"):
        method, path = line["endpoint"].split()[:2]
        if line["endpoint"].startswith(UNSIMULATED_PAGES):
            continue
        response = requests.request(method, sim.url + path, json={} if method == "POST" else None, timeout=JOIN_TIMEOUT)
        assert response.status_code == line["status"], line["endpoint"]
        if path.endswith("cmd-flags"):
            flags = response.json()
            assert set(line["body"]) <= set(flags)
            assert flags["nowebui"] is True and flags["port"] == sim.url.rsplit(":", 1)[1]
        else:
            assert response.json() == line["body"]


def test_routing_errors_and_idle_controls(make_sim) -> None:
    """Trace 09 k: 405 and 404 bodies; interrupt and skip answer while idle and set stale flags."""
    sim = make_sim()
    for line in _trace("09_bad_input_k_wrong_method_and_unknown_path.jsonl"):
        if "sdapi/v1/progress?" in line["endpoint"]:
            continue
        method, path = line["endpoint"].split()[:2]
        response = requests.request(method, sim.url + path, timeout=JOIN_TIMEOUT)
        assert (response.status_code, response.json()) == (line["status"], line["body"])
    assert sim.snapshot().interrupted and sim.snapshot().skipped
