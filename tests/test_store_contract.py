"""The store's contract: what every backend does, tested once, run against each backend.

A backend joins by adding itself to `BACKENDS`: a way to make a fresh, empty
store location and to open a store there (several opened on one location are
several processes sharing it).  Everything else here runs unchanged.  The
PostgreSQL backend runs on the session's throwaway server (`postgres_url`), each
location a schema of its own.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule, run_state_machine_as_test

from sdjobs.clock import FakeClock
from sdjobs.expand import load_jobs
from sdjobs.spec import JobSpec
from sdjobs.sqlite_store import SQLiteStore
from sdjobs.status import CancelMode, JobState, StageResult
from sdjobs.store import MIN_PREFIX, InvalidState, JobRecord, NotHeld, Store, UnknownJob, WorkerInfo
from sdjobs.testing import job_specs

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
LEASE = 60.0
START = 1_700_000_000.0


@attrs.frozen
class Backend:
    """How the contract reaches one backend.

    Attributes:
        fresh: A new, empty location.
        open: Open a store at a location, with a clock and this machine's name.
    """

    fresh: Callable[[], Any]
    open: Callable[..., Store]


def sqlite_backend(folder: Path) -> Backend:
    numbers = itertools.count()
    return Backend(
        fresh=lambda: folder / f"queue-{next(numbers)}.db",
        open=lambda location, *, clock, host="here": SQLiteStore(location, lease=LEASE, clock=clock, host=host),
    )


def postgres_backend(request: pytest.FixtureRequest) -> Backend:
    from sdjobs.postgres_server import fresh_url
    from sdjobs.postgres_store import PostgresStore, migrate

    server = request.getfixturevalue("postgres_url")

    def fresh() -> str:
        url = fresh_url(server)
        migrate(url)
        return url

    return Backend(
        fresh=fresh,
        open=lambda location, *, clock, host="here": PostgresStore(location, lease=LEASE, clock=clock, host=host),
    )


BACKENDS = {
    "sqlite": lambda request: sqlite_backend(request.getfixturevalue("tmp_path")),
    "postgres": postgres_backend,
}


@pytest.fixture(params=sorted(BACKENDS))
def backend(request) -> Backend:
    return BACKENDS[request.param](request)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(START)


@pytest.fixture
def location(backend):
    return backend.fresh()


@pytest.fixture
def connect(backend, location, clock) -> Iterator[Callable[..., Store]]:
    """Open another store on the same location: another process, as far as the store can tell."""
    opened: list[Store] = []

    def connect(**options: Any) -> Store:
        opened.append(backend.open(location, clock=clock, **options))
        return opened[-1]

    yield connect
    for store in opened:
        store.close()


@pytest.fixture
def store(connect) -> Store:
    return connect()


@pytest.fixture
def worker(store) -> WorkerInfo:
    return store.register_worker()


def spec(name: str = "cat", *later: str, seed: int = 1234) -> JobSpec:
    stages = [{"type": "txt2img"}] + [
        {"type": kind, **({"upscaler": "Lanczos"} if kind == "upscale" else {})} for kind in later
    ]
    return JobSpec.from_mapping({"name": name, "seed": seed, "stages": stages})


def result(index: int, kind: str, *, partial: bool = False, folder: Path = Path("/out/job")) -> StageResult:
    image = folder / f"{index + 1:02d}-{kind}" / "001.png"
    info = {"seed": 1234, "all_seeds": [1234], "infotexts": ["a cat"]}
    timing = {"rates": [[512 * 512, 1, 0.03]], "warmups": [0.4], "faces": [2, 0]}  # what the history learns from
    return StageResult(kind, index, (image,), (info,), (1234,), START + index, 2.5, partial, timing=timing)


def ids(records: list[JobRecord]) -> list[str]:
    return [record.id for record in records]


# --------------------------------------------------------------------------
# Values the store keeps: specs and stage results survive storage
# --------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)


@given(spec=job_specs(), extra=st.dictionaries(st.text(max_size=8), json_values, max_size=3), checkpoint=st.none() | st.text(min_size=1))
def test_a_spec_read_back_from_json_equals_the_one_submitted(spec, extra, checkpoint):
    stages = (attrs.evolve(spec.stages[0], extra=extra), *spec.stages[1:])
    spec = attrs.evolve(spec, stages=stages, checkpoint=checkpoint, source=Path("jobs/cat.toml"))
    assert JobSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.toml")), ids=lambda path: path.name)
def test_every_example_job_survives_storage(path):
    for spec in load_jobs(path):
        assert JobSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


def test_a_stage_result_read_back_from_json_equals_the_one_recorded():
    recorded = result(1, "img2img", partial=True)
    assert StageResult.from_dict(json.loads(json.dumps(recorded.to_dict()))) == recorded


# --------------------------------------------------------------------------
# Adding and reading
# --------------------------------------------------------------------------


def test_added_jobs_queue_in_order_with_their_specs_as_submitted(store, clock):
    first, second = spec("cat", "img2img"), spec("dog", "upscale", seed=99)
    added = store.add([first, second, first])
    assert [job.spec for job in added] == [first, second, first]
    assert len(set(ids(added))) == 3, "the same spec twice makes two jobs"
    assert all(job.state is JobState.QUEUED and job.attempts == 0 and job.added_at == START for job in added)
    assert added[0].position < added[1].position < added[2].position
    assert store.list() == added
    assert [store.get(job.id) for job in added] == added


def test_a_job_id_is_random_hex_and_found_by_a_unique_prefix(store):
    [job] = store.add([spec()])
    assert len(job.id) == 32 and int(job.id, 16) >= 0
    assert store.get(job.short_id) == job
    with pytest.raises(UnknownJob, match="no job"):
        store.get(job.id[:3])  # too short to stand for it
    with pytest.raises(UnknownJob, match="no job"):
        store.get("0" * 32 if job.id != "0" * 32 else "1" * 32)


def test_a_thousand_jobs_added_in_the_same_instant_get_a_thousand_ids(store):
    """Under a clock-based id (second + name + 16 random bits) 1000 ids collide with p > 0.999."""
    added = store.add([spec()] * 1000)
    assert len(set(ids(added))) == 1000
    assert [store.get(job.id) for job in added[::100]] == added[::100]


def test_a_second_store_on_the_same_location_sees_the_same_jobs(store, connect):
    added = store.add([spec(), spec("dog")])
    assert connect().list() == added


# --------------------------------------------------------------------------
# Claiming
# --------------------------------------------------------------------------


def test_claims_take_jobs_by_priority_then_position(store, worker):
    low, high, later_high = store.add([spec("low")]), store.add([spec("high")], priority=5), store.add([spec("x")], priority=5)
    assert ids(store.list()) == ids(high + later_high + low)
    claimed = [store.claim(worker.id) for _ in range(4)]
    assert [job and job.id for job in claimed] == [*ids(high + later_high + low), None]


def test_a_claimed_job_runs_on_its_worker_and_server_without_credentials(store, worker, clock):
    [queued] = store.add([spec()])
    clock.advance(5)
    job = store.claim(worker.id, server="http://user:secret@studio:7860")
    assert (job.id, job.state, job.worker, job.attempts, job.started_at) == (queued.id, JobState.RUNNING, worker.id, 1, START + 5)
    assert job.server == "http://studio:7860"
    assert store.list() == [job]


def test_a_claim_restricted_to_ids_takes_only_those_even_from_a_paused_queue(store, worker):
    others, mine = store.add([spec(), spec()]), store.add([spec("mine"), spec("mine")])
    store.pause()
    assert store.claim(worker.id) is None
    assert store.claim(worker.id, ids=[mine[1].id, mine[0].id]).id == mine[0].id
    assert store.claim(worker.id, ids=ids(mine)).id == mine[1].id
    assert store.claim(worker.id, ids=ids(mine)) is None
    store.resume()
    assert store.claim(worker.id).id == others[0].id


def test_a_paused_job_waits_until_it_is_resumed(store, worker):
    held, free = store.add([spec()], paused=True), store.add([spec()])
    assert store.get(held[0].id).paused
    assert store.claim(worker.id).id == free[0].id
    assert store.claim(worker.id) is None
    assert store.claim(worker.id, ids=ids(held)) is None
    store.resume(held[0].id)
    assert store.claim(worker.id).id == held[0].id


def test_the_queue_pause_is_shared_by_every_store_on_it(store, connect):
    connect().pause()
    assert store.queue_paused()
    store.resume()
    assert not connect().queue_paused()


def test_a_job_owned_by_a_living_worker_is_left_to_it_until_that_worker_leaves(store, connect):
    runner, worker = store.register_worker(), connect().register_worker()
    [owned] = store.add([spec("run's")], owner=runner.id)
    assert store.get(owned.id).owner == runner.id
    assert store.claim(worker.id) is None
    store.unregister_worker(runner.id)
    assert store.claim(worker.id).id == owned.id


def test_the_owner_claims_its_own_job_without_naming_it(store, worker):
    [owned] = store.add([spec()], owner=worker.id)
    assert store.claim(worker.id).id == owned.id


def test_threads_sharing_one_store_never_claim_the_same_job(store):
    added = ids(store.add([spec()] * 40))
    workers = [store.register_worker() for _ in range(4)]
    start = threading.Barrier(len(workers))
    claimed: list[list[str]] = [[] for _ in workers]

    def drain(number: int) -> None:
        start.wait(timeout=30)
        while (job := store.claim(workers[number].id)) is not None:
            claimed[number].append(job.id)

    threads = [threading.Thread(target=drain, args=(number,)) for number in range(len(workers))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
        assert not thread.is_alive()
    assert sorted(sum(claimed, [])) == sorted(added)


def test_an_unregistered_worker_claims_nothing(store, worker):
    store.add([spec()])
    store.unregister_worker(worker.id)
    with pytest.raises(NotHeld, match="not registered"):
        store.claim(worker.id)


# --------------------------------------------------------------------------
# Stages, finishing, releasing
# --------------------------------------------------------------------------


def test_stages_are_recorded_in_order_and_never_twice(store, worker):
    [queued] = store.add([spec("cat", "img2img", "upscale")])
    job = store.claim(worker.id)
    with pytest.raises(InvalidState, match="expected stage 1 \\(txt2img\\)"):
        store.record_stage(job.id, worker.id, result(1, "img2img"))
    first = result(0, "txt2img")
    job = store.record_stage(job.id, worker.id, first)
    assert (job.stages, job.next_stage) == ((first,), 1)
    with pytest.raises(InvalidState, match="expected stage 2 \\(img2img\\), got stage 1"):
        store.record_stage(job.id, worker.id, first)
    with pytest.raises(InvalidState, match="expected stage 2 \\(img2img\\)"):
        store.record_stage(job.id, worker.id, result(1, "upscale"))
    assert store.get(queued.id).stages == (first,)


def test_a_partial_stage_is_replaced_when_the_stage_runs_again(store, worker):
    store.add([spec("cat", "img2img")])
    job = store.claim(worker.id)
    store.record_stage(job.id, worker.id, result(0, "txt2img"))
    partial = store.record_stage(job.id, worker.id, result(1, "img2img", partial=True))
    assert partial.next_stage == 1 and partial.stages[-1].partial
    done = store.record_stage(job.id, worker.id, result(1, "img2img"))
    assert done.next_stage == 2 and [stage.partial for stage in done.stages] == [False, False]
    with pytest.raises(InvalidState, match="expected no stage"):
        store.record_stage(job.id, worker.id, result(2, "upscale"))


def test_a_finished_job_leaves_the_queue_for_the_history(store, worker, clock):
    [queued] = store.add([spec()])
    job = store.claim(worker.id)
    clock.advance(30)
    ended = store.finish(job.id, worker.id, JobState.FAILED, "stage 1 (txt2img): 500 from the server")
    assert (ended.state, ended.error, ended.ended_at, ended.worker) == (
        JobState.FAILED, "stage 1 (txt2img): 500 from the server", START + 30, None
    )  # fmt: skip
    assert store.list() == [] and store.history() == [ended]


def test_a_job_finishes_only_with_an_outcome(store, worker):
    store.add([spec()])
    job = store.claim(worker.id)
    with pytest.raises(ValueError, match="not running"):
        store.finish(job.id, worker.id, JobState.RUNNING)


def test_only_the_holding_worker_records_finishes_or_releases(store, connect):
    holder, other = store.register_worker(), connect().register_worker()
    store.add([spec()])
    job = store.claim(holder.id)
    for attempt in (
        lambda: store.record_stage(job.id, other.id, result(0, "txt2img")),
        lambda: store.finish(job.id, other.id, JobState.DONE),
        lambda: store.release(job.id, other.id),
        lambda: store.set_folder(job.id, other.id, Path("/out/x")),
    ):
        with pytest.raises(NotHeld, match=f"not held by worker {other.id[:8]}"):
            attempt()
    store.finish(job.id, holder.id, JobState.DONE)
    with pytest.raises(NotHeld, match="done"):
        store.finish(job.id, holder.id, JobState.DONE)


def test_a_released_job_resumes_first_at_its_first_unfinished_stage(store, worker):
    [queued, after] = store.add([spec("cat", "img2img"), spec("dog")])
    job = store.claim(worker.id, server="http://a:7860")
    first = result(0, "txt2img")
    store.record_stage(job.id, worker.id, first)
    released = store.release(job.id, worker.id)
    assert (released.state, released.worker, released.position, released.stages) == (JobState.QUEUED, None, queued.position, (first,))
    again = store.claim(worker.id, server="http://b:7860")
    assert (again.id, again.attempts, again.next_stage, again.server) == (queued.id, 2, 1, "http://b:7860")
    assert again.lost_server is None, "a released request was interrupted by its own worker"


def test_a_folder_is_recorded_once(store, worker):
    store.add([spec()])
    job = store.claim(worker.id)
    assert store.set_folder(job.id, worker.id, Path("/out/a")).folder == Path("/out/a")
    assert store.set_folder(job.id, worker.id, Path("/out/a")).folder == Path("/out/a")
    with pytest.raises(InvalidState, match="already writes into"):
        store.set_folder(job.id, worker.id, Path("/out/b"))
    store.release(job.id, worker.id)
    assert store.claim(worker.id).folder == Path("/out/a")


# --------------------------------------------------------------------------
# Cancelling
# --------------------------------------------------------------------------


def test_a_queued_job_cancelled_ends_at_once(store, worker):
    [job, other] = store.add([spec(), spec()])
    cancelled = store.request_cancel(job.id, CancelMode.AFTER_STAGE)
    assert (cancelled.state, cancelled.cancel, cancelled.ended) == (JobState.CANCELLED, CancelMode.AFTER_STAGE, True)
    assert ids(store.list()) == [other.id] and store.claim(worker.id).id == other.id


def test_a_running_jobs_cancel_is_read_by_its_worker_and_only_grows_more_urgent(store, worker):
    store.add([spec()])
    job = store.claim(worker.id)
    assert store.cancel_requested(job.id) is None
    assert store.request_cancel(job.id, CancelMode.AFTER_STAGE).state is JobState.RUNNING
    store.request_cancel(job.id, CancelMode.AFTER_JOB)
    assert store.cancel_requested(job.id) is CancelMode.AFTER_STAGE
    store.request_cancel(job.id, CancelMode.NOW)
    assert store.cancel_requested(job.id) is CancelMode.NOW


def test_an_ended_job_cannot_be_cancelled(store, worker):
    store.add([spec()])
    job = store.claim(worker.id)
    store.finish(job.id, worker.id, JobState.DONE)
    with pytest.raises(InvalidState, match="has ended \\(done\\)"):
        store.request_cancel(job.id)


@pytest.mark.parametrize(
    ("mode", "state"),
    [(CancelMode.NOW, JobState.CANCELLED), (CancelMode.AFTER_STAGE, JobState.CANCELLED), (CancelMode.AFTER_JOB, JobState.QUEUED)],
)
def test_a_released_job_with_a_cancel_that_stops_it_ends_cancelled(store, worker, mode, state):
    store.add([spec()])
    job = store.claim(worker.id)
    store.request_cancel(job.id, mode)
    assert store.release(job.id, worker.id).state is state


def test_pause_now_recalls_the_running_jobs_it_holds_back_until_they_are_released(store, connect, worker):
    mine, queued = store.add([spec("mine"), spec("queued")])
    owner = connect().register_worker()
    [owned] = store.add([spec("owned")], owner=owner.id)
    store.claim(worker.id)
    store.claim(owner.id, ids=[owned.id])
    store.pause()
    assert not store.get(mine.id).recall  # a plain pause lets the running job finish
    store.pause(now=True)
    assert store.get(mine.id).recall and not store.get(owned.id).recall  # `sdjobs run`'s own job is not held back
    assert not store.get(queued.id).recall
    released = store.release(mine.id, worker.id)
    assert (released.state, released.recall) == (JobState.QUEUED, False)
    store.resume()
    job = store.claim(worker.id)
    store.pause(job.id, now=True)
    assert store.get(job.id).recall and store.get(job.id).paused
    assert not store.finish(job.id, worker.id, JobState.DONE).recall


@pytest.mark.parametrize("outcome", [JobState.FAILED, JobState.CANCELLED])
def test_a_failed_or_cancelled_job_is_retried_last_in_the_queue_from_its_first_unfinished_stage(store, worker, outcome):
    [job, other] = store.add([spec("cat", "upscale"), spec("dog")])
    store.claim(worker.id)
    store.record_stage(job.id, worker.id, result(0, "txt2img"))
    store.request_cancel(job.id)
    store.finish(job.id, worker.id, outcome, "boom" if outcome is JobState.FAILED else None)
    retried = store.retry(job.id[:MIN_PREFIX])
    assert (retried.state, retried.error, retried.cancel, retried.ended_at) == (JobState.QUEUED, None, None, None)
    assert retried.next_stage == 1 and retried.attempts == 1
    assert ids(store.list()) == [other.id, job.id] and store.history() == []


def test_only_a_failed_or_cancelled_job_is_retried(store, worker):
    [queued, done] = store.add([spec(), spec()])
    store.move(done.id, before=queued.id)
    store.finish(store.claim(worker.id).id, worker.id, JobState.DONE)
    for job_id, state in ((queued.id, "queued"), (done.id, "done")):
        with pytest.raises(InvalidState, match=f"is {state}: only a failed or cancelled job is retried"):
            store.retry(job_id)
    with pytest.raises(UnknownJob):
        store.retry("feedface")


# --------------------------------------------------------------------------
# Order, priority, removal, history
# --------------------------------------------------------------------------


def test_a_job_moves_before_or_after_another_taking_its_priority(store):
    a, b, c = store.add([spec("a"), spec("b"), spec("c")])
    [urgent] = store.add([spec("urgent")], priority=3)
    assert ids(store.list()) == [urgent.id, a.id, b.id, c.id]
    store.move(c.id, before=a.id)
    assert ids(store.list()) == [urgent.id, c.id, a.id, b.id]
    store.move(c.id, after=b.id)
    assert ids(store.list()) == [urgent.id, a.id, b.id, c.id]
    moved = store.move(b.id, before=urgent.id)
    assert moved.priority == 3 and ids(store.list()) == [b.id, urgent.id, a.id, c.id]
    assert store.move(a.id, after=a.id).id == a.id and ids(store.list()) == [b.id, urgent.id, a.id, c.id]
    for anchors in ({}, {"before": b.id, "after": c.id}):
        with pytest.raises(ValueError, match="^move a job either before or after another one$"):
            store.move(a.id, **anchors)


def test_ended_jobs_neither_move_nor_change_priority(store):
    job, other = store.add([spec(), spec()])
    store.request_cancel(job.id)
    with pytest.raises(InvalidState, match="has ended"):
        store.move(job.id, before=other.id)
    with pytest.raises(InvalidState, match="has ended"):
        store.move(other.id, after=job.id)
    with pytest.raises(InvalidState, match="has ended"):
        store.set_priority(job.id, 9)


def test_a_new_priority_reorders_the_queue(store):
    a, b = store.add([spec("a"), spec("b")])
    assert store.set_priority(b.id, 1).priority == 1
    assert ids(store.list()) == [b.id, a.id]


def test_a_job_is_removed_unless_it_runs(store, worker):
    queued, running, ended = store.add([spec(), spec(), spec()])
    store.move(queued.id, after=ended.id)
    job = store.claim(worker.id)
    assert job.id == running.id
    store.request_cancel(ended.id)
    with pytest.raises(InvalidState, match="is running"):
        store.remove(running.id)
    store.remove(queued.id)
    store.remove(ended.id)
    assert ids(store.list()) == [running.id] and store.history() == []
    with pytest.raises(UnknownJob):
        store.get(queued.id)


def test_history_filters_by_name_outcome_time_and_count(store, worker, clock):
    outcomes = [("cat", JobState.DONE), ("dog", JobState.FAILED), ("cat", JobState.FAILED), ("cat", JobState.DONE)]
    store.add([spec(name) for name, _ in outcomes])
    ended = []
    for _, outcome in outcomes:
        clock.advance(10)
        job = store.claim(worker.id)
        ended.append(store.finish(job.id, worker.id, outcome))
    latest_first = ended[::-1]
    assert store.history() == latest_first
    assert store.history(name="cat") == [ended[3], ended[2], ended[0]]
    assert store.history(outcome=JobState.FAILED) == [ended[2], ended[1]]
    assert store.history(name="cat", outcome=JobState.DONE, limit=1) == [ended[3]]
    assert store.history(since=START + 20, until=START + 40) == [ended[2], ended[1]]
    assert store.history(limit=0) == []


def test_history_filters_by_the_server_a_job_last_ran_on(store, worker, clock):
    store.add([spec("a"), spec("b"), spec("c")])
    ended: dict[str, list[JobRecord]] = {}
    for server in ("http://one:7860", "http://two:7860", "http://one:7860"):
        clock.advance(10)
        job = store.claim(worker.id, server=server)
        ended.setdefault(server, []).append(store.finish(job.id, worker.id, JobState.DONE))
    assert store.history(server="http://one:7860") == ended["http://one:7860"][::-1]
    assert store.history(server="http://two:7860", limit=1) == ended["http://two:7860"]
    assert store.history(server="http://three:7860") == []


def test_a_stage_keeps_what_it_showed_of_the_servers_speed(store, worker):
    [job] = store.add([spec()])
    store.claim(worker.id)
    recorded = result(0, "txt2img")
    store.record_stage(job.id, worker.id, recorded)
    assert store.get(job.id).stages[0].timing == recorded.timing


def test_a_job_routed_per_stage_keeps_its_servers_and_tags_and_each_stage_the_server_that_ran_it(store, worker):
    """A job whose stages run on several servers (README "Several servers")."""
    routed = JobSpec.from_mapping({"name": "cat", "seed": 1, "stages": [{"type": "txt2img", "server": "desk"},
                                                                         {"type": "img2img", "tags": ["sdxl"]}]})  # fmt: skip
    [job] = store.add([routed])
    store.claim(worker.id)
    store.record_stage(job.id, worker.id, attrs.evolve(result(0, "txt2img"), server="desk"))
    back = store.get(job.id)
    assert back.spec == routed and (back.spec.stages[0].server, back.spec.stages[1].tags) == ("desk", ("sdxl",))
    assert back.stages[0].server == "desk"


# --------------------------------------------------------------------------
# Workers that die
# --------------------------------------------------------------------------


def test_a_worker_silent_past_its_lease_loses_its_job_which_resumes_elsewhere(store, connect, clock):
    lost, rescuer = store.register_worker(), connect().register_worker()
    [queued] = store.add([spec("cat", "img2img")])
    job = store.claim(lost.id, server="http://a:7860")
    store.record_stage(job.id, lost.id, result(0, "txt2img"))
    clock.advance(LEASE / 2)
    connect().heartbeat(rescuer.id)
    assert store.recover() == [], "a worker within its lease keeps its job"
    clock.advance(LEASE / 2 + 1)
    [recovered] = store.recover()
    assert (recovered.id, recovered.state, recovered.worker, recovered.next_stage) == (queued.id, JobState.QUEUED, None, 1)
    assert recovered.lost_server == "http://a:7860"
    assert [worker.id for worker in store.workers()] == [rescuer.id]
    again = store.claim(rescuer.id, server="http://b:7860")
    assert (again.id, again.attempts, again.next_stage, again.server, again.lost_server) == (
        queued.id, 2, 1, "http://b:7860", "http://a:7860"
    )  # fmt: skip
    assert store.record_stage(again.id, rescuer.id, result(1, "img2img")).lost_server is None
    with pytest.raises(NotHeld):
        store.record_stage(job.id, lost.id, result(1, "img2img"))
    with pytest.raises(NotHeld, match="not registered"):
        store.heartbeat(lost.id)


def test_every_claim_recovers_first(store, connect, clock):
    lost, rescuer = store.register_worker(), connect().register_worker()
    [queued] = store.add([spec()])
    store.claim(lost.id)
    clock.advance(LEASE + 1)
    store.heartbeat(rescuer.id)
    assert store.claim(rescuer.id).id == queued.id


def test_a_lost_job_with_a_cancel_that_stops_it_ends_cancelled(store, connect, clock):
    lost, rescuer = store.register_worker(), connect().register_worker()
    store.add([spec()])
    job = store.claim(lost.id)
    store.request_cancel(job.id, CancelMode.NOW)
    clock.advance(LEASE + 1)
    store.heartbeat(rescuer.id)
    assert [job.state for job in store.recover()] == [JobState.CANCELLED]
    assert store.claim(rescuer.id) is None


def test_a_leaving_worker_hands_its_running_jobs_back(store, worker):
    [queued] = store.add([spec()])
    store.claim(worker.id)
    store.unregister_worker(worker.id)
    job = store.get(queued.id)
    assert (job.state, job.worker, job.attempts) == (JobState.QUEUED, None, 1)
    assert store.workers() == []


def dead_pid() -> int:
    """The pid of a process that has ended and been reaped."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait(timeout=30)
    return process.pid


