"""Job files: what a job is (`JobSpec`, `StageSpec`), how it is read and checked, and its plan.

A job file is TOML.  Its settings use the WebUI's own request field names, so a
key is valid when the stage's endpoint accepts it (`sdjobs.webui_fields` lists
them, from A1111's request models).  Everything is checked when the file is read, before
anything is queued: each mistake becomes one `JobFileError` naming the file, the
key and what is wrong.  Stages are numbered from 1 in messages, as in the output
folders and the progress display.

The rules:

* `[settings]` apply to every generation stage (txt2img, img2img, adetailer, an
  upscale through img2img) unless the stage sets the key itself; `width` and
  `height` there size the first stage only, since later stages take the
  previous stage's size.
* Each `[[stages]]` table takes its endpoint's request fields plus the sdjobs
  keys `type`, `checkpoint` (not on an extras upscale), and for an `upscale`
  stage `upscaler`, `scale` and `via` (`"extras"`, the default, or
  `"img2img"`).  An `adetailer` stage also takes ADetailer's own `ad_*` keys;
  setting `ad_steps` (likewise `ad_cfg_scale`, `ad_sampler`, ...) turns on its
  `ad_use_steps` switch unless the file sets the switch itself.
* Anything else goes in a stage's `[stages.extra]` table, which is sent as is.
* A seed of -1 is drawn here, on the client, so it is known before the first
  request.
* `init_images` (a file, a glob or a folder, relative to the job file) makes a
  job start from images instead of txt2img: its first stage is img2img,
  adetailer or upscale, and each stage takes its input's size unless it sets
  its own.  One job per image (named `name: cat.png`), or one job with them
  all (`per_image = false`).  The images are read and checked here, once, and
  carried in the spec (`JobSpec.inputs`), so a queued job no longer needs the
  files.  An image's infotext fills `prompt`, `negative_prompt` and `seed`
  wherever the file leaves them out (with `per_image = false`, the first
  image's).
"""

from __future__ import annotations

import base64
import difflib
import glob
import io
import json
import math
import os
import random
import re
import tomllib
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any

import attrs
from PIL import Image
from sdjobs.infotext import Infotext
from sdjobs.webui_fields import ADETAILER_FIELDS, FIELDS, MANAGED_FIELDS

STAGE_TYPES = ("txt2img", "img2img", "adetailer", "upscale")
UPSCALE_VIAS = ("extras", "img2img")

#: The largest seed A1111 draws itself (`random.randrange(4294967294)`).
_SEED_LIMIT = 4294967294

#: ADetailer values that count only when their `ad_use_*` switch is on.
_ADETAILER_SWITCHED = ("steps", "cfg_scale", "checkpoint", "vae", "sampler", "noise_multiplier", "clip_skip")

_TYPE_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string",
               dict: "a table", list: "an array"}  # fmt: skip


def _between(low: float, high: float) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: low <= v <= high), f"between {low} and {high}"


def _at_least(low: int) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: v >= low), f"at least {low}"


_POSITIVE = ((lambda v: v > 0), "greater than 0")
_MULTIPLE_OF_8 = ((lambda v: v > 0 and v % 8 == 0), "a positive multiple of 8")
_UNIT = _between(0, 1)

#: Ranges checked beyond the type; the description completes "must be ...".
_RANGES: Mapping[str, tuple[Callable[[Any], bool], str]] = {
    "seed": _between(-1, 2**32 - 1), "subseed": _between(-1, 2**32 - 1),
    "steps": _at_least(1), "n_iter": _at_least(1), "batch_size": _at_least(1),
    "hr_second_pass_steps": _at_least(0),
    "width": _MULTIPLE_OF_8, "height": _MULTIPLE_OF_8,
    "cfg_scale": _POSITIVE, "hr_scale": _POSITIVE, "scale": _POSITIVE,
    "denoising_strength": _UNIT, "subseed_strength": _UNIT,
    "gfpgan_visibility": _UNIT, "codeformer_visibility": _UNIT, "codeformer_weight": _UNIT,
    "extras_upscaler_2_visibility": _UNIT,
    "ad_confidence": _UNIT, "ad_denoising_strength": _UNIT, "ad_steps": _at_least(1),
}  # fmt: skip

