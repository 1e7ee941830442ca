"""Running a generation the way `process_images` moves A1111's state.

The state changes, in order, are what a polling client sees (`reference/traces/`):
`begin()` (job_count −1 for a moment), the job count, then per pass a moment of
conditioning that still shows the last pass's `sampling_steps`, the steps (the callback
reports the 0-based step just finished, so `sampling_step` stays 0 through two steps),
and after the last step a decode while it still shows `steps − 1` (a latent hires
upscale decodes nothing).  `nextjob()` comes after every iteration and before a hires
pass; ADetailer then raises `job_count` so progress drops back.  An interrupt or skip
lets the running step finish and show; what exists is decoded, then the answer.
"""

from __future__ import annotations

import os
import random
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import attrs
from PIL import Image

from . import images
from .adetailer import AdetailerRun
from .catalog import Catalog
from .errors import ApiError
from .fifo import FifoLock
from .infotext import GenerationInfo, extras_html_info
from .settings import SimSettings
from .state import SharedState

T = TypeVar("T")

CRASH_STATUS = 70  # the exit status of a `stop_after_steps` crash (EX_SOFTWARE)

# Pauses where A1111 does work that is not sampling, in moments (the profile's conditioning).
_SETUP_MOMENTS = 0.25  # between begin() and the job count: job_count reads -1
_DETECTION_MOMENTS = 2.0  # ADetailer's detector: progress reads 1.0


class ConnectionDropped(Exception):
    """The generation's connection must be closed without an answer (a fault setting)."""


@attrs.frozen
class Generation:
    """A validated txt2img or img2img request, ready to run.

    Attributes:
        kind: "txt2img" or "img2img".
        params: The request with every field filled in.
        sampler: `sampler_name or sampler_index`, known to exist.
        scheduler: The scheduler's label on a server that splits them (1.9+), else None.
        seed, subseed: Resolved (never -1).
        init_images: Decoded init images (img2img).
        adetailer: What ADetailer will do, if anything.
    """

    kind: str
    params: Mapping[str, Any]
    sampler: str
    seed: int
    subseed: int
    init_images: Sequence[Image.Image] = ()
    adetailer: AdetailerRun | None = None
    scheduler: str | None = None

    @property
    def hires(self) -> bool:
        return self.kind == "txt2img" and bool(self.params["enable_hr"])

    @property
    def main_steps(self) -> int:
        """Sampling steps of the main pass: img2img only runs `int(steps*denoise)+1`."""
        steps = self.params["steps"]
        if self.kind == "img2img":
            return int(min(self.params["denoising_strength"] or 0.0, 0.999) * steps) + 1
        return steps

    @property
    def hires_steps(self) -> int:
        return self.params["hr_second_pass_steps"] or self.params["steps"]

    @property
    def batch_size(self) -> int:
        return self.params["batch_size"]

    @property
    def size(self) -> tuple[int, int]:
        """Pixels of a first-pass image: the request's size rounded down to the latent grid."""
        return (
            images.round_down_to_latent(self.params["width"]),
            images.round_down_to_latent(self.params["height"]),
        )

    @property
    def hires_size(self) -> tuple[int, int]:
        p = self.params
        width, height = p["width"], p["height"]
        if p["hr_resize_x"] or p["hr_resize_y"]:
            target_w = p["hr_resize_x"] or p["hr_resize_y"] * width // height
            target_h = p["hr_resize_y"] or p["hr_resize_x"] * height // width
        else:
            target_w, target_h = int(width * p["hr_scale"]), int(height * p["hr_scale"])
        return images.round_down_to_latent(target_w), images.round_down_to_latent(target_h)

    def extra_generation_params(self) -> dict[str, Any]:
        p = self.params
        extra: dict[str, Any] = {}
        if self.kind == "img2img" or self.hires:
            extra["Denoising strength"] = p["denoising_strength"]
        if self.hires:
            if p["hr_resize_x"] or p["hr_resize_y"]:
                extra["Hires resize"] = f"{p['hr_resize_x']}x{p['hr_resize_y']}"
            else:
                extra["Hires upscale"] = p["hr_scale"]
            extra["Hires steps"] = p["hr_second_pass_steps"] or None
            extra["Hires upscaler"] = p["hr_upscaler"]
        if self.adetailer is not None:
            extra.update(self.adetailer.infotext_params())
        return {key: value for key, value in extra.items() if value is not None}


@attrs.frozen
class Generated:
    """The pictures a generation made (maybe fewer than asked for) and how to describe them."""

    pictures: list[Image.Image]
    info: GenerationInfo