def test_a_worker_is_gone_when_silent_past_its_lease_or_dead_on_this_machine():
    pid = dead_pid()
    fresh = WorkerInfo("w", "here", pid, START, START)
    assert fresh.gone(now=START, lease=LEASE, host="here"), "no such process here"
    assert not fresh.gone(now=START, lease=LEASE, host="elsewhere"), "another machine's pid is not ours to check"
    assert fresh.gone(now=START + LEASE + 1, lease=LEASE, host="elsewhere")
    alive = attrs.evolve(fresh, pid=__import__("os").getpid())
    assert not alive.gone(now=START + LEASE, lease=LEASE, host="here")
    assert alive.gone(now=START + LEASE + 1, lease=LEASE, host="here")


# --------------------------------------------------------------------------
# The progress feed: what workers publish, every store on the location reads
# --------------------------------------------------------------------------


def events(job_id: str, *kinds: str, tag: str = "") -> list[tuple[str, str, dict[str, Any]]]:
    return [(job_id, kind, {"n": number, "tag": tag, "nested": [1.5, None]}) for number, kind in enumerate(kinds)]


def test_published_events_are_read_by_another_store_in_order_and_after_a_number(store, connect):
    [job] = store.add([spec()])
    published = events(job.id, "job_started", "stage_started", "progress", "progress")
    store.publish("3fa2b1c0 on gpu1", published[:1])
    store.publish("3fa2b1c0 on gpu1", published[1:])
    read = connect().feed()
    assert [(event.job_id, event.kind, event.body) for event in read] == published
    assert all(event.worker == "3fa2b1c0 on gpu1" and event.at == START for event in read)
    numbers = [event.seq for event in read]
    assert numbers == sorted(set(numbers))
    assert connect().feed(numbers[1]) == read[2:]
    assert connect().feed(numbers[0], limit=2) == read[1:3]
    assert connect().feed(numbers[-1]) == []