_TOP_LEVEL_KEYS = (
    "name", "prompt", "negative_prompt", "seed", "checkpoint", "settings", "stages", "init_images", "per_image",
)  # fmt: skip
#: Top-level keys that make one file many jobs (`sdjobs.expand`).
EXPANSION_KEYS = (
    "prompts", "prompts_file", "wildcards", "matrix", "count", "seed_policy",
)  # fmt: skip
_SIZE_KEYS = ("width", "height")
#: The files a folder named by `init_images` contributes.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


class JobFileError(Exception):
    """A job file (or mapping) that cannot be run, with the file, the key and what is wrong.

    `str()` is one line, `"jobs/x.toml: stages[2].denoise: unknown key"`, fit
    to print as is; the command line exits with status 2 on it.

    Attributes:
        path: The job file; None for a mapping that came from no file.
        key: Where in the file, `"stages[2].denoise"`; None for the whole file.
        message: What is wrong.
    """

    def __init__(self, path: Path | None, key: str | None, message: str) -> None:
        super().__init__(path, key, message)
        self.path = path
        self.key = key
        self.message = message

    def __str__(self) -> str:
        return ": ".join(str(part) for part in (self.path, self.key, self.message) if part is not None)


# --------------------------------------------------------------------------
# Values
# --------------------------------------------------------------------------


def freeze(value: Any) -> Any:
    """A read-only copy of a TOML value: tables become mapping proxies, arrays tuples."""
    if isinstance(value, Mapping):
        return MappingProxyType({key: freeze(item) for key, item in value.items()})
    if isinstance(value, list | tuple):
        return tuple(freeze(item) for item in value)
    return value


def thaw(value: Any) -> Any:
    """A plain, JSON-ready copy of a frozen value: dicts and lists again."""
    if isinstance(value, Mapping):
        return {key: thaw(item) for key, item in value.items()}
    if isinstance(value, tuple):
        return [thaw(item) for item in value]
    return value


def _frozen_mapping() -> Any:
    return attrs.field(factory=dict, converter=freeze)


@attrs.frozen
class StageSpec:
    """One stage of a job, with its settings already merged with the job's `[settings]`.

    Attributes:
        type: `txt2img`, `img2img`, `adetailer` or `upscale`.
        settings: WebUI request fields for this stage's endpoint.
        extra: The `[stages.extra]` pass-through, merged last into the request as is.
        adetailer: ADetailer's settings (`ad_*`) for an `adetailer` stage, with
            the `ad_use_*` switches that its values imply.
        upscaler: The upscaler of an `upscale` stage.
        scale: The factor of an `upscale` stage.
        via: How an `upscale` stage runs: `"extras"` or `"img2img"`; None for other stages.
        checkpoint: A checkpoint for this stage alone (beats the job's).
        server: With several servers, the one this stage must run on (its `name`); None: any.
        tags: With several servers, the tags the server running this stage must have (all of them).
    """

    type: str = attrs.field(validator=attrs.validators.in_(STAGE_TYPES))
    settings: Mapping[str, Any] = _frozen_mapping()
    extra: Mapping[str, Any] = _frozen_mapping()
    adetailer: Mapping[str, Any] = _frozen_mapping()
    upscaler: str | None = None
    scale: float | None = None
    via: str | None = attrs.field(default=None, validator=attrs.validators.in_((None, *UPSCALE_VIAS)))
    checkpoint: str | None = None
    server: str | None = None
    tags: tuple[str, ...] = attrs.field(default=(), converter=tuple)

    @property
    def endpoint(self) -> str:
        """The WebUI route this stage posts to, after `/sdapi/v1/`."""
        if self.type == "txt2img":
            return "txt2img"
        if self.type == "upscale" and self.via != "img2img":
            return "extra-single-image"
        return "img2img"

    def to_dict(self) -> dict[str, Any]:
        """The stage as plain JSON-ready data (for the manifest and the store)."""
        return thaw(attrs.asdict(self, recurse=False))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StageSpec:
        """The stage `to_dict` made, rebuilt equal (for a job read back from the store)."""
        return cls(**data)


def _valid_stages(instance: JobSpec, attribute: attrs.Attribute, stages: tuple[StageSpec, ...]) -> None:
    types = [stage.type for stage in stages]
    if not types or "txt2img" in types[1:] or (types[0] == "txt2img") == bool(instance.inputs):
        raise ValueError(
            f"a job's stages start with its only txt2img stage, or without one from its inputs; got {types}"
            f" with {len(instance.inputs)} inputs"
        )


