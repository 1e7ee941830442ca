"""One worker, several servers: each job goes to a server that has what it needs, one job per
server at a time, the least busy first."""

from __future__ import annotations

import io
import json
import logging
import signal

import attrs
import pytest
from process_helpers import Lines, killable_sim, start
from runner_helpers import GENERATION_PATHS, Background, HookLog, job_spec, make_lanes, make_runner
from rich.console import Console
from sdjobs import hookimpl
from sdjobs.cli import exit_status
from sdjobs.client import WebUIClient
from sdjobs.frontend import FrontendOptions
from sdjobs.frontends.console import ConsoleFrontend
from sdjobs.clock import FakeClock
from sdjobs.frontends.log import LogFrontend
from sdjobs.history import ServerHistory
from sdjobs.lanes import Lane, Lanes, route
from sdjobs.preflight import Choices, ServerCatalog
from sdjobs.servers import ServerConfig
from sdjobs.sim import CatalogChoice, SimSettings, SimulatedWebUI
from sdjobs.sqlite_store import SQLiteStore
from sdjobs.status import JobState, StageResult
from sdjobs.store import JobRecord
from sdjobs.worker import Worker
from test_history import ran, timing

SDXL = CatalogChoice(checkpoints=("sdxl.safetensors",), adetailer=False)
ADETAILER = job_spec(("txt2img", "adetailer"), name="faces")
ON_SDXL = attrs.evolve(job_spec(name="sdxl"), checkpoint="sdxl")


@pytest.fixture
def store(queue_file):
    with SQLiteStore(queue_file) as store:
        yield store


# -- routing, on catalogs alone -----------------------------------------------------------


def _catalog(checkpoint: str, *, adetailer: bool) -> ServerCatalog:
    return ServerCatalog(samplers=Choices(("Euler a",)), upscalers=Choices(("Lanczos",)), checkpoints=Choices((checkpoint,)),
                         ad_models=("face_yolov8n.pt",) if adetailer else None)  # fmt: skip


def _lane(name: str, catalog: ServerCatalog | None, *, up: bool = True, weight: float = 1.0, started: int = 0) -> Lane:
    return Lane(ServerConfig(name, f"http://{name}:7860", weight=weight), runner=None, up=up, catalog=catalog, started=started)  # type: ignore[arg-type]


def test_a_job_goes_to_the_server_that_has_its_checkpoint_and_adetailer() -> None:
    plain, sdxl = _lane("plain", _catalog("empty", adetailer=True)), _lane("sdxl", _catalog("sdxl", adetailer=False))
    assert route(ON_SDXL, [plain, sdxl]) is sdxl
    assert route(ADETAILER, [plain, sdxl]) is plain


def test_among_servers_that_fit_the_least_busy_for_its_weight_wins() -> None:
    catalog = _catalog("empty", adetailer=True)
    assert route(job_spec(), [_lane("a", catalog, started=2), _lane("b", catalog, started=1)]).server.name == "b"
    assert route(job_spec(), [_lane("a", catalog, started=2, weight=4), _lane("b", catalog, started=1)]).server.name == "a"


def test_a_job_waits_for_the_busy_or_down_server_it_needs() -> None:
    plain, sdxl = _lane("plain", _catalog("empty", adetailer=True)), _lane("sdxl", _catalog("sdxl", adetailer=False))
    sdxl.job = object()  # type: ignore[assignment]
    assert route(ON_SDXL, [plain, sdxl]) is None
    sdxl.job, sdxl.up = None, False
    assert route(ON_SDXL, [plain, sdxl]) is None
    assert route(ON_SDXL, [plain, _lane("unknown", None, up=False)]) is None  # it may have it once it answers


def test_a_job_that_fits_no_server_goes_to_a_free_one_whose_checks_then_fail_it() -> None:
    plain, sdxl = _lane("plain", _catalog("empty", adetailer=True)), _lane("sdxl", _catalog("sdxl", adetailer=False))
    plain.job = object()  # type: ignore[assignment]
    assert route(attrs.evolve(job_spec(), checkpoint="nowhere"), [plain, sdxl]) is sdxl


