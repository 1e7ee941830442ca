"""A job core driven step by step on a fake clock and a fake WebUI port (`Started`), for the
example-based tests of the job's paths and of what it hands on."""

from __future__ import annotations

from typing import Any

from sdjobs.client import GenerationResult
from sdjobs.clock import FakeClock
from sdjobs.hooks import Hooks, make_plugin_manager
from sdjobs.job import Job, JobSettings
from sdjobs.outputs import JobFolder
from sdjobs.spec import JobSpec
from sdjobs.status import RuntimeStatus, StageResult
from sdjobs.testing import FakeWebUI, HookRecorder, Quirks, active_task, sample


class Started:
    """A job begun and prepared, its first request out (task ids followed unless told).

    ``first`` and ``later`` are its stages (txt2img, then ``stages - 1`` img2img ones unless
    given); ``plugins`` are registered beside the recorder; ``job`` goes to `Job` (a server's
    name, its history, a stop, stages finished before)."""

    def __init__(
        self,
        tmp_path,
        settings: JobSettings = JobSettings(),
        stages: int = 1,
        *,
        prepared: bool = True,
        first: dict | None = None,
        later: list[dict] | None = None,
        task_tracking: bool = True,
        plugins: tuple[object, ...] = (),
        **job: Any,
    ) -> None:
        later = [{"type": "img2img"}] * (stages - 1) if later is None else later
        self.spec = JobSpec.from_mapping({"name": "cat", "seed": 7, "stages": [first or {"type": "txt2img"}, *later]})
        self.clock = FakeClock()
        # its client stands in for the port's, which the job hands to each poller and never calls itself
        self.webui = FakeWebUI(task_tracking=task_tracking, client=object(), folder=JobFolder.create(tmp_path, "job-1"))
        self.recorder = HookRecorder()
        manager = make_plugin_manager(load_entry_points=False, disabled=["sdjobs.plugins.progress_poller"])
        manager.register(self.recorder, name="recorder")
        manager.register(self.webui, name="fake-webui")
        for plugin in plugins:
            manager.register(plugin, name=type(plugin).__name__)
        self.job = Job(
            spec=self.spec, job_id="job-1", hooks=Hooks(manager), port=self.webui, settings=settings,
            clock=self.clock, wall_clock=self.clock, **job,
        )  # fmt: skip
        self.job.begin()
        if prepared:
            self.job.prepared(folder=self.webui.folder, problems=[])

    def running(self) -> None:
        """A sample that says our request is the one the server runs."""
        self.clock.advance(1.0)
        self.job.sample(info=sample(1, 10), task=active_task(0.1))

    def answer(self, quirks: Quirks | None = None) -> GenerationResult:
        """The server answers the request out as asked (or bent by ``quirks``); the answer."""
        result = self.webui.answer(self.spec, quirks)
        self.job.returned(result=result)
        return result

    def calls(self, name: str) -> list[dict[str, Any]]:
        """The arguments of each call of hook ``name``, in order."""
        return [kwargs for called, kwargs in self.recorder.calls if called == name]

    def statuses(self, name: str) -> list[RuntimeStatus]:
        return [kwargs["status"] for kwargs in self.calls(name)]

    def results(self) -> list[StageResult]:
        """The results `sdjobs_stage_finished` was handed."""
        return [kwargs["result"] for kwargs in self.calls("stage_finished")]
