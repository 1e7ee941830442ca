"""A job's stages routed to different servers (`server = "name"`, `tags` per stage): each stage runs
where it may, the job goes back to the queue between, and the next server starts from the images
the last one wrote."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import attrs
import pytest
from process_helpers import killable_sim, sdjobs, start
from runner_helpers import Background, job_spec, make_lanes
from sdjobs import hookimpl
from sdjobs.lanes import Lane, route
from sdjobs.preflight import Choices, ServerCatalog
from sdjobs.servers import ServerConfig, check_routes
from sdjobs.sim import CatalogChoice, SimSettings, SimulatedWebUI
from sdjobs.spec import JobFileError, JobSpec
from sdjobs.sqlite_store import SQLiteStore
from sdjobs.status import JobState
from sdjobs.worker import Worker


#: Stage 1 on server "a"; stage 2 needs the tag "sdxl" and a checkpoint only "b" has.
JOB_FILE = """\
name = "handed on"
prompt = "a lighthouse at dusk"
seed = 1234

[settings]
steps = 6
width = 64
height = 64

[[stages]]
type = "txt2img"
server = "a"

[[stages]]
type = "img2img"
denoising_strength = 0.5
tags = ["sdxl"]
checkpoint = "sdxl"
"""

SDXL = CatalogChoice(checkpoints=("sdxl.safetensors",))


def servers_file(path: Path, a: str, b: str) -> Path:
    path.write_text(f'[[servers]]\nname = "a"\nurl = "{a}"\n\n[[servers]]\nname = "b"\nurl = "{b}"\ntags = ["sdxl"]\n')
    return path


def two_stages(**stage_two: object) -> JobSpec:
    spec = job_spec(("txt2img", "img2img"), name="routed")
    first, second = spec.stages
    return attrs.evolve(spec, stages=(attrs.evolve(first, server="a"), attrs.evolve(second, **stage_two)))


# -- routing, on catalogs alone ----------------------------------------------------------------


def _lane(name: str, *tags: str) -> Lane:
    catalog = ServerCatalog(samplers=Choices(("Euler a",)), upscalers=Choices(()), checkpoints=Choices(("sdxl.safetensors",)))
    return Lane(ServerConfig(name, f"http://{name}:7860", tags=frozenset(tags)), runner=None, up=True, catalog=catalog)  # type: ignore[arg-type]


def test_each_stage_goes_to_a_server_it_names_or_whose_tags_it_asks_for() -> None:
    a, b = _lane("a"), _lane("b", "sdxl")
    by_tag, by_name = two_stages(tags=("sdxl",)), two_stages(server="b")
    for spec in (by_tag, by_name):
        assert route(spec, [b, a]) is a and a.stages(spec, 0) == range(0, 1)  # then back to the queue
        assert route(spec, [a, b], start=1) is b and b.stages(spec, 1) == range(1, 2)
    assert b.stages(by_tag, 0) == range(0) and a.stages(by_tag, 1) == range(1, 1)
    assert route(by_tag, [a, b], start=2) is a  # every stage finished (its worker died before the end): anywhere
    b.job = object()  # type: ignore[assignment]
    assert route(by_tag, [a, b], start=1) is None  # stage 2 waits for the busy server it needs


def test_a_stage_no_server_takes_is_one_error_naming_the_file_and_key(tmp_path) -> None:
    servers = (ServerConfig("a", "http://a:7860"), ServerConfig("b", "http://b:7860", tags=frozenset({"sdxl"})))
    source = tmp_path / "job.toml"
    for stage_two, key, message in [
        ({"server": "c"}, "stages[2].server", "no server is named 'c'; the servers: a, b"),
        ({"tags": ("sdxl", "fast")}, "stages[2].tags", "no server has the tag 'fast'; the servers' tags: a: -; b: sdxl"),
        ({"server": "a", "tags": ("sdxl",)}, "stages[2].tags", "server 'a' (named by server) does not have the tag 'sdxl'"),
    ]:
        with pytest.raises(JobFileError) as raised:
            check_routes([attrs.evolve(two_stages(**stage_two), source=source)], servers)
        assert (raised.value.path, raised.value.key) == (source, key) and raised.value.message.startswith(message)
    check_routes([two_stages(server="b"), two_stages(tags=("sdxl",))], servers)  # these fit


def test_check_shows_where_each_stage_runs_and_refuses_a_server_no_one_has(tmp_path) -> None:
    job = tmp_path / "job.toml"
    job.write_text(JOB_FILE)
    servers = servers_file(tmp_path / "servers.toml", "http://127.0.0.1:7860", "http://127.0.0.1:7861")
    checked = sdjobs("check", job, "--servers", servers)
    assert checked.returncode == 0, checked.stderr
    stages = [line for line in checked.stdout.splitlines() if line.startswith("  1.") or line.startswith("  2.")]
    assert [line.rsplit(" · ", 1)[1] for line in stages] == ["on a", "on b"]
    assert sdjobs("check", job).stdout.count(" · on ") == 2  # without the servers: as the file asks
    job.write_text(JOB_FILE.replace('server = "a"\n', ""))
    anywhere = sdjobs("check", job, "--servers", servers).stdout.splitlines()
    assert anywhere[2].endswith("· on any server") and anywhere[3].endswith("· on b")
    job.write_text(JOB_FILE.replace('server = "a"', 'server = "c"'))
    for command in (("check", job), ("queue", "add", job, "--queue", tmp_path / "q.db")):
        refused = sdjobs(*command, env={"SDJOBS_SERVERS": str(servers)})
        assert refused.returncode == 2 and refused.stdout == ""
        assert refused.stderr == f"sdjobs: error: {job}: stages[1].server: no server is named 'c'; the servers: a, b\n"


# -- over real HTTP ------------------------------------------------------------------------------


class Payloads:
    """Each request's payload as sent, by server."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, str, dict]] = []

    @hookimpl
    def sdjobs_amend_payload(self, payload, stage, status):
        self.sent.append((status.server, stage.type, dict(payload)))