def test_a_server_whose_history_says_it_runs_the_stage_sooner_wins_when_every_one_s_history_knows() -> None:
    catalog = _catalog("empty", adetailer=True)
    slow, fast, new = _lane("slow", catalog), _lane("fast", catalog, started=5), _lane("new", catalog)
    slow.history, fast.history = (ServerHistory.from_records(lane.server.url, [record]) for lane, record in
                                  ((slow, _ran(slow, rate=0.3, elapsed=3.0)), (fast, _ran(fast, rate=0.1, elapsed=1.0))))  # fmt: skip
    assert fast.seconds(job_spec(), 0) == pytest.approx(slow.seconds(job_spec(), 0) / 3)
    assert route(job_spec(), [slow, fast]) is fast  # though it started more jobs
    assert route(job_spec(), [slow, fast, new]) is slow  # one knows nothing: the least busy


def _ran(lane: Lane, *, rate: float, elapsed: float) -> JobRecord:
    """A done `job_spec()` whose stage took ``elapsed`` on ``lane``'s server at ``rate`` seconds a step."""
    result = StageResult("txt2img", 0, elapsed=elapsed, timing=timing((64 * 64, rate)))
    return JobRecord(id=lane.server.name, spec=job_spec(), state=JobState.DONE, position=0, attempts=1, server=lane.server.url,
                     stages=(result,))


# -- a worker with two real simulated servers ----------------------------------------------


def test_with_history_saying_one_server_is_three_times_faster_the_first_job_goes_there(store, tmp_path) -> None:
    with SimulatedWebUI(SimSettings(stepping=True)) as slow, SimulatedWebUI(SimSettings(stepping=True)) as fast:
        for url, rate in ((slow.url, 0.3), (fast.url, 0.1)):
            for _ in range(3):
                ran(store, FakeClock(0.0), job_spec(), timing((64 * 64, rate)), elapsed=rate * 10, server=url)
        lanes, log = make_lanes({"slow": slow.url, "fast": fast.url}, tmp_path / "out")
        worker = Worker(store, lanes=lanes, idle_poll=0.05)
        working = Background(worker.run)
        try:
            for name in ("slow", "fast"):
                assert log.wait_for("server_up", lambda call, name=name: call["server"] == name)
            first, second = store.add([job_spec(name="first"), job_spec(name="second")])  # both servers free
            for name in ("fast", "slow"):
                assert log.wait_for("stage_started", lambda call, name=name: call["status"].server == name, timeout=10)
            assert (store.get(first.id).server, store.get(second.id).server) == (fast.url, slow.url)
        finally:
            worker.cancel(rest=True)
            for sim in (slow, fast):
                sim.release(10_000)
            working.join(timeout=20)




def test_each_server_runs_a_job_at_once_and_each_job_runs_where_it_fits(store, tmp_path, caplog) -> None:
    console = ConsoleFrontend(FrontendOptions(), console=Console(file=io.StringIO()))
    caplog.set_level(logging.INFO, logger="sdjobs.jobs")
    with SimulatedWebUI(SimSettings(stepping=True)) as plain, SimulatedWebUI(SimSettings(stepping=True, catalog=SDXL)) as sdxl:
        sdxl_job, faces_job = store.add([ON_SDXL, ADETAILER])
        lanes, log = make_lanes({"plain": plain.url, "sdxl": sdxl.url}, tmp_path / "out", plugins=[console, LogFrontend(FrontendOptions())])
        worker = Worker(store, lanes=lanes, until_empty=True, idle_poll=0.05)
        working = Background(worker.run)
        # Both servers hold a step of their job at once: two jobs run side by side, a line each on the console.
        for sim in (plain, sdxl):
            assert sim.wait_for(lambda state: state.awaiting_release, timeout=10)
        assert log.wait_for("stage_started", lambda call: call["status"].server == "plain")
        assert log.wait_for("stage_started", lambda call: call["status"].server == "sdxl")
        screen = Console(file=io.StringIO(), width=200, record=True)
        screen.print(console.view())
        shown = screen.export_text().splitlines()
        assert sorted(line.split()[:2] for line in shown if "Stage" in line) == [["plain", "faces"], ["sdxl", "sdxl"]]
        for sim in (plain, sdxl):
            sim.release(10_000)
        working.join(timeout=30)
        assert store.get(sdxl_job.id).server == sdxl.url and store.get(faces_job.id).server == plain.url
    assert worker.outcomes == {sdxl_job.id: JobState.DONE, faces_job.id: JobState.DONE}
    assert sorted(call["server"] for name, call in log.calls if name == "server_up") == ["plain", "sdxl"]
    assert {status.server for status in log.statuses(None) if status.job_id == faces_job.id} == {"plain"}
    logged = [record.getMessage() for record in caplog.records if record.name == "sdjobs.jobs"]
    assert "faces [plain]: Stage 2/2 adetailer started" in logged and "sdxl [sdxl]: Stage 1/1 txt2img started" in logged


