"""Shared pieces of the benchmarks: the 4-stage job, a runner, a table printer."""

from __future__ import annotations

import contextlib
import re
import signal
import subprocess
import sys
import statistics
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from sdjobs.client import WebUIClient
from sdjobs.hooks import Hooks, make_plugin_manager
from sdjobs.job import JobSettings
from sdjobs.runner import Runner
from sdjobs.spec import JobSpec


def four_stage_job(steps: int = 20) -> JobSpec:
    """txt2img → img2img → ADetailer → extras upscale, 64×64, one image."""
    return JobSpec.from_mapping(
        {
            "name": "bench",
            "prompt": "a lighthouse",
            "seed": 1234,
            "settings": {"steps": steps, "width": 64, "height": 64, "sampler_name": "Euler a"},
            "stages": [
                {"type": "txt2img"},
                {"type": "img2img", "denoising_strength": 0.5},
                {"type": "adetailer", "ad_model": "face_yolov8n.pt"},
                {"type": "upscale", "upscaler": "Lanczos", "scale": 2},
            ],
        }
    )


def plugin_hooks(plugins: Iterable[object] = ()) -> Hooks:
    """The built-in plugins (the poller included) and ``plugins``, loaded once."""
    return Hooks(make_plugin_manager(load_entry_points=False, disabled=(), plugins=plugins))


@contextlib.contextmanager
def runner_for(
    specs: Sequence[JobSpec], client: WebUIClient, plugins: Iterable[object] = (), **settings: object
) -> Iterator[Runner]:
    """A runner of ``specs`` with the built-in poller and ``plugins``, writing to a temporary folder."""
    with tempfile.TemporaryDirectory() as out:
        yield Runner(specs=specs, client=client, hooks=plugin_hooks(plugins), out_dir=Path(out), settings=JobSettings(**settings))


def run_jobs(
    specs: Sequence[JobSpec], client: WebUIClient, plugins: Iterable[object] = (), **settings: object
) -> Runner:
    """Run ``specs`` to the end; return the runner."""
    with runner_for(specs, client, plugins, **settings) as runner:
        runner.run()
    return runner


@contextlib.contextmanager
def simulator_process(step_time: float) -> Iterator[str]:
    """`sdjobs sim` in a process of its own, as a real WebUI is; yields its URL."""
    command = [sys.executable, "-m", "sdjobs", "sim", "--port", "0"]
    command += ["--step-time", str(step_time), "--first-step-time", str(step_time)]
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True) as server:
        try:
            line = server.stdout.readline()  # "Simulated WebUI at http://127.0.0.1:PORT (...)"
            yield re.search(r"http://\S+", line).group(0)
        finally:
            server.send_signal(signal.SIGINT)
            server.wait(timeout=10)


def percentile(values: Sequence[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)