def test_stage_two_runs_on_the_other_server_from_the_image_stage_one_wrote(tmp_path) -> None:
    payloads = Payloads()
    with SimulatedWebUI(SimSettings(step_time=0.001)) as a, SimulatedWebUI(SimSettings(step_time=0.001, catalog=SDXL)) as b, \
            SQLiteStore(tmp_path / "queue.db") as store:  # fmt: skip
        [job] = store.add([two_stages(tags=("sdxl",), checkpoint="sdxl")])
        lanes, _ = make_lanes({"b": b.url, "a": a.url}, tmp_path / "out", plugins=[payloads])
        lanes.lanes[0].server = attrs.evolve(lanes.lanes[0].server, tags=frozenset({"sdxl"}))
        worker = Worker(store, lanes=lanes, until_empty=True, idle_poll=0.05)
        Background(worker.run).join(timeout=30)
        generated = {name: [path for _, _, path in sim.requests if path.endswith(("txt2img", "img2img"))] for name, sim in (("a", a), ("b", b))}
        record = store.get(job.id)
    assert worker.outcomes == {job.id: JobState.DONE} and record.attempts == 2, record.error
    assert generated == {"a": ["/sdapi/v1/txt2img"], "b": ["/sdapi/v1/img2img"]}
    [(_, _, first), (server, _, second)] = payloads.sent
    written = (record.folder / "01-txt2img" / "001.png").read_bytes()
    assert server == "b" and second["init_images"] == [base64.b64encode(written).decode("ascii")]
    assert "init_images" not in first
    manifest = json.loads((record.folder / "manifest.json").read_text())
    assert manifest["outcome"] == "done" and [stage["server"] for stage in manifest["stages"]] == ["a", "b"]


