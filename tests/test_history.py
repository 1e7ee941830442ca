"""`sdjobs.history`: a server's costs learned from the stages in the store, the prior of a running
stage and the price of a job before it starts.  Fake clocks for the model; a real SQLite file;
the real simulator over HTTP where a job runs."""

from __future__ import annotations

import json
import math
import re
import time

import attrs
import pytest
from process_helpers import sdjobs
from runner_helpers import FAST, Background, job_spec, make_runner
from sdjobs.clock import FakeClock
from sdjobs.sim import SimSettings
from sdjobs import hookimpl
from sdjobs.history import CostModel, ServerHistory, plan_queue, queue_end
from sdjobs.progress import PassShape, RequestShape, StageTracker
from sdjobs.spec import JobSpec
from sdjobs.sqlite_store import SQLiteStore
from sdjobs.status import JobState, StageResult
from sdjobs.store import JobRecord
from sdjobs.testing import idle_sample, sample
from sdjobs.worker import Worker
from test_kill import job_file

SERVER = "http://gpu-box:7860"
START = 1_700_000_000.0
MPX = 1024 * 1024


def timing(*rates: tuple[int, float], warmup: float = 1.0, tail: float = 0.5, between: float = 0.1, faces=(),
           detection=None, leads=()) -> dict:  # fmt: skip
    """A stage's `timing` with one pass per `(pixels, seconds per step)`: a decode `between` passes, the `tail`
    after the last until the answer."""
    return {
        "rates": [[pixels, 1, rate] for pixels, rate in rates],
        "warmups": [warmup],
        "leads": [list(lead) for lead in leads],
        "tails": [[rates[-1][0], 1, tail]],
        "handoffs": [],
        "betweens": [[pixels, 1, between] for pixels, _ in rates[:-1]] or [[rates[-1][0], 1, between]],
        "detections": [] if detection is None else [detection],
        "faces": list(faces),
        "requests": [],
    }


# -- what a stage's tracker keeps for the history ---------------------------------------------


def test_a_stage_keeps_its_step_rate_warm_up_and_the_tail_until_the_answer():
    tracker = StageTracker(shape=RequestShape((PassShape(10, pixels=768 * 768, batch=2),)))
    tracker.request_sent(0.0, baseline=idle_sample(), task_mode=False)
    tracker.fold(sample(0, 10), None, 0.5)
    for step in range(1, 10):  # step 1 shows at 4 s (3 s of warm-up, then 1 s a step), step 9 at 12 s
        tracker.fold(sample(step, 10), None, 3.0 + step)
    tracker.request_returned(14.5)  # decoded and saved 2.5 s after the last step showed
    kept = tracker.timing()
    assert kept["rates"] == [[768 * 768, 2, pytest.approx(1.0)]]
    assert kept["warmups"] == [pytest.approx(1.5)]  # from the first sample (0.5 s) to step 1 (two steps' work) at 4 s
    assert kept["tails"] == [[768 * 768, 2, pytest.approx(2.5), 2]]  # its answer carried 2 images
    assert kept["requests"] == [14.5]


def test_a_stage_keeps_each_detection_and_the_faces_of_each_image_zero_where_the_count_never_rose():
    face = PassShape(4, kind="face")
    tracker = StageTracker(shape=RequestShape((PassShape(4),), iterations=2, face=face))
    tracker.request_sent(0.0, baseline=idle_sample(), task_mode=False)
    for step, now in ((1, 1.0), (2, 2.0), (3, 3.0)):
        tracker.fold(sample(step, 4, job_count=2), None, now)
    tracker.fold(sample(0, 4, job_no=1, job_count=2), None, 4.0)  # the first image ended
    tracker.fold(sample(0, 4, job_no=1, job_count=4), None, 5.5)  # two faces found, 1.5 s later
    for job_no, start in ((1, 7.0), (2, 11.0), (3, 15.0)):  # the faces, then the second image
        for step in (1, 2, 3):
            tracker.fold(sample(step, 4, job_no=job_no, job_count=4), None, start + step)
    tracker.request_returned(20.0)  # no face in the second image: the count stayed at 4
    kept = tracker.timing()
    assert kept["detections"] == [pytest.approx(1.5)]
    assert kept["faces"] == [2, 0]
    # the first face began at 5.5 s and showed step 1 (two steps of 1 s done) at 8 s: 0.5 s more
    assert kept["leads"][0] == ["face", pytest.approx(0.5)]


