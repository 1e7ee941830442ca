"""`--preview` without a window: console, log and jsonl keep the live preview in `preview.png`.

Real runs against the simulated WebUI; the file is looked at while the job runs, the
moment a front end says where it is.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import re

import attrs
import pytest
from PIL import Image
from rich.console import Console
from runner_helpers import job_spec, make_runner
from test_console_frontend import rendered

from sdjobs.frontend import FrontendOptions
from sdjobs.frontends.console import ConsoleFrontend
from sdjobs.frontends.jsonl import JsonlFrontend
from sdjobs.frontends.log import LogFrontend
from sdjobs.frontends.preview import PREVIEW_FILE, PreviewFiles
from sdjobs.job import JobSettings
from sdjobs.sim import SimSettings
from sdjobs.status import RuntimeStatus

PREVIEWING = JobSettings(poll_interval=0.02, preview=True)
OPTIONS = FrontendOptions(preview=True)


@pytest.fixture
def sim_settings() -> SimSettings:
    return SimSettings(step_time=0.02, first_step_time=0.02)


@pytest.fixture
def webui_client(webui_client):
    """A new preview every step (A1111's default is every 10)."""
    webui_client.set_options({"show_progress_every_n_steps": 1})
    return webui_client


def a_png_file(path) -> bool:
    with Image.open(path) as image:
        return image.format == "PNG"


class Lines(io.StringIO):
    """jsonl's stream: each progress event's preview is opened as it is told."""

    def __init__(self) -> None:
        super().__init__()
        self.previews: list[tuple[str, bool]] = []  # (path, a PNG then)

    def write(self, text: str) -> int:
        event = json.loads(text)
        if event["event"] == "progress" and event["preview"] is not None:
            self.previews.append((event["preview"], a_png_file(event["preview"])))
        return super().write(text)


def test_jsonl_progress_events_carry_the_preview_file_removed_when_the_job_ends(webui_client, tmp_path):
    stream = Lines()
    frontend = JsonlFrontend(OPTIONS, stream=stream)
    runner, log = make_runner(webui_client, [job_spec(("txt2img", "img2img"), steps=10)], tmp_path, plugins=[frontend], settings=PREVIEWING)
    frontend.run(runner)
    [folder] = [path for path in tmp_path.iterdir() if path.is_dir()]
    assert stream.previews and all(shown for _, shown in stream.previews)
    assert {path for path, _ in stream.previews} == {str(folder / PREVIEW_FILE)}
    assert not (folder / PREVIEW_FILE).exists()
    assert sorted(child.name for child in folder.iterdir()) == ["01-txt2img", "02-img2img", "manifest.json"]


def test_without_preview_jsonl_says_null_and_writes_no_file(webui_client, tmp_path):
    stream = Lines()
    frontend = JsonlFrontend(FrontendOptions(), stream=stream)
    runner, log = make_runner(webui_client, [job_spec()], tmp_path, plugins=[frontend], settings=PREVIEWING)
    frontend.run(runner)
    events = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [event["preview"] for event in events if event["event"] == "progress"] == [None] * len(log.statuses())


def test_the_log_says_where_the_preview_is_once_a_stage(webui_client, tmp_path):
    log_file = tmp_path / "jobs.log"
    frontend = LogFrontend(attrs.evolve(OPTIONS, log_file=log_file, log_format="%(message)s"))
    runner, _ = make_runner(webui_client, [job_spec(("txt2img", "img2img", "upscale"), steps=10)], tmp_path / "out", plugins=[frontend], settings=PREVIEWING)
    frontend.run(runner)
    [folder] = (tmp_path / "out").iterdir()
    said = [line for line in log_file.read_text().splitlines() if "live preview" in line]
    assert said == [f"lighthouse: live preview in {folder / PREVIEW_FILE} (replaced as it changes)"] * 2  # the upscale samples nothing
    assert not (folder / PREVIEW_FILE).exists()


def test_the_console_shows_where_the_preview_is_while_the_job_runs(webui_client, tmp_path):
    frontend = ConsoleFrontend(OPTIONS, console=Console(file=io.StringIO(), width=200, force_terminal=True))
    views = []

    class Look:
        from sdjobs import hookimpl

        @hookimpl
        def sdjobs_progress(self):
            views.append(rendered(frontend.view()))

    runner, _ = make_runner(webui_client, [job_spec(steps=10)], tmp_path, plugins=[frontend, Look()], settings=PREVIEWING)
    frontend.run(runner)
    [folder] = [path for path in tmp_path.iterdir() if path.is_dir()]
    assert any(f"live preview: {folder / PREVIEW_FILE}" in " ".join(view.split()) for view in views)  # wrapped or not
    assert not (folder / PREVIEW_FILE).exists()


def test_a_jpeg_preview_is_written_as_png_and_junk_is_skipped(tmp_path, caplog):
    jpeg = io.BytesIO()
    Image.new("RGB", (8, 8), "teal").save(jpeg, format="JPEG")
    status = RuntimeStatus("job", "sea", "txt2img", 0, 1, folder=tmp_path, preview=base64.b64encode(jpeg.getvalue()).decode())
    preview = PreviewFiles(enabled=True)
    assert preview.update(status) == tmp_path / PREVIEW_FILE and a_png_file(tmp_path / PREVIEW_FILE)
    with caplog.at_level(logging.DEBUG, logger="sdjobs.frontends.preview"):
        assert preview.update(attrs.evolve(status, preview="bm90IGFuIGltYWdl")) == tmp_path / PREVIEW_FILE  # "not an image"
    assert re.search(r"sea: live preview not written: .*cannot identify image", caplog.text)
    assert a_png_file(tmp_path / PREVIEW_FILE)  # the last good one stays
    preview.remove("job")
    assert list(tmp_path.iterdir()) == []
