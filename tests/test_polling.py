"""Progress polling (the seed PR-PIPE-004's executor tests): `ThreadPoller` and the runner
against the simulated WebUI over real HTTP."""

from __future__ import annotations

import threading
import time

import attrs
import pytest
from runner_helpers import Background, assert_monotonic, job_spec, make_runner, requests_to

from sdjobs import hookimpl
from sdjobs.client import WebUIClient
from sdjobs.plugins.progress_poller import ThreadPoller
from sdjobs.polling import PollRequest
from sdjobs.sim import SimSettings
from sdjobs.status import JobState, ProgressInfo, TaskProgress

TXT2IMG = {"prompt": "a lighthouse", "seed": 1234, "steps": 8, "width": 64, "height": 64}
POLLER = "sdjobs.plugins.progress_poller"


class Samples:
    """A poller's `report`: keeps every sample and lets the test wait for one."""

    def __init__(self) -> None:
        self.received: list[tuple[ProgressInfo | None, TaskProgress | None]] = []
        self._changed = threading.Condition()

    def __call__(self, info: ProgressInfo | None, task: TaskProgress | None) -> None:
        with self._changed:
            self.received.append((info, task))
            self._changed.notify_all()

    def wait_for(self, predicate, timeout: float = 5.0) -> bool:
        with self._changed:
            return self._changed.wait_for(lambda: any(predicate(*sample) for sample in self.received), timeout)


class SampleTap:
    """A polling plugin that runs the built-in poller and keeps a copy of every sample.

    With ``stale``, each sample is followed by the one before it again: a late answer
    arriving after a newer one, so the core sees progress go back.
    """

    def __init__(self, *, stale: bool = False) -> None:
        self.samples = Samples()
        self.stale = stale

    @hookimpl(tryfirst=True)
    def sdjobs_start_polling(self, request: PollRequest) -> ThreadPoller:
        previous: list[tuple[ProgressInfo | None, TaskProgress | None]] = []

        def report(info: ProgressInfo | None, task: TaskProgress | None) -> None:
            request.report(info, task)  # first: a test waiting for the sample then finds it queued for the job
            self.samples(info, task)
            if self.stale and previous:
                request.report(*previous[-1])
            previous.append((info, task))

        return ThreadPoller(attrs.evolve(request, report=report)).start()


def stepping(**kwargs) -> SimSettings:
    return SimSettings(stepping=True, **kwargs)


# -- the poller on its own -----------------------------------------------------------


@pytest.mark.parametrize("sim_settings", [stepping()])
def test_poll_progress_loop_calls_callback(webui_sim, webui_client):
    samples = Samples()
    generation = Background(webui_client.txt2img, TXT2IMG)
    poller = ThreadPoller(PollRequest(client=webui_client, interval=0.01, report=samples)).start()
    webui_sim.release(3)
    assert samples.wait_for(lambda info, task: info is not None and info.current_step == 2)
    poller.stop()
    webui_sim.release(100)
    assert len(generation.join().images) == 1
    seen = [info for info, _ in samples.received if info is not None]
    assert all(info.total_steps == 8 and info.job_count == 1 for info in seen)
    assert [task for _, task in samples.received] == [None] * len(samples.received)  # global mode