@attrs.frozen
class Upscaled:
    picture: Image.Image
    html_info: str


class Engine:
    """Runs generations and upscales one at a time, moving the shared state as A1111 does."""

    def __init__(
        self, settings: SimSettings, state: SharedState, catalog: Catalog, queue: FifoLock
    ) -> None:
        self._settings = settings
        self._state = state
        self._catalog = catalog
        self._queue = queue
        self._faces = random.Random(settings.fault_seed)
        self._steps_run = 0

    # -- the queue -------------------------------------------------------------

    def run_task(self, job: str, task_id: str, work: Callable[[], T]) -> T:
        """A1111's API route body: queue the task, take the lock, begin, work, end.

        A task that raises is never finished, so it keeps reading as the current task
        until another one starts, as in A1111.
        """
        self._state.add_task_to_queue(task_id)
        try:
            with self._queue.hold():
                self._state.begin(job)
                try:
                    self._state.start_task(task_id)
                    result = work()
                    self._state.finish_task(task_id)
                    return result
                finally:
                    self._state.end()
        finally:
            self._state.drop_pending(task_id)

    def wait_for_queue(self) -> None:
        """Wait until every generation queued so far has run (what a model change does)."""
        with self._queue.hold():
            pass

    # -- generation ------------------------------------------------------------

    def generate(self, generation: Generation) -> Generated:
        """`process_images` (called between `begin()` and `end()`)."""
        return _Run(self._settings, self._state, self._catalog, self, generation).process()

    def step_done(self) -> None:
        """Count a sampling step; crash when `stop_after_steps` says so."""
        self._steps_run += 1
        if self._steps_run == self._settings.stop_after_steps:
            _crash()

    def faces_found(self) -> int:
        """How many faces one ADetailer detection finds (generations run one at a time)."""
        return self._faces.randint(*self._settings.faces)

    # -- extras ----------------------------------------------------------------

    def upscale(self, picture: Image.Image, params: Mapping[str, Any]) -> Upscaled:
        """`run_postprocessing` for one image; an unknown upscaler leaves the state stale."""
        with self._queue.hold():
            self._state.begin("extras")
            self._state.update(job_count=1)
            self._state.nextjob()
            timing = self._settings.timing
            self._state.hold(timing.moment)
            self._state.update(job="Upscale")
            upscaler = params["upscaler_1"]
            if not self._catalog.upscaler_exists(upscaler):
                raise ApiError.from_exception(AssertionError(f"could not find upscaler named {upscaler}"))
            result = _upscaled(picture, params)
            self._state.hold(timing.decode(result.picture.size, 1))
            self._state.end()
            return result


def _upscaled(picture: Image.Image, params: Mapping[str, Any]) -> Upscaled:
    if params["resize_mode"] == 1:
        size = (params["upscaling_resize_w"], params["upscaling_resize_h"])
        html = extras_html_info(params["upscaler_1"], None, size)
    else:
        scale = params["upscaling_resize"]
        size = (int(picture.width * scale), int(picture.height * scale))
        html = extras_html_info(params["upscaler_1"], float(scale), None)
    upscaled = picture.convert("RGB").resize(size, Image.Resampling.LANCZOS)
    upscaled.info = {k: v for k, v in picture.info.items() if isinstance(v, str)}
    upscaled.info["postprocessing"] = html
    return Upscaled(upscaled, f"<p>{html}</p>")


def _crash() -> None:
    """What `stop_after_steps` does: end the process at once, as a crashed WebUI."""
    print("sdjobs sim: crashing as --stop-after-steps asked", file=sys.stderr, flush=True)
    os._exit(CRASH_STATUS)