def test_steps_too_quick_to_time_two_are_kept_as_the_whole_request_per_step():
    tracker = StageTracker(shape=RequestShape((PassShape(10, pixels=512 * 512),)))
    tracker.request_sent(0.0, baseline=idle_sample(), task_mode=False)
    tracker.fold(sample(4, 10), None, 1.0)  # the one sample the polls caught
    tracker.request_returned(2.0)
    assert tracker.timing()["rates"] == [[512 * 512, 1, pytest.approx(0.2)]]


def test_a_stage_that_never_showed_its_job_keeps_nothing():
    tracker = StageTracker()
    tracker.request_sent(0.0, baseline=idle_sample(), task_mode=False)
    tracker.fold(idle_sample(), None, 1.0)
    tracker.request_returned(2.0)
    assert tracker.timing() is None


# -- the cost model ----------------------------------------------------------------------------


def test_step_cost_follows_the_sizes_seen_between_them_and_their_nearest_slope_beyond():
    model = CostModel.fit([timing((MPX // 4, 0.025), (MPX, 0.040)), timing((4 * MPX, 0.309))])
    assert model.seconds_per_step(MPX // 4, 1) == pytest.approx(0.025)  # the launch-bound floor, as seen
    slope = math.log(0.309 / 0.040) / math.log(4)
    assert model.seconds_per_step(2 * MPX, 1) == pytest.approx(0.040 * 2**slope)  # log-log between
    assert model.seconds_per_step(16 * MPX, 1) == pytest.approx(0.309 * 4**slope)  # growing as it last grew
    assert model.seconds_per_step(MPX, 4) == model.seconds_per_step(4 * MPX, 1)  # a batch is more work


def test_a_flat_stretch_of_sizes_seen_does_not_price_a_far_larger_pass_as_cheap():
    model = CostModel.fit([timing((MPX // 4, 0.030), (MPX, 0.029))])  # a launch-bound floor, noisy
    assert model.seconds_per_step(4 * MPX, 1) > model.seconds_per_step(MPX, 1)
    assert model.seconds_per_step(MPX // 16, 1) == pytest.approx(0.030)  # below: the floor


def test_the_model_takes_the_median_of_what_it_saw_at_one_size():
    model = CostModel.fit([timing((MPX, rate), warmup=w) for rate, w in ((1.0, 2.0), (9.0, 3.0), (2.0, 4.0))])
    assert model.seconds_per_step(MPX, 1) == 2.0
    assert model.warmup() == 3.0
    assert model.stages == 3


def test_faces_per_image_are_averaged_and_assumed_rounded():
    model = CostModel.fit([timing((MPX, 1.0), faces=(3, 2), detection=0.4), timing((MPX, 1.0), faces=(3,))])
    assert model.faces == pytest.approx(8 / 3)
    assert model.assumed_faces() == 3
    assert model.detection() == 0.4


def test_a_request_is_priced_pass_by_pass():
    leads = (("face", 0.3), ("main", 0.2))
    model = CostModel.fit([timing((MPX, 0.5), warmup=2.0, tail=1.0, between=0.25, faces=(2,), detection=0.5, leads=leads)])
    face = PassShape(4, MPX, kind="face")
    shape = RequestShape((PassShape(20, MPX),), iterations=2, face=face)
    per_image = 20 * 0.5 + 0.25 + 0.5 + 2 * (0.3 + 4 * 0.5 + 0.25)  # steps, decode, detection, two faces
    answer = 2 * (1.0 - 0.25)  # after its decode, the answer's two images take twice what the one seen took
    assert model.request_seconds(shape) == pytest.approx(2.0 + 2 * per_image + 0.2 + answer)  # the second image's lead


def test_the_tail_after_the_last_step_is_the_decode_and_then_each_image_the_answer_carries():
    model = CostModel.fit([timing((MPX, 0.5), tail=0.5, between=0.1)])  # a one-image answer: 0.4 s beyond its decode
    assert model.tail(MPX, 1, 1) == pytest.approx(0.5)
    assert model.tail(MPX, 1, 4) == pytest.approx(0.1 + 4 * 0.4)  # n_iter 4: one decode after the last step
    assert model.tail(MPX, 4, 4) == pytest.approx(4 * 0.1 + 4 * 0.4)  # batch 4: the decode is four images'


def test_nothing_timed_is_no_model():
    assert CostModel.fit([None, {"rates": []}]) is None


# -- the history of a server, from the store ---------------------------------------------------


def four_steps(steps: int = 4, **stage_settings) -> JobSpec:
    return JobSpec.from_mapping(
        {
            "name": "lighthouse",
            "seed": 1,
            "settings": {"steps": steps, "width": 1024, "height": 1024},
            "stages": [{"type": "txt2img", **stage_settings}],
        }
    )


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(START)


@pytest.fixture
def store(tmp_path, clock):
    with SQLiteStore(tmp_path / "queue.db", clock=clock) as store:
        yield store


def ran(store, clock, spec: JobSpec, stage_timing: dict | None, *, elapsed: float, server: str = SERVER,
        between: float = 0.0, infos=({},)) -> None:  # fmt: skip
    """`spec` (one stage) run on `server`: the stage took `elapsed`, the job `between` more."""
    worker = store.register_worker()
    [record] = store.add([spec])
    assert store.claim(worker.id, server=server).id == record.id
    result = StageResult("txt2img", 0, infos=infos, started_at=clock(), elapsed=elapsed, timing=stage_timing)
    store.record_stage(record.id, worker.id, result)
    clock.advance(elapsed + between)
    store.finish(record.id, worker.id, JobState.DONE)


def test_a_server_with_no_timed_stage_has_no_history(store, clock):
    ran(store, clock, four_steps(), None, elapsed=3.0)
    assert ServerHistory.load(store, SERVER) is None


def test_history_is_learned_per_server(store, clock):
    ran(store, clock, four_steps(), timing((MPX, 1.0)), elapsed=5.0, server="http://other:7860")
    ran(store, clock, four_steps(), timing((MPX, 0.25)), elapsed=3.0)
    history = ServerHistory.load(store, SERVER)
    assert history.model_for(four_steps(), 0).seconds_per_step(MPX, 1) == 0.25
    assert ServerHistory.load(store, "http://never-used:7860") is None


def test_a_job_is_priced_at_what_such_stages_took_with_the_time_between_stages(store, clock):
    stage = timing((MPX, 0.5), warmup=1.0, tail=1.0)  # 4 steps: 1 + 2 + 1 = 4 s priced
    for _ in range(3):
        ran(store, clock, four_steps(), stage, elapsed=6.0, between=0.5)  # took 1.5 times the price
    estimate = ServerHistory.load(store, SERVER).estimate(four_steps())
    assert estimate.sure
    assert estimate.seconds == pytest.approx(6.0 + 0.5)
    assert ServerHistory.load(store, SERVER).estimate(four_steps(8)).seconds > estimate.seconds


def test_few_stages_or_a_size_never_seen_give_a_range(store, clock):
    ran(store, clock, four_steps(), timing((MPX, 0.5)), elapsed=4.0)
    estimate = ServerHistory.load(store, SERVER).estimate(four_steps())
    assert estimate.low < estimate.seconds < estimate.high
    for _ in range(2):
        ran(store, clock, four_steps(), timing((MPX, 0.5)), elapsed=4.0)
    history = ServerHistory.load(store, SERVER)
    assert history.estimate(four_steps()).sure
    huge = JobSpec.from_mapping({"name": "huge", "seed": 1, "settings": {"steps": 4, "width": 4096, "height": 4096},
                                 "stages": [{"type": "txt2img"}]})  # fmt: skip
    assert not history.estimate(huge).sure


def test_each_checkpoint_has_its_costs_and_a_job_naming_none_gets_the_latest_used(store, clock):
    ran(store, clock, four_steps(checkpoint="sdxl_base.safetensors [31e35c80fc]"), timing((MPX, 0.06)), elapsed=1.0)
    ran(store, clock, four_steps(), timing((MPX, 0.04)), elapsed=1.0, infos=({"sd_model_name": "dreamshaper_8"},))
    history = ServerHistory.load(store, SERVER)
    assert history.model_for(four_steps(checkpoint="sdxl_base"), 0).seconds_per_step(MPX, 1) == 0.06
    assert history.model_for(four_steps(), 0).seconds_per_step(MPX, 1) == 0.04
    assert history.model_for(four_steps(checkpoint="never_used"), 0).seconds_per_step(MPX, 1) == 0.05  # pooled


def test_adetailer_s_faces_make_the_estimate_a_range_from_the_fewest_to_the_most_found():
    model = CostModel.fit([timing((MPX, 0.5), faces=(0, 3, 1), detection=0.5)] * 3)
    history = ServerHistory(SERVER, {None: model}, stages=3)
    faces = JobSpec.from_mapping({"name": "faces", "seed": 1, "settings": {"steps": 4, "width": 1024, "height": 1024},
                                  "stages": [{"type": "txt2img"}, {"type": "adetailer", "ad_model": "face_yolov8n.pt"}]})  # fmt: skip
    shape = RequestShape.for_stage(faces.stages[1], faces.plan()[1])
    none, three = (model.request_seconds(shape, n) for n in (0, 3))
    estimate = history.estimate(faces)
    assert estimate.low < estimate.seconds < estimate.high  # as many as usual (4/3 an image) in between
    assert estimate.high - estimate.low == pytest.approx(three - none)
    assert history.estimate(four_steps()).sure  # no ADetailer: no range
    once = CostModel.fit([timing((MPX, 0.5), faces=(2,), detection=0.5)] * 2)  # two images, two faces each
    assert once.face_range == (0, 2)  # too few images to say that none is rare


# -- a real run: the first job's stages teach the second job's ETA -----------------------------


@pytest.fixture
def sim_settings() -> SimSettings:
    """Steps slow enough for the poller (every 0.02 s) to time them."""
    return SimSettings(step_time=0.05, first_step_time=0.05)


def first_eta_step(statuses) -> int | None:
    """The step of the first progress status that showed an ETA."""
    return next((status.step for status in statuses if status.eta is not None), None)


def test_a_job_run_on_a_server_is_its_history_and_the_next_job_has_an_eta_before_two_steps(webui_client, queue_file, tmp_path):
    with SQLiteStore(queue_file) as store:
        [first] = store.add([job_spec(name="first", steps=8)])
        runner, log = make_runner(webui_client, [], tmp_path / "out")
        Background(Worker(store, runner, until_empty=True).run).join(timeout=30)
        assert store.get(first.id).stages[0].timing["rates"]
        history = ServerHistory.load(store, webui_client.base_url)
        assert history is not None and history.estimate(job_spec(steps=8)).seconds > 0
        assert first_eta_step(log.statuses()) >= 2  # no history yet: "calculating..." until two steps were timed

        [second] = store.add([job_spec(name="second", steps=8)])
        runner, log = make_runner(webui_client, [], tmp_path / "out")
        Background(Worker(store, runner, until_empty=True).run).join(timeout=30)
        assert store.get(second.id).state is JobState.DONE
        assert first_eta_step(log.statuses()) < 2


# -- what the commands say: `sdjobs check` and `sdjobs queue list` -------------------------------


def test_check_and_queue_list_price_jobs_by_the_servers_history(webui_client, queue_file, tmp_path):
    job = job_file(tmp_path, "sea", stages=2)
    url = webui_client.base_url
    before = sdjobs("check", job, "--webui", url)
    assert before.returncode == 0, before.stderr
    assert "  expected duration: unknown: no history for this server yet\n" in before.stdout
    assert not queue_file.exists()  # checking made no queue

    with SQLiteStore(queue_file) as store:
        store.add([job_spec(name="first", steps=8, denoising_strength=0.5) for _ in range(1)])
        runner, _ = make_runner(webui_client, [], tmp_path / "out")
        Background(Worker(store, runner, until_empty=True).run).join(timeout=30)
    after = sdjobs("check", job, "--webui", url)
    assert re.search(r"\n  expected duration: (about \d+s|\d+s to \d+s)\n", after.stdout), after.stdout
    [checked] = json.loads(sdjobs("check", job, "--webui", url, "--json").stdout)
    assert 0 < checked["expected"]["low"] <= checked["expected"]["seconds"] <= checked["expected"]["high"]

    assert sdjobs("queue", "add", job, job, job).returncode == 0
    jobs = json.loads(sdjobs("queue", "list", "--webui", url, "--json").stdout)["jobs"]
    assert [job["expected"] for job in jobs] == [checked["expected"]] * 3
    for earlier, later in zip(jobs, jobs[1:]):
        assert earlier["expected_start"] < earlier["expected_end"] == later["expected_start"]
    table = sdjobs("queue", "list", "--webui", url).stdout
    assert re.search(r"\nThe last job should end at \d\d:\d\d \(in \d+s\)\.\n$", table), table
    elsewhere = sdjobs("queue", "list", "--webui", "http://127.0.0.1:9").stdout
    assert elsewhere.endswith("\nWhen the last job ends: unknown: no history for this server yet\n")


# -- the queue's plan, on one server or several ----------------------------------------------------


def priced_at(seconds_per_step: float, server: str = SERVER) -> ServerHistory:
    """A server whose history prices `four_steps()` at 4 steps of `seconds_per_step` and nothing else."""
    model = CostModel.fit([timing((MPX, seconds_per_step), warmup=0.0, tail=0.001, between=0.001)] * 3)
    return ServerHistory(server, {None: model}, stages=3)


def queued(n: int, **fields) -> JobRecord:
    return JobRecord(f"job-{n}", four_steps(), JobState.QUEUED, n, **fields)


def test_one_server_runs_the_queue_in_order_after_the_running_job():
    history = priced_at(1.0)
    job = history.estimate(four_steps()).seconds
    running = JobRecord("job-0", four_steps(), JobState.RUNNING, 0, attempts=1, started_at=START - 1.0, server=SERVER)
    planned = plan_queue([running, queued(1), queued(2, paused=True), queued(3)], {SERVER: history}, now=START, paused=False)
    assert [plan.start for plan in planned] == pytest.approx([START - 1.0, START - 1.0 + job, None, START - 1.0 + 2 * job])
    assert [plan.end for plan in planned] == pytest.approx([START - 1.0 + job, START - 1.0 + 2 * job, None, START - 1.0 + 3 * job])
    assert queue_end(planned) == pytest.approx(START - 1.0 + 3 * job)
    assert queue_end(plan_queue([queued(1)], {SERVER: history}, now=START, paused=True)) is None  # all held


def test_several_servers_each_take_the_next_job_when_free_priced_by_their_own_history():
    fast, slow = "http://fast:7860", "http://slow:7860"
    histories = {slow: priced_at(1.0, slow), fast: priced_at(0.25, fast)}
    quick, long = histories[fast].estimate(four_steps()).seconds, histories[slow].estimate(four_steps()).seconds
    assert long > 2 * quick
    running = JobRecord("job-0", four_steps(), JobState.RUNNING, 0, attempts=1, started_at=START, server=slow)
    planned = plan_queue([running, *(queued(n) for n in (1, 2, 3))], histories, now=START, paused=False)
    assert [plan.server for plan in planned] == [slow, fast, fast, slow if long < 2 * quick else fast]
    assert planned[0].end == START + long
    assert [(plan.start, plan.end) for plan in planned[1:3]] == [(START, START + quick), (START + quick, pytest.approx(START + 2 * quick))]
    assert queue_end(planned) == max(plan.end for plan in planned)


def test_a_server_with_no_history_leaves_the_queue_s_end_unknown_but_not_the_other_server_s_jobs():
    histories = {"http://new:7860": None, SERVER: priced_at(1.0)}
    planned = plan_queue([queued(n) for n in (1, 2, 3)], histories, now=START, paused=False)
    assert [plan.server for plan in planned] == ["http://new:7860", SERVER, SERVER]
    assert planned[0].estimate is None and planned[0].start == START and planned[0].end is None
    assert planned[2].start == planned[1].end is not None
    assert queue_end(planned) is None
    alone = plan_queue([queued(n) for n in (1, 2)], {"http://new:7860": None}, now=START, paused=False)
    assert [(plan.start, plan.end) for plan in alone] == [(START, None), (None, None)]  # one server: nothing after


class QueueEnds:
    """Each `sdjobs_queue_changed` a worker fires: how many jobs, and when the last should end."""

    def __init__(self) -> None:
        self.told: list[tuple[int, float | None]] = []

    @hookimpl
    def sdjobs_queue_changed(self, jobs, expected_end):
        self.told.append((len(jobs), expected_end))


def test_a_worker_tells_its_front_ends_when_the_queue_s_last_job_should_end(webui_client, queue_file, tmp_path):
    with SQLiteStore(queue_file) as store:
        store.add([job_spec(name="first", steps=8)])
        first = QueueEnds()
        runner, _ = make_runner(webui_client, [], tmp_path / "out", plugins=[first])
        Background(Worker(store, runner, until_empty=True).run).join(timeout=30)
        assert first.told[0] == (1, None)  # no history for this server yet

        store.add([job_spec(name=name, steps=8) for name in ("second", "third")])
        each = ServerHistory.load(store, webui_client.base_url).estimate(job_spec(steps=8)).seconds
        then = QueueEnds()
        runner, _ = make_runner(webui_client, [], tmp_path / "out", plugins=[then])
        before = time.time()
        Background(Worker(store, runner, until_empty=True).run).join(timeout=30)
        jobs, end = then.told[0]
        assert jobs == 2 and before + 2 * each <= end <= time.time() + 2 * each
        assert then.told[-1] == (0, None)  # nothing left to run


def test_a_long_decode_the_history_expects_is_no_stall(webui_client, queue_file, tmp_path):
    """At 2048² the simulator decodes for about 16 steps' time after the last step, then encodes the
    image: without history a stall (the run expects a decode of half a step); once a job has shown
    it, no stall, even with `stall_after` far shorter than the decode."""
    settings = attrs.evolve(FAST, stall_after=0.4)
    stalls = {}
    with SQLiteStore(queue_file) as store:
        for name in ("first", "second"):
            store.add([job_spec(name=name, steps=4, width=2048, height=2048)])
            runner, log = make_runner(webui_client, [], tmp_path / "out", settings=settings)
            Background(Worker(store, runner, until_empty=True).run).join(timeout=60)
            stalls[name] = log.names().count("job_stalled")
        assert [job.state for job in store.history()] == [JobState.DONE, JobState.DONE]
    assert stalls == {"first": 1, "second": 0}


def test_queue_list_with_several_servers_plans_each_job_on_one_and_names_it(webui_client, queue_file, tmp_path):
    url, new = webui_client.base_url, "http://127.0.0.1:9"
    with SQLiteStore(queue_file) as store:
        store.add([job_spec(name="first", steps=8)])
        runner, _ = make_runner(webui_client, [], tmp_path / "out")
        Background(Worker(store, runner, until_empty=True).run).join(timeout=30)
        store.add([job_spec(name=name, steps=8) for name in ("a", "b", "c")])
    listed = json.loads(sdjobs("queue", "list", "--webui", url, "--webui", new, "--json").stdout)
    here = url.split("://", 1)[1]  # a server given by URL is named HOST:PORT
    assert [job["expected_server"] for job in listed["jobs"]] == [here, "127.0.0.1:9", here]
    first, unknown, third = listed["jobs"]
    assert unknown["expected"] is None and unknown["expected_end"] is None  # no history there: it keeps that server
    assert third["expected_start"] == first["expected_end"]  # the next job waits for the server that knows
    assert listed["expected_end"] is None
    table = sdjobs("queue", "list", "--webui", url, "--webui", new).stdout
    assert table.endswith("\nWhen the last job ends: unknown: no history for a server yet\n"), table
    assert re.match(r"#\s+id\s+name\s+stages\s+state\s+attempts\s+expected\s+start\s+end\s+server\n", table), table