@attrs.frozen
class JobSpec:
    """A job: one prompt and seed carried through an ordered chain of stages.

    Build one with `load_job` or `JobSpec.from_mapping`; both check everything
    and resolve a seed of -1.  Derive changed copies with `attrs.evolve`.

    Attributes:
        name: The job's name (its output folder's name is made from it).
        prompt: The prompt every generation stage sends.
        negative_prompt: The negative prompt every generation stage sends.
        seed: The seed every generation stage sends; never -1.
        settings: The job's `[settings]`, as written (stages hold them merged).
        stages: The stages: txt2img first, or (with `inputs`) no txt2img at all.
        checkpoint: A checkpoint for every stage that does not name its own.
        source: The job file, when it came from one.
        inputs: The encoded images the first stage starts from, one request
            each; empty for a job that starts with txt2img.  Shown in the
            repr by count only.
    """

    name: str
    prompt: str
    negative_prompt: str
    seed: int = attrs.field(validator=attrs.validators.ge(0))
    settings: Mapping[str, Any] = _frozen_mapping()
    stages: tuple[StageSpec, ...] = attrs.field(default=(), converter=tuple, validator=_valid_stages)
    checkpoint: str | None = None
    source: Path | None = None
    inputs: tuple[bytes, ...] = attrs.field(
        default=(), converter=tuple, repr=lambda inputs: f"<images: {len(inputs)}>"
    )

    @classmethod
    def from_mapping(
        cls,
        data: Any,
        source: Path | str | None = None,
        rng: random.Random | None = None,
        images: Sequence[InitImage] | None = None,
    ) -> JobSpec:
        """Check a decoded job file and build its spec; raise `JobFileError` on any mistake.

        `rng` draws the seed when the file asks for a random one (-1).  `images`
        are the job's inputs when the caller has read them already (a file of
        many jobs, `sdjobs.expand`); None reads those `init_images` names.
        """
        reader = _JobReader(None if source is None else Path(source))
        return reader.read(data, rng or random.Random(), images)

    def plan(self) -> tuple[StagePlan, ...]:
        """What each stage is expected to do, for `sdjobs check` and progress weights."""
        previous = StagePlan.of_inputs(self.inputs) if self.inputs else None
        plans: list[StagePlan] = []
        for stage in self.stages:
            previous = StagePlan.of(stage, previous)
            plans.append(previous)
        return tuple(plans)

    def to_dict(self, *, inputs: bool = True) -> dict[str, Any]:
        """The spec as plain JSON-ready data: for the store, or without the images (`inputs=False`) for the manifest.

        The images are base64 text; left out, the spec reads back as one with no
        inputs, so `from_dict` refuses it when its first stage is not txt2img.
        """
        data = thaw(attrs.asdict(self, recurse=False, filter=lambda field, _: field.name != "inputs"))
        data["stages"] = [stage.to_dict() for stage in self.stages]
        data["source"] = None if self.source is None else str(self.source)
        if inputs:
            data["inputs"] = [base64.b64encode(png).decode("ascii") for png in self.inputs]
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> JobSpec:
        """The spec `to_dict` made, rebuilt equal: seed and merged stage settings as they were.

        Not a job file's reader: nothing is merged or drawn again, so a queued
        job runs exactly as it was submitted.  Raises `TypeError` or `ValueError`
        for data `to_dict` did not make.
        """
        source = data.get("source")
        return cls(
            **{key: value for key, value in data.items() if key not in ("stages", "source", "inputs")},
            stages=tuple(StageSpec.from_dict(stage) for stage in data["stages"]),
            source=None if source is None else Path(source),
            inputs=tuple(base64.b64decode(text, validate=True) for text in data.get("inputs", ())),
        )


@attrs.frozen
class InitImage:
    """One image a job file's `init_images` names, read and checked (`read_init_images`).

    Attributes:
        path: The file it was read from.
        data: The file's bytes, as they will be sent.
        infotext: Its A1111 infotext (the PNG text `parameters`), when it has one.
    """

    path: Path
    data: bytes = attrs.field(repr=False)
    infotext: Infotext | None