def test_two_publishers_events_never_interleave(store, connect):
    [job] = store.add([spec()])
    others = connect()
    batches = {name: events(job.id, *["progress"] * 5, tag=name) for name in ("a", "b")}

    def publish(publisher: Store, tag: str) -> None:
        for _ in range(10):
            publisher.publish(tag, batches[tag])

    threads = [threading.Thread(target=publish, args=pair) for pair in ((store, "a"), (others, "b"))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    read = connect().feed()
    assert len(read) == 100
    for start in range(0, 100, 5):
        batch = read[start : start + 5]
        assert [event.body for event in batch] == [body for _, _, body in batches[batch[0].worker]]


def test_wait_feed_returns_when_another_store_publishes(store, connect):
    [job] = store.add([spec()])
    store.publish("w", events(job.id, "job_started"))
    [seen] = store.feed()
    started = time.monotonic()
    assert not store.wait_feed(seen.seq, timeout=0.2), "nothing new"
    assert time.monotonic() - started >= 0.2, "it gave up before its time"
    assert store.wait_feed(0, timeout=0.05), "an event after 0 is there already"
    publisher = threading.Thread(target=connect().publish, args=("w", events(job.id, "progress")))
    publisher.start()
    assert store.wait_feed(seen.seq, timeout=30)
    publisher.join(timeout=30)
    assert [event.kind for event in store.feed(seen.seq)] == ["progress"]


def test_pruning_keeps_a_running_jobs_events_but_progress_and_drops_what_is_old(store, worker, clock):
    running, ended = store.add([spec("cat"), spec("dog")])
    store.claim(worker.id)
    store.publish("w", events(running.id, "job_started", "progress") + events(ended.id, "job_started", "job_finished"))
    store.request_cancel(ended.id)
    clock.advance(100)
    store.publish("w", events(running.id, "progress", tag="new") + events(ended.id, "job_started", tag="new"))
    assert store.prune_feed(keep=50) == 3
    left = store.feed()
    assert [(event.job_id, event.kind, event.body["tag"]) for event in left] == [
        (running.id, "job_started", ""),
        (running.id, "progress", "new"),
        (ended.id, "job_started", "new"),
    ]
    clock.advance(100)
    store.finish(running.id, worker.id, JobState.DONE)
    assert store.prune_feed(keep=50) == 3
    store.publish("w", events(running.id, "job_started"))
    [after] = store.feed()
    assert after.seq > left[-1].seq, "a number is never used again"


# --------------------------------------------------------------------------
# The store against a reference model
# --------------------------------------------------------------------------


@attrs.define
class ModelJob:
    id: str
    stages: int
    priority: int
    state: JobState = JobState.QUEUED
    worker: str | None = None
    done_stages: int = 0
    attempts: int = 0


class StoreModel(RuleBasedStateMachine):
    """Random sequences of queue and worker calls agree with a plain list kept beside the store."""

    def __init__(self, backend: Backend) -> None:
        super().__init__()
        clock = FakeClock(START)
        self.store = backend.open(backend.fresh(), clock=clock)
        self.workers = [self.store.register_worker().id for _ in range(2)]
        self.queue: list[ModelJob] = []  # not ended, in claim order
        self.ended: dict[str, ModelJob] = {}

    def teardown(self) -> None:
        self.store.close()

    def running(self) -> list[ModelJob]:
        return [job for job in self.queue if job.state is JobState.RUNNING]

    def ordered(self) -> None:
        self.queue.sort(key=lambda job: -job.priority)  # stable: positions keep their order

    @rule(later=st.integers(0, 3), priority=st.integers(0, 2), count=st.integers(1, 2))
    def add(self, later: int, priority: int, count: int) -> None:
        for record in self.store.add([spec("job", *["img2img"] * later)] * count, priority=priority):
            self.queue.append(ModelJob(record.id, 1 + later, priority))
        self.ordered()

    @rule(worker=st.integers(0, 1))
    def claim(self, worker: int) -> None:
        record = self.store.claim(self.workers[worker])
        queued = [job for job in self.queue if job.state is JobState.QUEUED]
        assert (record and record.id) == (queued[0].id if queued else None)
        if queued:
            queued[0].state, queued[0].worker = JobState.RUNNING, self.workers[worker]
            queued[0].attempts += 1

    @precondition(lambda self: any(job.done_stages < job.stages for job in self.running()))
    @rule(data=st.data(), partial=st.booleans())
    def record(self, data: st.DataObject, partial: bool) -> None:
        job = data.draw(st.sampled_from([job for job in self.running() if job.done_stages < job.stages]))
        index = job.done_stages
        self.store.record_stage(job.id, job.worker, result(index, "txt2img" if index == 0 else "img2img", partial=partial))
        job.done_stages += not partial

    @precondition(lambda self: self.running())
    @rule(data=st.data(), outcome=st.sampled_from([JobState.DONE, JobState.FAILED, JobState.CANCELLED]))
    def finish(self, data: st.DataObject, outcome: JobState) -> None:
        job = data.draw(st.sampled_from(self.running()))
        self.store.finish(job.id, job.worker, outcome)
        self.queue.remove(job)
        job.state, job.worker = outcome, None
        self.ended[job.id] = job

    @precondition(lambda self: self.running())
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        job = data.draw(st.sampled_from(self.running()))
        self.store.release(job.id, job.worker)
        job.state, job.worker = JobState.QUEUED, None

    @precondition(lambda self: len(self.queue) >= 2)
    @rule(data=st.data(), after=st.booleans())
    def move(self, data: st.DataObject, after: bool) -> None:
        job, anchor = data.draw(st.permutations(self.queue))[:2]
        self.store.move(job.id, **{"after" if after else "before": anchor.id})
        self.queue.remove(job)
        self.queue.insert(self.queue.index(anchor) + after, job)
        job.priority = anchor.priority

    @precondition(lambda self: self.queue)
    @rule(data=st.data())
    def cancel_queued(self, data: st.DataObject) -> None:
        queued = [job for job in self.queue if job.state is JobState.QUEUED]
        if queued:
            job = data.draw(st.sampled_from(queued))
            self.store.request_cancel(job.id)
            self.queue.remove(job)
            job.state = JobState.CANCELLED
            self.ended[job.id] = job

    @invariant()
    def store_agrees_with_the_model(self) -> None:
        records = self.store.list()
        assert ids(records) == [job.id for job in self.queue]
        for record, job in zip(records, self.queue, strict=True):
            assert (record.state, record.worker, record.next_stage, record.attempts, record.priority) == (
                job.state, job.worker, job.done_stages, job.attempts, job.priority
            )  # fmt: skip
        assert {record.id: record.state for record in self.store.history()} == {
            job_id: job.state for job_id, job in self.ended.items()
        }


def test_the_store_agrees_with_a_reference_model(backend):
    # 40 examples, or fewer where the profile asks for fewer (`./dev mutate` runs it once per mutant)
    examples = min(40, settings.default.max_examples)
    run_state_machine_as_test(
        lambda: StoreModel(backend), settings=settings(max_examples=examples, stateful_step_count=25, deadline=None)
    )