def test_each_server_is_asked_its_lists_once_for_its_health_check_and_its_jobs(store, tmp_path) -> None:
    lists = ["/sdapi/v1/samplers", "/sdapi/v1/sd-models"]
    with SimulatedWebUI(SimSettings(step_time=0.001)) as desk, SimulatedWebUI(SimSettings(step_time=0.001)) as rented:
        lanes, log = make_lanes({"desk": desk.url, "rented": rented.url}, tmp_path / "out")
        worker = Worker(store, lanes=lanes, idle_poll=0.05)
        working = Background(worker.run)
        for name in ("desk", "rented"):
            assert log.wait_for("server_up", lambda call, name=name: call["server"] == name)
        jobs = store.add([attrs.evolve(job_spec(name=f"job{n}"), checkpoint="empty") for n in range(4)])
        for job in jobs:
            assert log.wait_for("job_finished", lambda call, job=job: call["status"].job_id == job.id, timeout=20)
        worker.cancel(rest=True)
        working.join(timeout=10)
        asked = [sorted(path for _, _, path in sim.requests if path in lists) for sim in (desk, rented)]
        assert {store.get(job.id).server for job in jobs} == {desk.url, rented.url}
    assert asked == [lists, lists]


def test_a_checkpoint_added_to_a_running_server_is_found_by_the_next_job_that_names_it(store, tmp_path) -> None:
    """The lists are asked once and kept; a job that names what they lack has them asked again."""
    first = SimulatedWebUI(SimSettings(step_time=0.001)).start()
    port = int(first.url.rsplit(":", 1)[1])
    runner, log = make_runner(WebUIClient(first.url), [], tmp_path / "out")
    worker = Worker(store, runner, idle_poll=0.05)
    working = Background(worker.run)
    try:
        [plain] = store.add([attrs.evolve(job_spec(name="plain"), checkpoint="empty")])
        assert log.wait_for("job_finished", lambda call: call["status"].job_id == plain.id, timeout=20)
        first.stop()
        added = CatalogChoice(checkpoints=("empty.pt", "sdxl.safetensors"))
        with SimulatedWebUI(SimSettings(step_time=0.001, catalog=added), port=port) as same:
            [new] = store.add([ON_SDXL])  # the lists as first asked have no sdxl
            assert log.wait_for("job_finished", lambda call: call["status"].job_id == new.id, timeout=20)
            asked = [path for _, _, path in same.requests if path == "/sdapi/v1/sd-models"]
    finally:
        worker.cancel(rest=True)
        working.join(timeout=10)
    assert worker.outcomes == {plain.id: JobState.DONE, new.id: JobState.DONE}
    assert asked == ["/sdapi/v1/sd-models"]


def test_a_job_no_server_can_run_fails_saying_what_is_missing(store, tmp_path) -> None:
    with SimulatedWebUI(SimSettings(step_time=0.001)) as plain, SimulatedWebUI(SimSettings(step_time=0.001, catalog=SDXL)) as sdxl:
        [job] = store.add([attrs.evolve(job_spec(), checkpoint="nowhere")])
        lanes, _ = make_lanes({"plain": plain.url, "sdxl": sdxl.url}, tmp_path / "out")
        worker = Worker(store, lanes=lanes, until_empty=True, idle_poll=0.05)
        Background(worker.run).join(timeout=30)
    assert worker.outcomes == {job.id: JobState.FAILED}
    assert "checkpoint 'nowhere' is not on the server" in store.get(job.id).error


# -- failover ----------------------------------------------------------------------------------

TWO_STAGES = job_spec(("txt2img", "img2img"), name="two", steps=20)