class WatchedClient(WebUIClient):
    """A real client that keeps when each progress request was sent, and says when the first was.

    ``slow_first`` holds the first request back that many seconds before sending it.
    """

    def __init__(self, *args, slow_first: float = 0.0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.asking = threading.Event()
        self.sent: list[float] = []
        self.slow_first = slow_first

    def get_progress(self, **kwargs):
        if not self.sent and self.slow_first:
            threading.Event().wait(self.slow_first)  # a slow sample, as the poller sees it
        self.sent.append(time.monotonic())
        self.asking.set()
        return super().get_progress(**kwargs)


def test_poll_progress_loop_stops_on_event(webui_sim):
    samples = Samples()
    with WatchedClient(webui_sim.url) as client:
        poller = ThreadPoller(PollRequest(client=client, interval=0.005, report=samples)).start()
        assert samples.wait_for(lambda info, task: True)
        poller.stop()
        sent, reported = len(client.sent), len(samples.received)
        client.txt2img({**TXT2IMG, "steps": 20})  # long enough for many more samples
    assert len(client.sent) == sent, "a progress request was sent after stop() returned"
    assert len(samples.received) == reported


def test_a_slow_sample_is_not_followed_by_a_burst(webui_sim):
    interval = 0.05
    samples = Samples()
    with WatchedClient(webui_sim.url, slow_first=10 * interval) as client:
        poller = ThreadPoller(PollRequest(client=client, interval=interval, report=samples)).start()
        assert samples.wait_for(lambda *sample: len(samples.received) >= 3)
        poller.stop()
    slow_sent, *later = client.sent
    assert len(later) >= 2
    # One sample goes at once after the slow one; the next waits its interval again
    # (the ten missed meanwhile are not made up in a burst).
    assert len([sent for sent in later if sent < slow_sent + interval]) <= 1


def test_the_first_sample_is_one_interval_in(webui_sim):
    """At once, the request has barely left: its first sample would say nothing."""
    samples = Samples()
    with WatchedClient(webui_sim.url) as client:
        started = time.monotonic()
        poller = ThreadPoller(PollRequest(client=client, interval=0.2, report=samples)).start()
        assert samples.wait_for(lambda *sample: True)
        poller.stop()
    assert client.sent[0] - started >= 0.2


def test_a_poller_never_stopped_does_not_keep_the_process_alive(webui_sim):
    before = set(threading.enumerate())
    with WebUIClient(webui_sim.url) as client:
        poller = ThreadPoller(PollRequest(client=client, interval=30, report=Samples())).start()
        try:
            [thread] = set(threading.enumerate()) - before
            assert thread.daemon, "the interpreter would wait for it at exit"
        finally:
            poller.stop()


@pytest.mark.parametrize("sim_settings", [SimSettings(step_time=0.001, progress_latency=2.0)])
def test_stop_returns_at_once_while_a_progress_request_hangs(webui_sim):
    samples = Samples()
    with WatchedClient(webui_sim.url) as client:
        poller = ThreadPoller(PollRequest(client=client, interval=0.01, report=samples)).start()
        assert client.asking.wait(5.0)
        stopper = threading.Thread(target=poller.stop, daemon=True)
        stopper.start()
        stopper.join(timeout=0.5)  # the hanging request answers only after 2 s
        assert not stopper.is_alive(), "stop() waited for the hanging request"
        assert samples.received == []


# -- the poller in a job ---------------------------------------------------------------


@pytest.mark.parametrize("sim_settings", [stepping()])
def test_generate_with_progress_completes(webui_sim, webui_client, tmp_path):
    runner, log = make_runner(webui_client, [job_spec(steps=20)], tmp_path)
    running = Background(runner.run)
    webui_sim.release(2)  # the server reports the 0-based step just finished: step 1
    assert log.wait_for("progress", lambda kwargs: (kwargs["status"].step or 0) >= 1)
    webui_sim.release(5)  # step 6
    assert log.wait_for("progress", lambda kwargs: (kwargs["status"].step or 0) >= 6)
    webui_sim.release(100)
    running.join()
    assert list(runner.outcomes.values()) == [JobState.DONE]
    assert len(log.statuses()) >= 2
    assert_monotonic(log.statuses())
    assert log.statuses("stage_finished")[0].progress == 1.0


def test_generate_with_progress_no_callback(webui_sim, webui_client, tmp_path):
    runner, log = make_runner(webui_client, [job_spec()], tmp_path, disabled=[POLLER])
    runner.run()
    assert list(runner.outcomes.values()) == [JobState.DONE]
    assert "progress" not in log.names()
    assert requests_to(webui_sim, ["/sdapi/v1/progress"]) == []
    [finished] = log.statuses("stage_finished")
    assert finished.progress == 1.0 and finished.job_progress == 1.0


@pytest.mark.parametrize("sim_settings", [stepping()])
def test_progress_polling_concurrent_with_generation(webui_sim, webui_client, tmp_path):
    runner, log = make_runner(webui_client, [job_spec()], tmp_path)
    running = Background(runner.run)
    assert log.wait_for("progress")  # no step has been released: the POST is blocked
    assert webui_sim.snapshot().awaiting_release and "stage_finished" not in log.names()
    webui_sim.release(4)
    assert log.wait_for("progress", lambda kwargs: kwargs["status"].step == 3)
    assert "stage_finished" not in log.names()
    webui_sim.release(100)
    running.join()
    assert list(runner.outcomes.values()) == [JobState.DONE]
    assert_monotonic(log.statuses())


@pytest.mark.parametrize("sim_settings", [stepping()])
def test_poll_progress_loop_ignores_regression(webui_sim, webui_client, tmp_path):
    tap = SampleTap(stale=True)
    runner, log = make_runner(webui_client, [job_spec()], tmp_path, plugins=[tap])
    running = Background(runner.run)
    for step in range(7):  # the 8th and last step is never shown: the pass ends with it
        webui_sim.release(1)
        assert tap.samples.wait_for(lambda info, task, step=step: info is not None and info.current_step == step)
    webui_sim.release(1)
    running.join()
    assert list(runner.outcomes.values()) == [JobState.DONE]
    steps = [status.step for status in log.statuses()]
    assert steps == sorted(set(steps)), "a stale sample moved the step back, or fired without a change"
    assert steps[-1] == 6
    assert_monotonic(log.statuses())


# -- whose job: task ids or the global endpoint ------------------------------------------


@pytest.mark.parametrize("sim_settings", [stepping()])
def test_task_mode_follows_our_force_task_id(webui_sim, webui_client, tmp_path):
    tap = SampleTap()
    runner, log = make_runner(webui_client, [job_spec()], tmp_path, plugins=[tap])
    running = Background(runner.run)
    assert log.wait_for("progress")
    job_id = log.one("job_started")["status"].job_id
    assert webui_sim.snapshot().current_task == f"sdjobs-{job_id}-1-1"
    assert tap.samples.wait_for(lambda info, task: task is not None and task.active)
    webui_sim.release(100)
    running.join()
    assert list(runner.outcomes.values()) == [JobState.DONE]


@pytest.mark.parametrize("sim_settings", [SimSettings(step_time=0.005, first_step_time=0.005, ui=False)])
def test_global_mode_without_the_ui(webui_sim, webui_client, tmp_path):
    tap = SampleTap()
    runner, log = make_runner(webui_client, [job_spec(steps=20)], tmp_path, plugins=[tap])
    runner.run()
    assert list(runner.outcomes.values()) == [JobState.DONE]
    assert {task for _, task in tap.samples.received} == {None}
    assert any(status.step for status in log.statuses())
    assert_monotonic(log.statuses())


@pytest.mark.parametrize(
    "sim_settings",
    [
        SimSettings(step_time=0.005, first_step_time=0.005, progress_error_rate=1.0, ui=False),
        SimSettings(step_time=0.005, first_step_time=0.005, progress_error_rate=1.0),
        SimSettings(step_time=0.005, first_step_time=0.005, progress_stuck=True),
    ],
    ids=["errors-global", "errors-task", "stuck"],
)
def test_progress_faults_never_break_the_job(webui_sim, webui_client, tmp_path):
    runner, log = make_runner(webui_client, [job_spec(steps=20)], tmp_path)
    runner.run()
    assert list(runner.outcomes.values()) == [JobState.DONE]
    assert requests_to(webui_sim, ["/sdapi/v1/progress"]), "the poller never asked"
    if webui_sim.settings.progress_error_rate and not webui_sim.settings.ui:
        assert "progress" not in log.names()
    assert_monotonic(log.statuses())
    assert log.statuses("stage_finished")[0].progress == 1.0


# -- previews, failures, a queued task ------------------------------------------------------


class Calls(Samples):
    """A report that raises, or stops its poller, on every call."""

    def __init__(self, action) -> None:
        super().__init__()
        self.action = action

    def __call__(self, info, task) -> None:
        super().__call__(info, task)
        self.action()


def test_a_failing_report_is_logged_once_with_its_traceback_then_at_debug_level(webui_sim, webui_client, caplog):
    caplog.set_level("DEBUG", logger=POLLER)

    def fail() -> None:
        raise RuntimeError("a plugin's report broke")

    calls = Calls(fail)
    poller = ThreadPoller(PollRequest(client=webui_client, interval=0.005, report=calls)).start()
    assert calls.wait_for(lambda *_: len(calls.received) >= 3)
    poller.stop()
    failures = [record for record in caplog.records if record.name == POLLER]
    assert [(record.levelname, record.getMessage()) for record in failures[:2]] == [
        ("WARNING", "progress sample failed; sampling goes on"),
        ("DEBUG", "progress sample failed again"),
    ]
    assert all(record.exc_info and "a plugin's report broke" in str(record.exc_info[1]) for record in failures)


def test_a_report_may_stop_its_own_poller(webui_sim, webui_client, caplog):
    poller: list[ThreadPoller] = []
    stopping: list[Exception | None] = []  # what stop() raised on the poller's own thread
    stopped = threading.Event()

    def stop_own_poller() -> None:
        try:
            poller[0].stop()
            stopping.append(None)
        except Exception as error:  # handed to the test
            stopping.append(error)
        stopped.set()

    calls = Calls(stop_own_poller)
    poller.append(ThreadPoller(PollRequest(client=webui_client, interval=0.005, report=calls)))
    poller[0].start()
    assert stopped.wait(10)
    poller[0].stop()
    assert stopping == [None] and len(calls.received) == 1
    assert [record for record in caplog.records if record.name == POLLER] == []


@pytest.mark.parametrize("sim_settings", [stepping()])
@pytest.mark.parametrize("preview", [True, False])
def test_a_global_sample_carries_the_preview_only_when_asked_for(webui_sim, webui_client, preview):
    webui_client.set_options({"show_progress_every_n_steps": 1})
    samples = Samples()
    generation = Background(webui_client.txt2img, TXT2IMG)
    poller = ThreadPoller(PollRequest(client=webui_client, interval=0.005, report=samples, preview=preview)).start()
    webui_sim.release(3)
    assert samples.wait_for(lambda info, _: info is not None and info.current_step == 2)
    count = len(samples.received)
    assert samples.wait_for(lambda *_: len(samples.received) >= count + 2)
    poller.stop()
    webui_sim.release(100)
    generation.join()
    assert any(info is not None and info.current_image is not None for info, _ in samples.received) == preview


@pytest.mark.parametrize("sim_settings", [stepping()])
def test_each_preview_of_our_task_is_reported_once(webui_sim, webui_client):
    webui_client.set_options({"show_progress_every_n_steps": 1})
    samples = Samples()
    generation = Background(webui_client.txt2img, TXT2IMG, force_task_id="ours")
    request = PollRequest(client=webui_client, interval=0.005, report=samples, task_id="ours", preview=True)
    poller = ThreadPoller(request).start()
    for step in (1, 2, 3):
        webui_sim.release(2 if step == 1 else 1)  # step 1 shows once two are released
        assert samples.wait_for(lambda _, task, step=step: task is not None and task.live_preview is not None and len(previews(samples)) == step)
        count = len(samples.received)
        assert samples.wait_for(lambda *_: len(samples.received) >= count + 2)  # asked again: nothing new
    poller.stop()
    webui_sim.release(100)
    generation.join()
    assert previews(samples) == [1, 2, 3]


def previews(samples: Samples) -> list[int]:
    return [task.id_live_preview for _, task in list(samples.received) if task is not None and task.live_preview is not None]


@pytest.mark.parametrize("sim_settings", [stepping()])
def test_while_our_task_waits_in_the_queue_no_global_sample_is_taken(webui_sim, webui_client):
    first = Background(webui_client.txt2img, TXT2IMG, force_task_id="theirs")
    assert webui_sim.wait_for(lambda state: state.job_count > 0)
    samples = Samples()
    ours = Background(webui_client.txt2img, TXT2IMG, force_task_id="ours")
    assert webui_sim.wait_for(lambda state: state.pending_tasks == ("ours",))
    poller = ThreadPoller(PollRequest(client=webui_client, interval=0.005, report=samples, task_id="ours")).start()
    assert samples.wait_for(lambda _, task: task is not None and task.queued)
    count = len(samples.received)
    assert samples.wait_for(lambda *_: len(samples.received) >= count + 2)
    poller.stop()
    webui_sim.release(100)
    first.join(), ours.join()
    assert [info for info, task in samples.received if task is not None and not task.active] != []
    assert all(info is None for info, task in samples.received if task is None or not task.active)