def test_a_stage_whose_only_server_went_down_waits_for_it_and_runs_there_once_it_is_back(tmp_path) -> None:
    with SimulatedWebUI(SimSettings(step_time=0.001)) as a, SQLiteStore(tmp_path / "queue.db") as store:
        b = SimulatedWebUI(SimSettings(stepping=True, catalog=SDXL)).start()
        port = int(b.url.rsplit(":", 1)[1])
        [job] = store.add([two_stages(tags=("sdxl",), checkpoint="sdxl")])
        lanes, log = make_lanes({"a": a.url, "b": b.url}, tmp_path / "out", health_interval=0.1)
        lanes.lanes[1].server = attrs.evolve(lanes.lanes[1].server, tags=frozenset({"sdxl"}))
        worker = Worker(store, lanes=lanes, until_empty=True, idle_poll=0.05)
        working = Background(worker.run)
        try:
            assert log.wait_for("stage_started", lambda call: call["status"].server == "b", timeout=10)
            b.stop()  # in stage 2, its request unanswered
            assert log.wait_for("job_finished", lambda call: call["outcome"] is JobState.HANDED_BACK
                                and call["status"].server == "b", timeout=10)  # fmt: skip
            with SimulatedWebUI(SimSettings(step_time=0.001, catalog=SDXL), port=port) as back:
                working.join(timeout=30)
                back_url, generated = back.url, [path for _, _, path in back.requests if path.endswith("2img")]
        finally:
            worker.cancel(rest=True)
            working.join(timeout=10)
        record = store.get(job.id)
        on_a = [path for _, _, path in a.requests if path.endswith(("txt2img", "img2img"))]
    assert worker.outcomes == {job.id: JobState.DONE} and record.server == back_url, record.error
    assert on_a == ["/sdapi/v1/txt2img"]  # a, free all along, never ran stage 2
    # stage 2 ran on b once back (the client may also have sent the lost attempt's request again
    # once b answered: its answer is not the new attempt's and is dropped)
    assert set(generated) == {"/sdapi/v1/img2img"}
    assert sorted(path.relative_to(record.folder).as_posix() for path in record.folder.rglob("*.png")) == [
        "01-txt2img/001.png", "02-img2img/001.png"]  # fmt: skip


def test_a_job_whose_stage_no_server_of_the_worker_takes_fails_saying_so(tmp_path) -> None:
    """Queued where no servers file was known: the worker's servers are the first to see it."""
    with SimulatedWebUI(SimSettings(step_time=0.001)) as a, SimulatedWebUI(SimSettings(step_time=0.001)) as b, \
            SQLiteStore(tmp_path / "queue.db") as store:  # fmt: skip
        [job] = store.add([two_stages(server="c")])
        lanes, _ = make_lanes({"a": a.url, "b": b.url}, tmp_path / "out")
        worker = Worker(store, lanes=lanes, until_empty=True, idle_poll=0.05)
        Background(worker.run).join(timeout=30)
        record = store.get(job.id)
    assert worker.outcomes == {job.id: JobState.FAILED}
    assert record.error == "stage 2 (img2img): server: no server is named 'c'; the servers: a, b"
    assert [stage.server for stage in record.stages] == ["a"]  # stage 1 ran where it was asked to


def test_sdjobs_worker_runs_each_stage_on_its_server_of_a_servers_file(tmp_path) -> None:
    """Two `sdjobs sim --catalog` processes that differ; the job file routes stage 1 to "a" by name and
    stage 2 by tag and checkpoint to "b"; one `sdjobs worker` runs it to the end."""
    (tmp_path / "sdxl.toml").write_text('checkpoints = ["sdxl.safetensors"]\nadetailer = false\n')
    job = tmp_path / "job.toml"
    job.write_text(JOB_FILE)
    queue = tmp_path / "queue.db"
    with killable_sim("--step-time", "0.01") as (_, a_url), \
            killable_sim("--step-time", "0.01", "--catalog", tmp_path / "sdxl.toml") as (_, b_url):  # fmt: skip
        servers = servers_file(tmp_path / "servers.toml", a_url, b_url)
        added = sdjobs("queue", "add", job, "--servers", servers, "--queue", queue)
        assert added.returncode == 0, added.stderr
        worker = start("worker", "--until-empty", "--servers", servers, "--queue", queue, "--frontend", "jsonl",
                       "--health-interval", "0.2", "--out", tmp_path / "out")  # fmt: skip
        out, err = worker.communicate(timeout=60)
    assert worker.returncode == 0, err
    events = [json.loads(line) for line in out.splitlines()]
    assert [(event["stage_index"], event["server"]) for event in events if event["event"] == "stage_finished"] == [(0, "a"), (1, "b")]
    [folder] = (tmp_path / "out").iterdir()
    assert sorted(path.relative_to(folder).as_posix() for path in folder.rglob("*.png")) == ["01-txt2img/001.png", "02-img2img/001.png"]
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["outcome"] == "done" and [stage["server"] for stage in manifest["stages"]] == ["a", "b"]