class ServerEvents:
    """Records `sdjobs_server_up` and `sdjobs_server_down` as a plugin does."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []

    @hookimpl
    def sdjobs_server_up(self, server):
        self.seen.append(("up", server))

    @hookimpl
    def sdjobs_server_down(self, server, url, error):
        self.seen.append(("down", server))
        assert url.startswith("http://127.0.0.1:") and error


def _in_stage_two(kwargs) -> bool:
    return kwargs["status"].stage_index == 1


def start_on_first(store, lanes: Lanes, log: HookLog, spec) -> tuple[Worker, Background, object]:
    """A worker on ``lanes`` that runs ``spec`` on the first server: it is queued once both are up,
    and the second counts a job started already."""
    worker = Worker(store, lanes=lanes, until_empty=False, idle_poll=0.05)
    working = Background(worker.run)
    for lane in lanes.lanes:
        assert log.wait_for("server_up", lambda call, name=lane.server.name: call["server"] == name)
    lanes.lanes[1].started = 1
    [job] = store.add([spec])
    worker.until_empty = True
    return worker, working, job


def test_a_server_killed_mid_job_hands_the_job_to_another_which_finishes_it_once(store, tmp_path) -> None:
    events = ServerEvents()
    with killable_sim("--step-time", "0.05") as (doomed, doomed_url), SimulatedWebUI(SimSettings(step_time=0.001)) as spare:
        lanes, log = make_lanes({"doomed": doomed_url, "spare": spare.url}, tmp_path / "out", plugins=[events], health_interval=0.1)
        worker, working, job = start_on_first(store, lanes, log, TWO_STAGES)
        assert log.wait_for("stage_started", _in_stage_two, timeout=20)
        doomed.send_signal(signal.SIGKILL)
        working.join(timeout=30)
        generated = [path for _, _, path in spare.requests if path in GENERATION_PATHS]
        record = store.get(job.id)
        assert (record.server, record.attempts) == (spare.url, 2)
    assert worker.outcomes == {job.id: JobState.DONE} and exit_status(worker) == 0
    assert generated == ["/sdapi/v1/img2img"]  # stage 1 is never run again
    assert sorted(path.relative_to(record.folder).as_posix() for path in record.folder.rglob("*.png")) == [
        "01-txt2img/001.png", "02-img2img/001.png"]  # fmt: skip
    assert ("down", "doomed") in events.seen and events.seen.count(("up", "spare")) == 1


def test_a_hung_server_without_task_ids_is_marked_down_and_its_job_is_not_interrupted_there(store, tmp_path) -> None:
    """Without task ids only a fresh sample could show that the running job is ours; a hung server gives none."""
    with SimulatedWebUI(SimSettings(step_time=0.05, ui=False)) as hung, SimulatedWebUI(SimSettings(step_time=0.001)) as spare:
        lanes, log = make_lanes({"hung": hung.url, "spare": spare.url}, tmp_path / "out", health_interval=0.1)
        worker, working, job = start_on_first(store, lanes, log, TWO_STAGES)
        assert log.wait_for("stage_started", _in_stage_two, timeout=20)
        hung.hang()
        assert log.wait_for("server_down", lambda call: call["server"] == "hung", timeout=10)
        working.join(timeout=30)
        hung.hang(False)
        interrupts = [path for _, method, path in hung.requests if path == "/sdapi/v1/interrupt"]
        assert store.get(job.id).server == spare.url
    assert worker.outcomes == {job.id: JobState.DONE}
    assert interrupts == []


def test_a_server_that_comes_back_is_used_again(store, tmp_path) -> None:
    with SimulatedWebUI(SimSettings(step_time=0.001, catalog=SDXL)) as other:
        first = SimulatedWebUI(SimSettings(step_time=0.001)).start()
        port = int(first.url.rsplit(":", 1)[1])
        lanes, log = make_lanes({"faces": first.url, "sdxl": other.url}, tmp_path / "out", health_interval=0.1)
        worker = Worker(store, lanes=lanes, idle_poll=0.05)
        working = Background(worker.run)
        try:
            assert log.wait_for("server_up", lambda call: call["server"] == "faces")
            first.stop()
            assert log.wait_for("server_down", lambda call: call["server"] == "faces")
            [job] = store.add([ADETAILER])  # only the server that is down has ADetailer: the job waits
            with SimulatedWebUI(SimSettings(step_time=0.001), port=port) as back:
                assert log.wait_for("job_finished", lambda call: call["status"].job_id == job.id, timeout=20)
                assert store.get(job.id).server == back.url
        finally:
            worker.cancel(rest=True)
            working.join(timeout=10)
    assert worker.outcomes == {job.id: JobState.DONE}
    assert [call["server"] for name, call in log.calls if name == "server_up"].count("faces") == 2


def test_sdjobs_worker_on_two_servers_exits_0_when_one_dies_and_every_job_ends_done_once(store, tmp_path) -> None:
    jobs = store.add([job_spec(("txt2img", "img2img"), name=f"job{n}", steps=10) for n in range(4)])
    with killable_sim("--step-time", "0.05") as (doomed, doomed_url), killable_sim("--step-time", "0.02") as (_, spare_url):
        worker = start("worker", "--until-empty", "--webui", doomed_url, "--webui", spare_url, "--health-interval", "0.2",
                       "--frontend", "jsonl", "--out", tmp_path / "out")  # fmt: skip
        events = Lines(worker.stdout)
        assert events.wait_for('"event": "stage_finished"'), "".join(events.lines) + worker.stderr.read()
        doomed.send_signal(signal.SIGKILL)
        assert worker.wait(timeout=60) == 0, worker.stderr.read()
    names = {url.split("://")[1] for url in (doomed_url, spare_url)}
    job_events = [event for event in map(json.loads, events.text().splitlines()) if "job" in event and event["event"] != "job_queued"]
    assert job_events and {event["server"] for event in job_events} <= names
    assert any(event["event"] == "server_down" and event["url"] == doomed_url for event in map(json.loads, events.lines))
    for job in map(store.get, (job.id for job in jobs)):
        assert job.state is JobState.DONE
        assert sorted(path.parent.name for path in job.folder.rglob("*.png")) == ["01-txt2img", "02-img2img"]


def test_sdjobs_run_s_own_jobs_run_on_both_servers_and_end_it(store, tmp_path) -> None:
    with SimulatedWebUI(SimSettings(step_time=0.001)) as desk, SimulatedWebUI(SimSettings(step_time=0.001)) as rented:
        [other] = store.add([job_spec(name="someone else's")])
        lanes, _ = make_lanes({"desk": desk.url, "rented": rented.url}, tmp_path / "out")
        worker = Worker(store, lanes=lanes, add=[job_spec(name=f"own{n}") for n in range(4)], idle_poll=0.05)
        Background(worker.run).join(timeout=30)
        assert {store.get(job_id).server for job_id in worker.outcomes} <= {desk.url, rented.url}
    assert len(worker.outcomes) == 4 and set(worker.outcomes.values()) == {JobState.DONE}
    assert store.get(other.id).state is JobState.QUEUED  # `sdjobs run` runs its own jobs alone


def test_a_hand_back_returns_every_running_job_to_the_queue(store, tmp_path) -> None:
    with SimulatedWebUI(SimSettings(stepping=True)) as desk, SimulatedWebUI(SimSettings(stepping=True)) as rented:
        jobs = store.add([job_spec(name="sea"), job_spec(name="sky")])
        lanes, log = make_lanes({"desk": desk.url, "rented": rented.url}, tmp_path / "out")
        worker = Worker(store, lanes=lanes, idle_poll=0.05)
        working = Background(worker.run)
        for name in ("desk", "rented"):
            assert log.wait_for("stage_started", lambda call, name=name: call["status"].server == name, timeout=10)
        worker.hand_back()
        for sim in (desk, rented):
            sim.release(10_000)  # an interrupt, if any, finishes the step that waits
        working.join(timeout=20)
    assert worker.outcomes == {} and exit_status(worker) == 143
    assert [(job.state, job.attempts) for job in map(store.get, (job.id for job in jobs))] == [(JobState.QUEUED, 1)] * 2
    assert worker.handed_back is not None and worker.handed_back.waiting + (worker.handed_back.job is not None) == 2


def test_until_empty_stops_when_the_jobs_left_wait_for_a_server_down_past_the_wait(store, tmp_path, closed_port_url) -> None:
    with SimulatedWebUI(SimSettings(step_time=0.001, catalog=SDXL)) as sdxl:
        [job] = store.add([ADETAILER])  # only a server with ADetailer can run it; the one that might is down
        lanes, log = make_lanes({"gone": closed_port_url, "sdxl": sdxl.url}, tmp_path / "out", health_interval=0.1)
        for lane in lanes.lanes:
            lane.runner.settings = attrs.evolve(lane.runner.settings, wait_for_webui=0.5)
        worker = Worker(store, lanes=lanes, until_empty=True, idle_poll=0.05)
        Background(worker.run).join(timeout=10)
    assert worker.gave_up and exit_status(worker) == 1 and worker.outcomes == {}
    assert store.get(job.id).state is JobState.QUEUED and store.get(job.id).attempts == 0
    assert [call["server"] for name, call in log.calls if name == "server_down"] == ["gone"]
