"""sdjobs-notify: what the webhook and the desktop receive, and that failing to notify harms no job."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import attrs
import pytest

from sdjobs.cli import main as sdjobs_main
from sdjobs.hooks import Hooks
from sdjobs.runner import Runner
from sdjobs.spec import JobSpec
from sdjobs.status import JobState, RuntimeStatus, StageResult
from sdjobs_notify import SECRET_HEADER, Notification, Notifier

STATUS = RuntimeStatus(
    job_id="20250101-120000-lighthouse-ab12",
    name="lighthouse",
    stage="img2img",
    stage_index=1,
    stage_count=2,
    progress=0.4,
    seed=1234,
    started_at=1_700_000_000.0,
    state=JobState.RUNNING,
)
RESULTS = (
    StageResult(stage="txt2img", stage_index=0, images=(Path("out/01-txt2img/001.png"),)),
    StageResult(stage="img2img", stage_index=1, images=(Path("out/02-img2img/001.png"),)),
)


def test_a_finished_job_is_posted_with_its_outcome_and_final_images(webhook, plugin_manager, register_plugin):
    register_plugin(Notifier(url=webhook.url, notify_send=None))

    three_seconds_in = attrs.evolve(STATUS, started_at=time.time() - 3)
    Hooks(plugin_manager).job_finished(three_seconds_in, JobState.DONE, None, RESULTS)

    delivery = webhook.next()
    assert delivery.path == "/hook"
    assert delivery.headers["Content-Type"] == "application/json"
    assert SECRET_HEADER not in delivery.headers
    body = delivery.body
    assert 2 < body.pop("elapsed") < 60
    assert body == {
        "event": "job_finished",
        "job": "20250101-120000-lighthouse-ab12",
        "name": "lighthouse",
        "outcome": "done",
        "error": None,
        "stage": "img2img",
        "stage_index": 1,
        "stage_count": 2,
        "seed": 1234,
        "images": [str(Path("out/02-img2img/001.png"))],
    }


@pytest.mark.parametrize("outcome", [JobState.FAILED, JobState.CANCELLED])
def test_a_job_that_did_not_finish_carries_its_outcome_and_error(webhook, outcome):
    Notifier(url=webhook.url, notify_send=None).sdjobs_job_finished(
        STATUS, outcome, "stage 2/2 (img2img): boom", RESULTS[:1]
    )

    body = webhook.next().body
    assert (body["outcome"], body["error"]) == (str(outcome), "stage 2/2 (img2img): boom")
    assert body["images"] == [str(Path("out/01-txt2img/001.png"))]


def test_a_stall_is_posted_with_where_the_job_stands(webhook, plugin_manager, register_plugin):
    register_plugin(Notifier(url=webhook.url, notify_send=None))

    Hooks(plugin_manager).job_stalled(STATUS, 90.0)

    assert webhook.next().body == {
        "event": "job_stalled",
        "job": "20250101-120000-lighthouse-ab12",
        "name": "lighthouse",
        "stage": "img2img",
        "stage_index": 1,
        "stage_count": 2,
        "progress": 0.4,
        "seconds": 90.0,
    }


def test_a_drained_queue_is_summed_up(webhook, plugin_manager, register_plugin):
    register_plugin(Notifier(url=webhook.url, notify_send=None))
    outcomes = {"a": JobState.DONE, "b": JobState.FAILED, "c": JobState.DONE, "d": JobState.CANCELLED}

    Hooks(plugin_manager).queue_drained(outcomes)

    assert webhook.next().body == {
        "event": "queue_drained",
        "jobs": 4,
        "done": 2,
        "failed": 1,
        "cancelled": 1,
        "outcomes": {"a": "done", "b": "failed", "c": "done", "d": "cancelled"},
    }


def test_the_secret_goes_in_a_header_and_never_into_the_log(webhook, caplog):
    webhook.status = 500
    notifier = Notifier(url=webhook.url + "/T0KEN-IN-PATH", secret="s3cret", notify_send=None)

    with caplog.at_level(logging.WARNING, logger="sdjobs_notify"):
        notifier.sdjobs_job_stalled(STATUS, 90.0)

    assert webhook.next().headers[SECRET_HEADER] == "s3cret"
    assert [record.getMessage() for record in caplog.records] == [
        "webhook job_stalled to 127.0.0.1 answered 500"
    ]
    assert "s3cret" not in repr(notifier)
    assert "T0KEN" not in caplog.text


def test_an_unreachable_webhook_is_logged_and_the_job_goes_on(closed_port_url, caplog):
    notifier = Notifier(url=closed_port_url + "/T0KEN", secret="s3cret", notify_send=None, timeout=2)

    with caplog.at_level(logging.WARNING, logger="sdjobs_notify"):
        notifier.sdjobs_job_finished(STATUS, JobState.DONE, None, RESULTS)  # does not raise

    assert [(r.name, r.getMessage()) for r in caplog.records] == [
        ("sdjobs_notify", "webhook job_finished to 127.0.0.1 failed: ConnectionError")
    ]


def test_settings_come_from_the_environment_and_blank_means_off():
    configured = Notifier.from_environ(
        {"SDJOBS_NOTIFY_URL": "http://hooks.local/x", "SDJOBS_NOTIFY_SECRET": "s"}
    )
    unset = Notifier.from_environ({"SDJOBS_NOTIFY_URL": "", "SDJOBS_NOTIFY_SECRET": ""})

    assert (configured.url, configured.secret) == ("http://hooks.local/x", "s")
    assert (unset.url, unset.secret) == (None, None)


def test_notify_send_shows_the_notification_when_it_is_on_path(fake_notify_send):
    args_file = fake_notify_send()
    notifier = Notifier()  # no URL: the webhook is off; notify-send is found on PATH

    notifier.sdjobs_job_stalled(STATUS, 90.0)

    assert notifier.notify_send is not None and Path(notifier.notify_send).parent == args_file.parent / "bin"
    assert args_file.read_text().splitlines() == [
        "--app-name=sdjobs",
        "--urgency=critical",
        "sdjobs: lighthouse stalled",
        "stage 2/2 img2img: no progress for 90 s at 40 %",
    ]


def test_a_finished_job_shows_normal_urgency_on_the_desktop(fake_notify_send):
    args_file = fake_notify_send()

    Notifier().sdjobs_job_finished(STATUS, JobState.DONE, None, RESULTS)

    assert args_file.read_text().splitlines() == [
        "--app-name=sdjobs",
        "--urgency=normal",
        "sdjobs: lighthouse done",
        "1 image, seed 1234",
    ]


@pytest.mark.parametrize(
    ("script", "problem"),
    [("exit 3", "returned non-zero exit status 3"), ("exec sleep 30", "timed out after 0.2 seconds")],
)
def test_a_failing_or_hanging_notify_send_is_logged_and_the_job_goes_on(
    fake_notify_send, caplog, script, problem
):
    fake_notify_send(script)
    notifier = Notifier(timeout=0.2)

    with caplog.at_level(logging.WARNING, logger="sdjobs_notify"):
        notifier.sdjobs_queue_drained({"a": JobState.DONE})  # does not raise

    assert len(caplog.records) == 1
    assert caplog.records[0].getMessage().startswith("desktop notification failed:")
    assert problem in caplog.records[0].getMessage()


def test_queue_drained_is_urgent_only_when_a_job_did_not_finish():
    assert not Notification.queue_drained({"a": JobState.DONE}).urgent
    assert Notification.queue_drained({"a": JobState.DONE, "b": JobState.CANCELLED}).urgent


def test_the_installed_plugin_is_listed_by_sdjobs_plugins_and_can_be_disabled(capsys, monkeypatch):
    monkeypatch.delenv("SDJOBS_DISABLE_PLUGINS", raising=False)
    assert sdjobs_main(["plugins"]) == 0
    listed = {plugin["name"]: plugin["hooks"] for plugin in json.loads(capsys.readouterr().out)["loaded"]}
    assert listed["notify"] == ["sdjobs_job_finished", "sdjobs_job_stalled", "sdjobs_queue_drained"]

    monkeypatch.setenv("SDJOBS_DISABLE_PLUGINS", "notify")
    assert sdjobs_main(["plugins"]) == 0
    assert "notify" not in {plugin["name"] for plugin in json.loads(capsys.readouterr().out)["loaded"]}


def test_a_real_job_notifies_when_it_ends_and_when_the_queue_drains(
    webhook, webui_client, plugin_manager, register_plugin, tmp_path
):
    register_plugin(Notifier(url=webhook.url, secret="s3cret", notify_send=None))
    spec = JobSpec.from_mapping(
        {
            "name": "notify me",
            "prompt": "a lighthouse at dusk",
            "seed": 7,
            "settings": {"steps": 3, "width": 64, "height": 64},
            "stages": [{"type": "txt2img"}, {"type": "img2img", "denoising_strength": 0.5}],
        }
    )
    runner = Runner(specs=[spec], client=webui_client, hooks=Hooks(plugin_manager), out_dir=tmp_path)

    runner.run()

    finished, drained = webhook.all()
    job_id = finished.body["job"]
    assert finished.body["event"] == "job_finished"
    assert (finished.body["outcome"], finished.body["error"]) == ("done", None)
    assert finished.headers[SECRET_HEADER] == "s3cret"
    assert [Path(image).is_file() for image in finished.body["images"]] == [True]
    [job_folder] = tmp_path.glob(f"*-notify-me-{job_id[:8]}")
    assert Path(finished.body["images"][0]).is_relative_to(job_folder / "02-img2img")
    assert drained.body == {
        "event": "queue_drained",
        "jobs": 1,
        "done": 1,
        "failed": 0,
        "cancelled": 0,
        "outcomes": {job_id: "done"},
    }
