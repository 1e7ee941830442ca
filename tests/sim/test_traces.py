"""Replays of the recorded A1111 traces against the simulator, compared as a client sees them.

Answers and images: each blocking request of a trace goes to a fresh stepping-mode
simulator whose steps are all released in advance.  States: the request goes to a timed
simulator with the recorded CPU server's costs (scaled down), after a job that leaves the
stale `sampling_steps` the trace began with; interrupts are sent at the recorded state.
Every state the simulator held for at least `FINE_POLL` is one a client polling that often
sees.  The trace, polled every 0.1 s, must show a subsequence of those, with A1111's progress
at each; and every state the simulator held as long as two steps (which a 0.1-s poll of a
1.7-s step cannot miss) must be in the trace.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import attrs
import pytest
import requests

from sdjobs.sim import SimSettings, SimulatedWebUI, StateSnapshot
from sdjobs.sim.state import sdapi_progress

from .conftest import JOIN_TIMEOUT, BackgroundCall, decode_png, png_base64

TRACE_DIR = Path(__file__).parent.parent / "data" / "traces"
UNLIMITED_STEPS = 1_000_000
# The recorded detector "found" 2 faces in trace 16 and none at the default confidence in 21.
FACES = {"16_": 2, "21_": 0}
# Values that are random or wall-clock on every run.
UNREPEATABLE_INFO = {"subseed", "all_subseeds", "job_timestamp"}

# The recorded server's costs, ~80x faster: a 64x64 step takes ~20 ms, its decode ~3 ms.
TIMED = {"profile": "cpu", "step_time": 0.2}
# With interrupts: steps long enough that one sent at a state lands in the step after it.
TIMED_WITH_CONTROLS = {"profile": "cpu", "step_time": 1.0}
FINE_POLL = 0.0005  # seconds: every state the simulator holds on purpose lasts longer
CONTROLS = ("POST /sdapi/v1/interrupt", "POST /sdapi/v1/skip")

StateKey = tuple[Any, ...]


def _lines(trace: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in trace.read_text().splitlines()]


def _blocking(trace: Path) -> list[dict[str, Any]]:
    return [line for line in _lines(trace) if "elapsed" in line and "auth" not in line and line["endpoint"] not in CONTROLS]


GENERATION_TRACES = sorted((t for t in TRACE_DIR.glob("*.jsonl") if _blocking(t)), key=lambda t: t.name)


def _settings(trace: Path, **timing: Any) -> SimSettings:
    faces = next((n for prefix, n in FACES.items() if trace.name.startswith(prefix)), 1)
    return SimSettings(stepping=not timing, faces=faces, ui="nowebui" not in trace.name, **timing)


def _key(state: dict[str, Any] | StateSnapshot) -> StateKey:
    """What `/sdapi/v1/progress` shows of a state, but for the job's timestamp."""
    s = state if isinstance(state, dict) else state.as_dict()
    return tuple(value for name, value in sorted(s.items()) if name != "job_timestamp")


def _collapse(keys: Sequence[StateKey]) -> list[StateKey]:
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


@attrs.frozen
class Held:
    """A state the simulator showed, and for how long (None: still showing)."""

    state: StateSnapshot
    seconds: float | None


def _held(changes: Sequence[tuple[float, StateSnapshot]]) -> list[Held]:
    """`state_changes` as client-visible states (runs of one key) and their durations."""
    runs: list[tuple[float, StateSnapshot]] = []
    for at, state in changes:
        if not runs or _key(runs[-1][1]) != _key(state):
            runs.append((at, state))
    ends = [at for at, _ in runs[1:]]
    return [Held(state, ends[i] - at if i < len(ends) else None) for i, (at, state) in enumerate(runs)]


def _replay_timed(trace: Path, line: dict[str, Any], trace_lines: list[dict[str, Any]]) -> tuple[requests.Response, list[Held]]:
    """One recorded request on a timed simulator; the states it went through."""
    polls_before = [p for p in _polls(trace_lines) if p["t"] < line["t"]]
    controls = [c for c in trace_lines if c.get("endpoint") in CONTROLS and line["t"] < c["t"] < line["t_end"]]
    settings = _settings(trace, **(TIMED_WITH_CONTROLS if controls else TIMED))
    method, path = line["endpoint"].split()[:2]
    with SimulatedWebUI(settings) as sim:
        stale_steps = polls_before[-1]["body"]["state"]["sampling_steps"] if polls_before else 0
        if stale_steps:
            prime = {"prompt": "before", "width": 64, "height": 64, "steps": stale_steps}
            assert requests.post(sim.url + "/sdapi/v1/txt2img", json=prime, timeout=JOIN_TIMEOUT).ok
        start = len(sim.state_changes)
        call = BackgroundCall(
            lambda: requests.request(
                method, sim.url + path, data=_request_body(trace_lines, line), headers={"Content-Type": "application/json"}, timeout=JOIN_TIMEOUT
            )
        )
        for control in controls:
            at = _key(next(p for p in reversed(_polls(trace_lines)) if p["t"] < control["t"])["body"]["state"])
            assert sim.wait_for(lambda s, at=at: _key(s) == at, timeout=JOIN_TIMEOUT)
            requests.post(sim.url + control["endpoint"].split()[1], timeout=JOIN_TIMEOUT)
        response = call.result()
        return response, _held(sim.state_changes[start:])


def _polls(trace_lines: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [line for line in trace_lines if line.get("endpoint", "").startswith("GET /sdapi/v1/progress") and line.get("t") is not None]


@pytest.mark.parametrize("trace", GENERATION_TRACES, ids=_trace_id)
def test_states_and_progress(trace: Path) -> None:
    trace_lines = _lines(trace)
    for line in _blocking(trace):
        polls = Replayed(line, None, []).recorded_polls(trace_lines)  # type: ignore[arg-type]
        if not polls:
            continue
        response, held = _replay_timed(trace, line, trace_lines)
        assert response.status_code == line["status"]
        recorded_began = polls[-1]["body"]["state"]["job_timestamp"] != _timestamp_before(trace_lines, line)
        if not any(h.state.job_count == -1 for h in held):
            assert not recorded_began, "A1111 began a job for this request"
            assert [h.state for h in held] == []
            continue
        recorded = _collapse([_key(p["body"]["state"]) for p in polls])
        seen = _collapse([_key(h.state) for h in held if h.seconds is None or h.seconds >= FINE_POLL])
        assert _is_subsequence(recorded, seen), (recorded, seen)
        two_steps = 2 * _settings(trace, **TIMED).timing.step((64, 64), 1)
        long = [_key(h.state) for h in held if h.seconds is not None and h.seconds >= two_steps]
        assert set(long) <= set(recorded), set(long) - set(recorded)
        by_key = {_key(h.state): h.state for h in held}
        for poll in polls:
            state = by_key[_key(poll["body"]["state"])]
            progress, _ = sdapi_progress(state, now=state.time_start or 0.0)
            assert progress == pytest.approx(poll["body"]["progress"], abs=1e-3)


def _timestamp_before(trace_lines: list[dict[str, Any]], line: dict[str, Any]) -> str | None:
    before = [poll["body"]["state"]["job_timestamp"] for poll in _polls(trace_lines) if poll["t"] < line["t"]]
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
        elif "info" in recorded:  # no decoded sizes recorded: the request's (hires-scaled), on the 8-px grid
            request = replayed.recorded["request"]
            scale = request["hr_scale"] if request.get("enable_hr") else 1
            size = [int(recorded["info"][side] * scale) // 8 * 8 for side in ("width", "height")]
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