class _Run:
    """One `process_images` call: the passes, the pictures, the step count."""

    def __init__(
        self, settings: SimSettings, state: SharedState, catalog: Catalog, engine: Engine, generation: Generation
    ) -> None:
        self.settings = settings
        self.timing = settings.timing
        self.state = state
        self.catalog = catalog
        self.engine = engine
        self.generation = generation
        self.steps_run = 0

    def process(self) -> Generated:
        g, p = self.generation, self.generation.params
        self._check()
        self.state.hold(_SETUP_MOMENTS * self.timing.moment)
        self.state.update(job_count=p["n_iter"] * (2 if g.hires else 1))
        pictures: list[Image.Image] = []
        for iteration in range(p["n_iter"]):
            state = self.state.snapshot()
            if state.skipped:
                self.state.update(skipped=False)
            if state.interrupted:
                break
            job = f"Batch {iteration + 1} out of {p['n_iter']}" if p["n_iter"] > 1 else None
            first_index = iteration * g.batch_size
            batch = self._sample_batch(first_index, job)
            self.state.nextjob()
            if g.adetailer is not None:
                batch = [
                    self._adetail(picture, g.seed + first_index + i) for i, picture in enumerate(batch)
                ]
            pictures += batch
        info = GenerationInfo(
            params=p,
            sampler=g.sampler,
            scheduler=g.scheduler,
            seed=g.seed,
            subseed=g.subseed,
            extra=g.extra_generation_params(),
            job_timestamp=self.state.snapshot().job_timestamp,
            catalog=self.catalog,
        )
        return Generated(pictures, info)

    def _check(self) -> None:
        """The failures A1111 only finds after `begin()` (so `job_timestamp` changes)."""
        g, p = self.generation, self.generation.params
        if self.settings.generation_error is not None:
            raise RuntimeError(self.settings.generation_error)
        for key in p["override_settings"] or {}:
            if key not in self.catalog["option_keys"]:
                raise KeyError(key)
        if g.hires and p["hr_upscaler"] is not None and not self.catalog.hires_upscaler_exists(p["hr_upscaler"]):
            raise Exception(f"could not find upscaler named {p['hr_upscaler']}")  # noqa: TRY002
        if g.kind == "img2img" and not g.init_images:
            raise RuntimeError(
                "Expected 3D (unbatched) or 4D (batched) input to conv2d, but got input of size: [0]"
            )

    def _sample_batch(self, first_index: int, job: str | None) -> list[Image.Image]:
        """One iteration: its passes, then the decode of what they made."""
        g, p = self.generation, self.generation.params
        seeds = [g.seed + first_index + i for i in range(g.batch_size)]
        if g.kind == "img2img":
            inits = [g.init_images[(first_index + i) % len(g.init_images)] for i in range(len(seeds))]
            if g.adetailer is not None and g.adetailer.skip_img2img:
                return [init.convert("RGB").resize(g.size) for init in inits]
            self._sample(g.main_steps, g.size, g.batch_size, job)
            self.state.hold(self.timing.decode(g.size, g.batch_size))
            return [
                images.blend(init, images.render(seed, p["prompt"], *g.size), p["denoising_strength"])
                for init, seed in zip(inits, seeds, strict=True)
            ]
        self._sample(g.main_steps, g.size, g.batch_size, job)
        size = g.size
        if g.hires and not self.state.snapshot().interrupted:
            if not self.catalog.is_latent_upscaler(p["hr_upscaler"]):
                self.state.hold(self.timing.decode(size, g.batch_size))  # decoded to upscale
            self.state.nextjob()
            size = g.hires_size
            self._sample(g.hires_steps, size, g.batch_size)
        self.state.hold(self.timing.decode(size, g.batch_size))
        return [images.render(seed, p["prompt"], *size) for seed in seeds]

    def _adetail(self, picture: Image.Image, seed: int) -> Image.Image:
        """ADetailer's `postprocess_image`: per tab, detect, then inpaint each mask."""
        assert self.generation.adetailer is not None
        for tab in self.generation.adetailer.tabs:
            if self.state.stopped():
                continue
            self.state.hold(_DETECTION_MOMENTS * self.timing.moment)
            faces = self.engine.faces_found()
            if tab.args["ad_mask_k"]:
                faces = min(faces, tab.args["ad_mask_k"])
            if not faces:
                continue
            self.state.add_jobs(faces)
            for _ in range(faces):
                self._sample(tab.inpaint_steps(self.generation.params["steps"]), picture.size, 1)
                self.state.hold(self.timing.decode(picture.size, 1))
                self.state.nextjob()
                if self.state.stopped():
                    break
            picture = images.repaint_faces(picture, faces, seed)
        return picture

    def _sample(self, steps: int, size: tuple[int, int], batch: int, job: str | None = None) -> None:
        """One sampler run: conditioning (stale `sampling_steps`), then `launch_sampling`.

        Interrupt and skip end it before the next step: A1111's denoiser raises there.
        """
        self.state.hold(self.timing.moment)
        self.state.update(sampling_steps=steps, sampling_step=0, **({"job": job} if job else {}))
        for step in range(steps):
            if self.state.stopped():
                return
            self.state.run_step(self.timing.step(size, batch, first=self.steps_run == 0))
            self.steps_run += 1
            self.state.update(sampling_step=step)
            self.engine.step_done()
            if self.steps_run == self.settings.drop_connection_at_step:
                raise ConnectionDropped