def read_init_images(source: Path | None, data: Mapping[str, Any]) -> tuple[InitImage, ...]:
    """The images a decoded job file's `init_images` names, in name order; () when it names none.

    The key holds a file, a glob (`photos/*.png`, `**` too) or a folder (its
    files ending in one of `IMAGE_SUFFIXES`), relative to the job file (to the
    working folder for a mapping from no file).  Every file is read whole and
    decoded once, so a file that is not an image is refused here, by name,
    before anything is queued.  Raises `JobFileError` naming the key.
    """
    pattern = data.get("init_images")
    if pattern is None:
        return ()

    def fail(message: str) -> JobFileError:
        return JobFileError(source, "init_images", message)

    if not isinstance(pattern, str) or not pattern.strip():
        raise fail(f"must be a file, a glob or a folder (relative to the job file), got {_shown(pattern)}")
    base = Path.cwd() if source is None else source.parent
    named = base / pattern
    if named.is_dir():
        files = sorted(path for path in named.iterdir() if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file())
        if not files:
            raise fail(f"the folder {named} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    elif named.is_file():
        files = [named]
    else:
        files = sorted(base / match for match in glob.glob(pattern, root_dir=base, recursive=True))
        files = [path for path in files if path.is_file()]
        if not files:
            raise fail(f"no file matches {str(named)!r}")
    return tuple(_init_image(path, fail) for path in files)


def _init_image(path: Path, fail: Callable[[str], JobFileError]) -> InitImage:
    try:
        data = path.read_bytes()
    except OSError as error:
        raise fail(f"cannot read {path}: {error.strerror or error}") from None
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            parameters = getattr(image, "text", {}).get("parameters")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise fail(f"{path} is not an image Pillow can read ({error})") from None
    return InitImage(path, data, None if parameters is None else Infotext.parse(parameters))


def image_size(data: bytes) -> tuple[int, int]:
    """`(width, height)` of an encoded image; reads only its header."""
    with Image.open(io.BytesIO(data)) as image:
        return image.size


def read_toml(path: Path) -> dict[str, Any]:
    """A job file decoded; `JobFileError` when it is missing, unreadable or not TOML."""
    try:
        with path.open("rb") as file:
            return tomllib.load(file)
    except FileNotFoundError:
        raise JobFileError(path, None, "no such file") from None
    except (OSError, UnicodeDecodeError) as error:
        raise JobFileError(path, None, f"cannot read: {getattr(error, 'strerror', None) or error}") from None
    except tomllib.TOMLDecodeError as error:
        raise JobFileError(path, None, f"not valid TOML: {error}") from None


def load_job(path: Path | str, *, rng: random.Random | None = None) -> JobSpec:
    """Read and check a TOML job file of one job; raise `JobFileError` on any mistake.

    A file that expands to many jobs (`prompts`, `[matrix]`, ...) is read with
    `sdjobs.expand.load_jobs`.
    """
    path = Path(path)
    return JobSpec.from_mapping(read_toml(path), source=path, rng=rng)


# --------------------------------------------------------------------------
# Reading and checking
# --------------------------------------------------------------------------


def did_you_mean(key: str, choices: Iterable[str]) -> str:
    """A hint naming the choice `key` was probably meant to be, or "".

    A long shared start counts most (`denoise` means `denoising_strength`, not
    `s_noise`); failing that, the closest spelling.
    """
    choices = list(choices)

    def shared_start(choice: str) -> int:
        return len(os.path.commonprefix([key, choice]))

    ranked = sorted(choices, key=lambda choice: (-shared_start(choice), len(choice)))
    shared = shared_start(ranked[0]) if ranked else 0
    if len(key) >= 3 and shared >= min(4, len(key)) and 2 * shared >= len(key):
        return f" (did you mean {ranked[0]!r}?)"
    match = difflib.get_close_matches(key, choices, n=1, cutoff=0.6)
    return f" (did you mean {match[0]!r}?)" if match else ""


@attrs.frozen
class _JobReader:
    """Checks one decoded job file, raising the first mistake as a `JobFileError`."""

    source: Path | None

    def fail(self, key: str | None, message: str) -> JobFileError:
        return JobFileError(self.source, key, message)

    def read(self, data: Any, rng: random.Random, images: Sequence[InitImage] | None) -> JobSpec:
        """The job of `data`, started from `images` (None: those its `init_images` names, read here)."""
        if not isinstance(data, Mapping):
            raise self.fail(None, "a job is a table of keys")
        for key in data:
            if key not in _TOP_LEVEL_KEYS:
                raise self.fail(toml_key(key), self.unknown_top_level(str(key)))
        per_image = self.value(data, "per_image", "per_image", bool, default=True)
        if "per_image" in data and "init_images" not in data:
            raise self.fail("per_image", "only means something with init_images")
        images = read_init_images(self.source, data) if images is None else images
        if per_image and len(images) > 1:
            raise self.fail("init_images", f"names {len(images)} images, a job each, which this reader does not"
                            " expand (sdjobs.expand.load_jobs does); per_image = false makes one job of them all")  # fmt: skip
        settings = self.table(data, "settings", "settings")
        for key, value in settings.items():
            self.check_setting("settings", key, value, FIELDS["txt2img"] | FIELDS["img2img"])
            if images and key in _SIZE_KEYS:
                raise self.fail(f"settings.{key}", "not used: a job from init_images takes their size (a stage may set its own)")
        raw_stages = data.get("stages")
        if raw_stages is None:
            raise self.fail("stages", "missing: a job needs at least one [[stages]] table")
        if not isinstance(raw_stages, list) or not raw_stages:
            raise self.fail("stages", "must be an array of tables ([[stages]]), at least one")
        infotext = images[0].infotext if images else None
        seed = self.value(data, "seed", "seed", int, default=-1 if infotext is None or infotext.seed is None else infotext.seed)
        name = self.name(data)
        return JobSpec(
            name=f"{name}: {images[0].path.name}" if images and per_image else name,
            prompt=self.value(data, "prompt", "prompt", str, default="" if infotext is None else infotext.prompt),
            negative_prompt=self.value(
                data, "negative_prompt", "negative_prompt", str, default="" if infotext is None else infotext.negative_prompt
            ),
            seed=rng.randrange(_SEED_LIMIT) if seed == -1 else seed,
            settings=settings,
            stages=tuple(self.stage(raw, index, settings, bool(images)) for index, raw in enumerate(raw_stages)),
            checkpoint=self.text(data, "checkpoint", "checkpoint"),
            source=self.source,
            inputs=tuple(image.data for image in images),
        )

    def unknown_top_level(self, key: str) -> str:
        if any(key in fields for fields in FIELDS.values()):
            return "unknown key here; WebUI settings go in [settings] or in a stage"
        if key in EXPANSION_KEYS:
            return "makes a file of many jobs, which this reader does not expand (sdjobs.expand.load_jobs does)"
        return "unknown key" + did_you_mean(key, _TOP_LEVEL_KEYS + EXPANSION_KEYS)

    def name(self, data: Mapping[str, Any]) -> str:
        default = None if self.source is None else self.source.stem
        name = self.value(data, "name", "name", str, default=default)
        if name is None:
            raise self.fail("name", "missing: a job needs a name")
        if not name.strip():
            raise self.fail("name", "must not be empty")
        return name

    def stage(self, raw: Any, index: int, job_settings: Mapping[str, Any], from_images: bool) -> StageSpec:
        where = f"stages[{index + 1}]"
        if not isinstance(raw, Mapping):
            raise self.fail(where, "must be a table ([[stages]])")
        stage_type = self.stage_type(raw, where, first=index == 0, from_images=from_images)
        via = None
        if stage_type == "upscale":
            via = self.value(raw, "via", f"{where}.via", str, default="extras")
            if via not in UPSCALE_VIAS:
                raise self.fail(f"{where}.via", f"must be one of: {', '.join(UPSCALE_VIAS)}; got {via!r}")
        endpoint = StageSpec(stage_type, via=via).endpoint
        if endpoint == "extra-single-image":
            if "checkpoint" in raw:
                raise self.fail(f"{where}.checkpoint", "not allowed here: an extras upscale uses no checkpoint")
            if "upscaler" not in raw:
                raise self.fail(f"{where}.upscaler", "missing: an extras upscale needs an upscaler")
        settings, adetailer = self.stage_settings(raw, where, stage_type, endpoint)
        if endpoint != "extra-single-image":
            skipped = _SIZE_KEYS if index > 0 else ()
            inherited = {k: v for k, v in job_settings.items() if k in FIELDS[endpoint] and k not in skipped}
            settings = inherited | settings
        scale = self.value(raw, "scale", f"{where}.scale", float, default=2.0)
        return StageSpec(
            type=stage_type,
            settings=settings,
            extra=self.table(raw, "extra", f"{where}.extra"),
            adetailer=self.adetailer(where, adetailer) if stage_type == "adetailer" else {},
            upscaler=self.text(raw, "upscaler", f"{where}.upscaler"),
            scale=float(scale) if stage_type == "upscale" else None,
            via=via,
            checkpoint=self.text(raw, "checkpoint", f"{where}.checkpoint"),
            server=self.text(raw, "server", f"{where}.server"),
            tags=self.tags(raw, f"{where}.tags"),
        )

    def tags(self, raw: Mapping[str, Any], path: str) -> tuple[str, ...]:
        """A stage's `tags`: a list of non-empty strings."""
        tags = self.value(raw, "tags", path, list, default=[])
        if not all(isinstance(tag, str) and tag.strip() for tag in tags):
            raise self.fail(path, f"must be a list of non-empty strings, got {_shown(tags)}")
        return tuple(tags)

    def stage_type(self, raw: Mapping[str, Any], where: str, *, first: bool, from_images: bool) -> str:
        stage_type = self.value(raw, "type", f"{where}.type", str, default=None)
        if stage_type is None:
            raise self.fail(f"{where}.type", f"missing; choose one of: {', '.join(STAGE_TYPES)}")
        if stage_type not in STAGE_TYPES:
            hint = did_you_mean(stage_type, STAGE_TYPES)
            raise self.fail(f"{where}.type", f"unknown stage {stage_type!r}{hint}; choose one of: {', '.join(STAGE_TYPES)}")
        if stage_type == "txt2img" and not first:
            raise self.fail(f"{where}.type", "txt2img can only be a job's first stage")
        if first and from_images and stage_type == "txt2img":
            raise self.fail(f"{where}.type", "a job from init_images starts with img2img, adetailer or upscale, not txt2img")
        if first and not from_images and stage_type != "txt2img":
            raise self.fail(f"{where}.type", "a job starts with a txt2img stage, or from images named by init_images")
        return stage_type

    def stage_settings(
        self, raw: Mapping[str, Any], where: str, stage_type: str, endpoint: str
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """A stage's own request fields and ADetailer settings, each checked."""
        sdjobs_keys = self.sdjobs_keys(stage_type, endpoint)
        settings: dict[str, Any] = {}
        adetailer: dict[str, Any] = {}
        for key, value in raw.items():
            if not isinstance(key, str):
                raise self.fail(where, f"keys must be strings, got {key!r}")
            if key in sdjobs_keys:
                continue
            if stage_type == "adetailer" and key.startswith("ad_"):
                adetailer[key] = self.checked(f"{where}.{toml_key(key)}", value, ADETAILER_FIELDS.get(key))
            else:
                settings[key] = self.check_setting(where, key, value, FIELDS[endpoint], sdjobs_keys)
        return settings, adetailer

    @staticmethod
    def sdjobs_keys(stage_type: str, endpoint: str) -> tuple[str, ...]:
        keys = ("type", "extra", "server", "tags")
        if endpoint != "extra-single-image":
            keys += ("checkpoint",)
        if stage_type == "upscale":
            keys += ("upscaler", "scale", "via")
        return keys

    def adetailer(self, where: str, settings: dict[str, Any]) -> dict[str, Any]:
        if "ad_model" not in settings:
            raise self.fail(f"{where}.ad_model", "missing: an adetailer stage needs a detection model")
        switches = {f"ad_use_{name}": True for name in _ADETAILER_SWITCHED if f"ad_{name}" in settings}
        return switches | settings

    def check_setting(
        self,
        where: str,
        key: str,
        value: Any,
        fields: Mapping[str, type],
        sdjobs_keys: tuple[str, ...] = (),
    ) -> Any:
        path = f"{where}.{toml_key(key)}"
        if key in MANAGED_FIELDS:
            raise self.fail(path, f"not allowed here: {MANAGED_FIELDS[key]}")
        if key not in fields:
            if key.startswith("ad_"):
                raise self.fail(path, "ADetailer settings belong in an adetailer stage")
            hint = did_you_mean(key, [*fields, *sdjobs_keys])
            raise self.fail(path, f"unknown key{hint}; pass other request fields in a [stages.extra] table")
        return self.checked(path, value, fields[key])

    def checked(self, path: str, value: Any, kind: type | None) -> Any:
        """`value` if it is of `kind` (None: any) and in its key's range; else raise."""
        if kind is not None and not _is_a(value, kind):
            raise self.fail(path, f"must be {_TYPE_NAMES[kind]}, got {_shown(value)}")
        if isinstance(value, float) and not math.isfinite(value):
            raise self.fail(path, f"must be a finite number, got {value!r}")
        in_range, description = _RANGES.get(path.rpartition(".")[2], (None, ""))
        if in_range is not None and not in_range(value):
            raise self.fail(path, f"must be {description}, got {_shown(value)}")
        return value

    def value(self, data: Mapping[str, Any], key: str, path: str, kind: type, *, default: Any) -> Any:
        if key not in data:
            return default
        return self.checked(path, data[key], kind)

    def text(self, data: Mapping[str, Any], key: str, path: str) -> str | None:
        """An optional, non-empty string."""
        text = self.value(data, key, path, str, default=None)
        if text is not None and not text.strip():
            raise self.fail(path, "must not be empty")
        return text

    def table(self, data: Mapping[str, Any], key: str, path: str) -> Mapping[str, Any]:
        table = self.value(data, key, path, dict, default={})
        for inner in table:
            if not isinstance(inner, str):
                raise self.fail(path, f"keys must be strings, got {inner!r}")
        return table


def toml_key(key: object) -> str:
    """A key as TOML writes it: bare when it can be, else quoted (so a message stays one line)."""
    if isinstance(key, str) and re.fullmatch(r"[A-Za-z0-9_-]+", key):
        return key
    return json.dumps(str(key))


def _is_a(value: Any, kind: type) -> bool:
    if kind is dict:
        return isinstance(value, Mapping)
    if kind is list:
        return isinstance(value, list | tuple)
    if isinstance(value, bool):
        return kind is bool
    if kind is float:
        return isinstance(value, int | float)
    return isinstance(value, kind)


def _shown(value: Any) -> str:
    """A value as a message shows it: TOML's true/false, tables and arrays by kind."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, Mapping):
        return "a table"
    if isinstance(value, list | tuple):
        return "an array"
    return repr(value)


# --------------------------------------------------------------------------
# The plan
# --------------------------------------------------------------------------

#: A1111's request defaults, where a stage's settings leave a value out.
_DEFAULTS: Mapping[str, Any] = {
    "steps": 50, "n_iter": 1, "batch_size": 1, "width": 512, "height": 512,
    "denoising_strength": 0.75, "hr_scale": 2.0, "hr_second_pass_steps": 0,
    "hr_resize_x": 0, "hr_resize_y": 0,
    "ad_use_steps": False, "ad_steps": 28, "ad_denoising_strength": 0.4,
}  # fmt: skip

#: Faces ADetailer is assumed to find in each image before it has run.
ASSUMED_FACES = 1

#: The cost of an extras request, in sampling steps: small but not nothing.
EXTRAS_COST = 1.0


def img2img_steps(steps: int, denoising: float) -> int:
    """Steps an img2img pass really samples: A1111 runs `int(steps * denoising) + 1`."""
    return int(min(denoising, 0.999) * steps) + 1


def multiple_of_8(pixels: float) -> int:
    """The size A1111 makes when asked for `pixels`: it works in latents 1/8 the size."""
    return max(8, int(pixels) // 8 * 8)


@attrs.frozen
class StagePlan:
    """What one stage is expected to do, worked out from its settings before it runs.

    The model follows A1111: a stage after the first runs one request per image
    of the previous stage.  Within one request, each of `n_iter` iterations
    samples `steps`; hires fix adds a second pass of `hr_second_pass_steps` (or
    `steps`); an img2img pass samples `int(steps * denoising) + 1`; an adetailer
    request samples one step for its skipped img2img pass, then inpaints each face
    (`ASSUMED_FACES` until it has run) with `ad_steps` (when `ad_use_steps`, else
    `steps`) scaled by `ad_denoising_strength`.  `batch_size` images are sampled
    together, so they add images, not steps.  Extras sample nothing.

    Attributes:
        type: The stage's type.
        endpoint: The route it posts to.
        requests: HTTP requests the stage sends.
        iterations: Iterations (`n_iter`) each request samples, one after another.
        images: Images the stage produces in all.
        steps: Sampling steps one request runs, all passes together.
        passes: Sampling passes one request runs: the `job_count` the server
            should report for it (n_iter, doubled by hires, plus ADetailer's faces).
        size: `(width, height)` of the images it produces.
        cost: A relative weight for progress and ETA across stages: the steps of
            all its requests (`EXTRAS_COST` per extras request).
        shown_steps: The passes one image goes through as the run shows them,
            `(kind, steps)` in order, `steps` being the y of the run's step x/y:
            `("main", 40)`, then `("hires", 20)` with hires fix; an adetailer
            stage `("face", 9)`, once per face found (its img2img pass is
            skipped).  Empty for extras, which sample nothing.
    """

    type: str
    endpoint: str
    requests: int
    iterations: int
    images: int
    steps: int
    passes: int
    size: tuple[int, int]
    cost: float
    shown_steps: tuple[tuple[str, int], ...] = ()

    @classmethod
    def of_inputs(cls, inputs: Sequence[bytes]) -> StagePlan:
        """What a job's input images feed its first stage, as if a stage had made them.

        Only `images` and `size` (the first image's) count; they plan the first
        stage as they would plan a later one.
        """
        return cls(
            type="init_images", endpoint="", requests=0, iterations=0, images=len(inputs),
            steps=0, passes=0, size=image_size(inputs[0]), cost=0.0,
        )  # fmt: skip

    @classmethod
    def of(cls, stage: StageSpec, previous: StagePlan | None) -> StagePlan:
        """Plan `stage`, fed with the images `previous` produces (None for a txt2img stage)."""
        setting = {**_DEFAULTS, **stage.settings, **stage.adetailer}
        requests = 1 if previous is None else previous.images
        width, height = (setting["width"], setting["height"]) if previous is None else previous.size
        if stage.endpoint == "extra-single-image":
            size = (int(width * stage.scale), int(height * stage.scale))
            return cls(stage.type, stage.endpoint, requests, 1, requests, 0, 1, size, requests * EXTRAS_COST)
        if previous is not None:
            if stage.type == "upscale":
                width, height = multiple_of_8(width * stage.scale), multiple_of_8(height * stage.scale)
            width, height = stage.settings.get("width", width), stage.settings.get("height", height)
        steps, passes, size = setting["steps"], 1, (width, height)
        shown: tuple[tuple[str, int], ...] = (("main", steps),)
        if stage.type == "txt2img" and stage.settings.get("enable_hr"):
            shown += (("hires", setting["hr_second_pass_steps"] or steps),)
            steps += shown[1][1]
            passes = 2
            size = _hires_size(width, height, setting)
        elif stage.type == "adetailer":
            ad_steps = setting["ad_steps"] if setting["ad_use_steps"] else steps
            shown = (("face", img2img_steps(ad_steps, setting["ad_denoising_strength"])),)
            steps = 1 + ASSUMED_FACES * shown[0][1]
            passes += ASSUMED_FACES
        elif stage.type != "txt2img":
            steps = img2img_steps(steps, setting["denoising_strength"])
            shown = (("main", steps),)
        n_iter = setting["n_iter"]
        return cls(
            type=stage.type,
            endpoint=stage.endpoint,
            requests=requests,
            iterations=n_iter,
            images=requests * n_iter * setting["batch_size"],
            steps=n_iter * steps,
            passes=n_iter * passes,
            size=size,
            cost=float(requests * n_iter * steps),
            shown_steps=shown,
        )


def _hires_size(width: int, height: int, setting: Mapping[str, Any]) -> tuple[int, int]:
    """The size hires fix upscales to: `hr_resize_x/y` (one keeps the aspect) or `hr_scale`."""
    x, y = setting["hr_resize_x"], setting["hr_resize_y"]
    if x and y:
        return multiple_of_8(x), multiple_of_8(y)
    if x:
        return multiple_of_8(x), multiple_of_8(x * height / width)
    if y:
        return multiple_of_8(y * width / height), multiple_of_8(y)
    return multiple_of_8(width * setting["hr_scale"]), multiple_of_8(height * setting["hr_scale"])
