"""A job that fails before its first request goes through the machine like any failed job."""

from __future__ import annotations

from runner_helpers import GENERATION_PATHS, job_spec, make_runner, requests_to

from sdjobs.status import JobState


def test_a_job_whose_folder_cannot_be_made_starts_and_fails_by_its_own_id(webui_sim, webui_client, tmp_path):
    not_a_folder = tmp_path / "outputs"
    not_a_folder.write_text("a file where the output folder should be")
    runner, log = make_runner(webui_client, [job_spec(name="first"), job_spec(name="second")], not_a_folder)
    runner.run()
    assert log.names() == [
        "job_queued", "job_queued", "job_started", "job_finished", "job_started", "job_finished", "queue_drained",
    ]  # fmt: skip
    queued = [kwargs["job_id"] for name, kwargs in log.calls if name == "job_queued"]
    finished = [kwargs for name, kwargs in log.calls if name == "job_finished"]
    assert [kwargs["status"].job_id for kwargs in finished] == queued
    assert all(kwargs["outcome"] is JobState.FAILED for kwargs in finished)
    assert f"cannot create the job's folder in {not_a_folder}" in finished[0]["error"]
    assert log.one("queue_drained")["outcomes"] == dict.fromkeys(queued, JobState.FAILED)
    assert requests_to(webui_sim, GENERATION_PATHS) == []


def test_an_unexpected_error_while_preparing_fails_the_job_at_once_with_its_message(webui_sim, webui_client, tmp_path,
                                                                                     monkeypatch):  # fmt: skip
    """A bug on a port's thread is not left to the job's deadline (60 s): it fails the job as one on
    the runner's thread does, naming the error.  (A bug cannot be made real: `preflight` is replaced.)"""

    def broken(*args):
        raise KeyError("a list the check did not expect")

    monkeypatch.setattr("sdjobs.runner.preflight", broken)
    runner, log = make_runner(webui_client, [job_spec(name="first"), job_spec(name="second")], tmp_path)
    runner.run()
    finished = [kwargs for name, kwargs in log.calls if name == "job_finished"]
    assert [kwargs["outcome"] for kwargs in finished] == [JobState.FAILED, JobState.FAILED]
    assert finished[0]["error"] == "KeyError: 'a list the check did not expect'"
    assert requests_to(webui_sim, GENERATION_PATHS) == []
