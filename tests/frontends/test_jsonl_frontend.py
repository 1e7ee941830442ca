"""The jsonl front end: one flushed JSON object per event, each with its documented fields."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

from scripted import PINGS, UNREACHABLE, job_spec

from sdjobs.frontend import FrontendOptions
from sdjobs.frontends.jsonl import FIELDS, JsonlFrontend
from sdjobs.status import JobState
from sdjobs.store import JobRecord

DOCS = Path(__file__).resolve().parents[2] / "docs" / "frontends.md"


class FlushCountingStream(io.StringIO):
    """Counts flushes, so a test can tell whether each line was flushed as it was written."""

    def __init__(self) -> None:
        super().__init__()
        self.unflushed_lines: list[int] = []

    def flush(self) -> None:
        self.unflushed_lines.append(self.getvalue().count("\n"))
        super().flush()


def run_jsonl(make_session, specs, **options):
    stream = FlushCountingStream()
    frontend = JsonlFrontend(FrontendOptions(), stream=stream)
    session = make_session(frontend, specs, **options)
    assert frontend.run(session) is None
    return [json.loads(line) for line in stream.getvalue().splitlines()], stream


def test_one_object_per_event_in_the_documented_order_for_each_job(make_session):
    events, _ = run_jsonl(make_session, [job_spec("sea"), job_spec("sky", stages=("txt2img",))])
    names = [event["event"] for event in events]
    progress = ["progress"] * 3
    stage = ["stage_started", *progress, "stage_finished"]
    assert names == [
        "job_queued", "job_queued",
        "job_started", *stage, *stage, "job_finished",
        "job_started", *stage, "job_finished",
        "queue_drained",
    ]  # fmt: skip
    assert [e["job"] for e in events if e["event"] == "job_finished"] == ["job-1", "job-2"]
    assert events[-1]["outcomes"] == {"job-1": "done", "job-2": "done"}


def test_every_event_carries_exactly_its_documented_fields(make_session):
    events, _ = run_jsonl(make_session, [job_spec("sea")], fail={0: "HTTP 500: out of memory"}, stall=(0, 0), unreachable=(0, 1))
    events += queue_events() + server_events()
    assert {event["event"] for event in events} == set(FIELDS)
    for event in events:
        assert sorted(event) == sorted(["event", "t", *FIELDS[event["event"]]]), event["event"]


def queue_events() -> list[dict]:
    """What a worker's watch thread makes the front end write (see tests/test_queue_commands.py for a real one)."""
    stream = FlushCountingStream()
    frontend = JsonlFrontend(FrontendOptions(), stream=stream)
    jobs = tuple(JobRecord(job_id, job_spec(name), JobState.QUEUED, position) for position, (job_id, name) in enumerate((("b2", "sky"), ("a1", "sea"))))
    frontend.sdjobs_queue_paused()
    frontend.sdjobs_queue_changed(jobs, 1_800_000_000.5)
    frontend.sdjobs_queue_resumed()
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def server_events() -> list[dict]:
    """What a worker's health threads make the front end write (tests/test_lanes.py has real ones)."""
    stream = FlushCountingStream()
    frontend = JsonlFrontend(FrontendOptions(), stream=stream)
    frontend.sdjobs_server_up("desk", "http://127.0.0.1:7860")
    frontend.sdjobs_server_down("desk", "http://127.0.0.1:7860", "cannot reach http://127.0.0.1:7860: refused")
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_server_events_name_the_server_and_its_url():
    assert [(event["event"], event["server"], event["url"]) for event in server_events()] == [
        ("server_up", "desk", "http://127.0.0.1:7860"), ("server_down", "desk", "http://127.0.0.1:7860")]  # fmt: skip


def test_queue_events_carry_no_job_and_the_ids_in_order():
    events = queue_events()
    assert [(event["event"], event.get("jobs")) for event in events] == [
        ("queue_paused", None), ("queue_changed", ["b2", "a1"]), ("queue_resumed", None)
    ]
    assert events[1]["expected_end"] == 1_800_000_000.5
    assert not any("job" in event for event in events)


def test_each_line_is_flushed_as_it_is_written(make_session):
    events, stream = run_jsonl(make_session, [job_spec("sea")])
    assert stream.unflushed_lines == list(range(1, len(events) + 1))


def test_values_as_documented(make_session):
    events, _ = run_jsonl(make_session, [job_spec("sea")], fail={0: "HTTP 500: out of memory"})
    by_name: dict[str, list[dict]] = {}
    for event in events:
        by_name.setdefault(event["event"], []).append(event)
    first, later = by_name["progress"][0], by_name["progress"][1]
    assert (first["eta"], first["job_eta"]) == (None, None)  # still calculating
    assert (later["progress"], later["step"], later["steps"], later["eta"]) == (0.5, 10, 20, 5.0)
    assert later["seed"] == 1234567890 and later["stage_index"] == 0 and later["stage_count"] == 2
    [finished_stage] = by_name["stage_finished"]
    assert finished_stage["images"] == [
        str(Path(finished_stage["images"][0]).parent / name) for name in ("001.png", "002.png")
    ]
    assert finished_stage["partial"] is False
    [finished] = by_name["job_finished"]
    assert (finished["outcome"], finished["error"]) == ("failed", "HTTP 500: out of memory")
    assert all(isinstance(event["t"], float) for event in events)


def test_a_webui_that_is_down_is_an_event_per_ping_with_the_job_and_the_wait(make_session):
    events, _ = run_jsonl(make_session, [job_spec("sea")], unreachable=(0, 1))
    down = [event for event in events if event["event"] == "webui_unreachable"]
    assert [(e["job"], e["stage_index"], e["error"], e["retry_in"], e["waited"]) for e in down] == [
        ("job-1", 1, UNREACHABLE, retry_in, waited) for retry_in, waited in PINGS
    ]


def test_the_documentation_lists_every_field_of_every_event():
    text = DOCS.read_text()
    section = text[text.index("## jsonl") :]
    section = section[: section.find("\n## ", 1)]
    documented = set(re.findall(r"`([a-z_]+)`", section))
    missing = {name for fields in FIELDS.values() for name in fields} | set(FIELDS) | {"event", "t"}
    assert missing - documented == set()
