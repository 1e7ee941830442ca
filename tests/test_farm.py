"""Workers on several hosts sharing a PostgreSQL queue, as real processes: a worker that falls
silent (SIGSTOP: a frozen or cut-off host, whose pid no other host can check) loses its job to
another worker after the lease, which resumes it at its first unfinished stage; when the silent
one wakes, it records nothing more of that job.  (Two workers sharing a job list, kill -9 and a
cancel from a third process run on both backends in test_kill.py and test_queue_commands.py.)  On
PostgreSQL these workers are Procrastinate workers (`sdjobs.dispatch`): a killed worker's run is
closed in Procrastinate once its heartbeat is older than the lease."""

from __future__ import annotations

import json
import signal

import psycopg
import pytest
from process_helpers import Lines, start
from runner_helpers import GENERATION_PATHS, STEPS, job_spec, requests_to
from sdjobs.postgres_store import PostgresStore
from sdjobs.sim import SimSettings
from sdjobs.status import JobState
from test_kill import finish, sim_process, until  # noqa: F401  (sim_process: a fixture)

LEASE = "2"


def worker(webui_sim, out, *more: str):
    """`sdjobs worker` on the test's queue with a short lease; the process and its log lines."""
    process = start("worker", "--webui", webui_sim.url, "--lease", LEASE, "--frontend", "log",
                    "--poll-interval", "0.25", "--out", out, *more)  # fmt: skip
    return process, Lines(process.stderr)


@pytest.mark.parametrize("sim_settings", [SimSettings(stepping=True)])
@pytest.mark.parametrize("servers", [1, 2], ids=["one server", "two servers"])
def test_a_silent_worker_loses_its_job_after_the_lease_and_records_nothing_when_it_wakes(
    postgres_queue, webui_sim, sim_process, tmp_path, servers
):
    out = tmp_path / "out"
    with PostgresStore(postgres_queue) as store:
        [job] = store.add([job_spec(("txt2img", "img2img"), name="sea")])
        silent, silent_log = worker(webui_sim, out)
        try:
            webui_sim.release(STEPS)  # stage 1; stage 2's request then waits in the WebUI
            first = until(lambda: (record := store.get(job.id)).stages and record, "stage 1 recorded")
            silent.send_signal(signal.SIGSTOP)
            rescuer, _ = worker(webui_sim, out, "--until-empty", *["--webui", sim_process] * (servers - 1))
            claimed = until(lambda: (record := store.get(job.id)).worker not in (None, first.worker) and record,
                            "claimed by the other worker", timeout=60)  # fmt: skip
            assert (claimed.attempts, claimed.next_stage) == (2, 1)  # resumed at stage 2
            webui_sim.release(1000)  # the silent worker's stage 2 request, then the rescuer's
            status, errors = finish(rescuer)
            assert status == 0, errors
            done = store.get(job.id)
            silent.send_signal(signal.SIGCONT)
            assert silent_log.wait_for("this worker was counted gone; it registers again"), silent_log.text()
            assert store.get(job.id) == done, "the woken worker changed nothing"
        finally:
            silent.send_signal(signal.SIGCONT)
            silent.terminate()
            finish(silent)
    assert (done.state, done.attempts, [stage.partial for stage in done.stages]) == (JobState.DONE, 2, [False, False])
    assert [len(list(done.folder.glob(f"{i:02d}-*/*.png"))) for i in (1, 2)] == [1, 1]
    assert json.loads((done.folder / "manifest.json").read_text())["outcome"] == "done"
    assert "Traceback" not in silent_log.text() + errors
    assert 2 <= len(requests_to(webui_sim, GENERATION_PATHS)) <= 3  # stage 1; stage 2 by the silent one, maybe by the rescuer


def procrastinate_jobs(url: str) -> list[tuple[str, str]]:
    """Procrastinate's jobs left in the database: (sdjobs job id, status)."""
    with psycopg.connect(url) as connection:
        return connection.execute("SELECT args->>'job_id', status::text FROM procrastinate_jobs ORDER BY id").fetchall()


@pytest.mark.parametrize("sim_settings", [SimSettings(stepping=True)])
def test_a_killed_workers_job_resumes_in_another_and_procrastinate_closes_the_lost_run(postgres_queue, webui_sim, tmp_path):
    out = tmp_path / "out"
    with PostgresStore(postgres_queue) as store:
        [job] = store.add([job_spec(("txt2img", "img2img"), name="sea")])
        killed, _ = worker(webui_sim, out)
        webui_sim.release(STEPS)
        until(lambda: store.get(job.id).stages, "stage 1 recorded")
        assert procrastinate_jobs(postgres_queue) == [(job.id, "doing")]
        killed.kill()
        killed.wait(timeout=30)
        rescuer, rescuer_log = worker(webui_sim, out)
        try:
            webui_sim.release(1000)
            done = until(lambda: (record := store.get(job.id)).ended and record, "the job ended", timeout=60)
            until(lambda: procrastinate_jobs(postgres_queue) == [], "the lost run's Procrastinate job closed")
        finally:
            rescuer.terminate()
            status, errors = finish(rescuer)
    assert (done.state, done.attempts, done.next_stage) == (JobState.DONE, 2, 2)
    assert status == 143 and "Traceback" not in errors + rescuer_log.text()
