"""One job file, many jobs: prompt lists, wildcards, a settings matrix, repetitions.

`load_jobs` reads a file that may set, besides an ordinary job's keys:

* `prompts = [...]` or `prompts_file = "prompts.txt"` (one prompt a line; blank
  lines and `#` comments skipped) instead of `prompt`;
* `__name__` wildcards in a prompt, each replaced by a line of `name.txt` in the
  folder `wildcards/` beside the job file (or `wildcards = "dir"`); a chosen line
  may hold wildcards of its own;
* `[matrix]`: arrays of values for a setting (`cfg_scale = [5, 7]`), for
  `checkpoint` or `negative_prompt`, or for one stage's key
  (`"stages[2].denoising_strength" = [0.3, 0.5]`); every combination is a job;
* `count = N` repetitions of each, seeded by `seed_policy`: `"increment"` (the
  default: repetition k of seed S uses S + k, so every combination of the matrix
  sees the same seeds), `"fixed"` (all use S) or `"random"` (every job draws its own).

Wildcards are drawn from a generator seeded by the file's seed, once per prompt
and repetition, so a rerun of a file with a fixed seed gives the same jobs, and
the combinations of the matrix share their prompt text.  Each job is an
ordinary `JobSpec` whose name says which variation it is:
`lighthouse #2 cfg_scale=7 r3` (prompt 2, the matrix's values, repetition 3).
"""

from __future__ import annotations

import itertools
import math
import random
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
from sdjobs.spec import (
    EXPANSION_KEYS,
    InitImage,
    JobFileError,
    JobSpec,
    did_you_mean,
    read_init_images,
    read_toml,
    toml_key,
)
from sdjobs.webui_fields import FIELDS

SEED_POLICIES = ("increment", "fixed", "random")

#: The most jobs a file may expand to unless the caller raises the limit (`--yes`).
DEFAULT_LIMIT = 10_000

#: Top-level keys a matrix may vary besides the `[settings]` fields.
_MATRIX_TOP_LEVEL = ("checkpoint", "negative_prompt")
_SETTING_FIELDS = sorted(FIELDS["txt2img"].keys() | FIELDS["img2img"].keys())
_STAGE_KEY = re.compile(r"stages\[(\d+)\]\.(.+)")
_WILDCARD = re.compile(r"__([\w./-]+?)__")
_WILDCARD_DEPTH = 10
_SEED_SPACE = 2**32


def load_jobs(path: Path | str, *, rng: random.Random | None = None, limit: int = DEFAULT_LIMIT) -> list[JobSpec]:
    """Read a TOML job file and expand it to its jobs, in file order; `JobFileError` on any mistake.

    `rng` draws the seeds a file leaves to chance (`seed = -1`, `seed_policy =
    "random"`).  A file that expands to more than `limit` jobs is refused, so a
    slip in a matrix cannot queue a million jobs; the command line raises the
    limit when asked to (`--yes`).
    """
    path = Path(path)
    return _Expansion(path, read_toml(path)).jobs(rng or random.Random(), limit)


@attrs.frozen
class _Axis:
    """One key of `[matrix]`: where its values go, and the values.

    Attributes:
        key: The key as the file writes it (`cfg_scale`, `stages[2].scale`).
        target: The path a job file's reader names for it (`settings.cfg_scale`).
        values: Its values, in order.
    """

    key: str
    target: str
    values: tuple[Any, ...]

    def apply(self, raw: dict[str, Any], value: Any) -> None:
        """Set `value` in `raw`, a job file's decoded tables (copied where written)."""
        if self.target.startswith("settings."):
            raw["settings"] = {**raw.get("settings", {}), self.key: value}
        elif (match := _STAGE_KEY.fullmatch(self.key)) is not None:
            index = int(match[1]) - 1
            raw["stages"] = [*raw["stages"]]
            raw["stages"][index] = {**raw["stages"][index], match[2]: value}
        else:
            raw[self.key] = value

    def label(self, value: Any) -> str:
        shown = str(value).lower() if isinstance(value, bool) else str(value)
        return f"{self.key}={shown}"


@attrs.frozen
class _Prompt:
    """A prompt and where it was written, for messages: a file and a key."""

    text: str
    file: Path
    key: str


@attrs.define
class _Wildcards:
    """The wildcard folder, its files read once each."""

    folder: Path
    lines: dict[str, tuple[str, ...]] = attrs.field(factory=dict)

    def fill(self, prompt: _Prompt, rng: random.Random) -> str:
        """`prompt` with every `__name__` replaced by a line drawn from `name.txt`, nested ones too."""
        text = prompt.text
        for _ in range(_WILDCARD_DEPTH):
            if _WILDCARD.search(text) is None:
                return text
            text = _WILDCARD.sub(lambda match: rng.choice(self.choices(match[1], prompt)), text)
        names = ", ".join(f"__{name}__" for name in _WILDCARD.findall(text))
        raise JobFileError(prompt.file, prompt.key, f"wildcards nest deeper than {_WILDCARD_DEPTH} ({names} left): does one refer to itself?")

    def choices(self, name: str, prompt: _Prompt) -> tuple[str, ...]:
        if name not in self.lines:
            file = self.folder / f"{name}.txt"
            if not file.is_file():
                known = [p.relative_to(self.folder).with_suffix("").as_posix() for p in self.folder.rglob("*.txt")]
                raise JobFileError(prompt.file, prompt.key, f"wildcard __{name}__: no file {file}{did_you_mean(name, known)}")
            self.lines[name] = _lines(file)
            if not self.lines[name]:
                raise JobFileError(file, None, f"no lines to choose from for __{name}__")
        return self.lines[name]


def _lines(file: Path) -> tuple[str, ...]:
    """The lines of a list file, less blank ones and `#` comments."""
    try:
        text = file.read_text("utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise JobFileError(file, None, f"cannot read: {getattr(error, 'strerror', None) or error}") from None
    stripped = (line.strip() for line in text.splitlines())
    return tuple(line for line in stripped if line and not line.startswith("#"))


@attrs.frozen
class _Expansion:
    """Reads the expansion keys of one decoded job file and makes its jobs."""

    path: Path
    data: dict[str, Any]

    def fail(self, key: str | None, message: str) -> JobFileError:
        return JobFileError(self.path, key, message)

    def get(self, key: str, kind: type | tuple[type, ...], what: str, default: Any) -> Any:
        value = self.data.get(key, default)
        if not isinstance(value, kind) or isinstance(value, bool) and kind is int:
            raise self.fail(key, f"must be {what}")
        return value

    def relative(self, key: str) -> Path | None:
        name = self.get(key, (str, type(None)), "a path (relative to the job file)", None)
        return None if name is None else self.path.parent / name

    # -- the keys --------------------------------------------------------------

    def prompts(self) -> list[_Prompt]:
        """The file's prompts; none when it sets none, so each job keeps its own (its image's, else empty)."""
        given = [key for key in ("prompt", "prompts", "prompts_file") if key in self.data]
        if len(given) > 1:
            raise self.fail(given[1], f"a file sets one of prompt, prompts and prompts_file; this one sets {' and '.join(given)}")
        if "prompts" in self.data:
            prompts = self.get("prompts", list, "an array of prompts", None)
            if not prompts:
                raise self.fail("prompts", "must not be empty")
            for index, prompt in enumerate(prompts):
                if not isinstance(prompt, str):
                    raise self.fail(f"prompts[{index + 1}]", "must be a string")
            return [_Prompt(text, self.path, f"prompts[{index + 1}]") for index, text in enumerate(prompts)]
        file = self.relative("prompts_file")
        if file is not None:
            if not file.is_file():
                raise self.fail("prompts_file", f"no such file: {file}")
            lines = _lines(file)
            if not lines:
                raise self.fail("prompts_file", f"{file} holds no prompts")
            return [_Prompt(text, file, f"prompt {index + 1}") for index, text in enumerate(lines)]
        if "prompt" not in self.data:
            return []
        return [_Prompt(self.get("prompt", str, "a string", None), self.path, "prompt")]

    def matrix(self, stage_count: int) -> list[_Axis]:
        matrix = self.get("matrix", dict, "a table of arrays ([matrix])", {})
        return [self.axis(key, values, stage_count) for key, values in matrix.items()]

    def axis(self, key: str, values: Any, stage_count: int) -> _Axis:
        where = f"matrix.{toml_key(key)}"
        if (match := _STAGE_KEY.fullmatch(key)) is not None:
            if not 1 <= int(match[1]) <= stage_count:
                raise self.fail(where, f"no such stage: the file has {stage_count}")
            target = f"stages[{int(match[1])}].{toml_key(match[2])}"
        elif key in _MATRIX_TOP_LEVEL:
            target = key
        elif key in _SETTING_FIELDS:
            target = f"settings.{toml_key(key)}"
        else:
            hint = did_you_mean(key, [*_SETTING_FIELDS, *_MATRIX_TOP_LEVEL])
            raise self.fail(where, f"not a setting{hint}; a stage's own key is written \"stages[N].{key}\"")
        if not isinstance(values, list) or not values:
            raise self.fail(where, "must be an array of values, at least one")
        axis = _Axis(key, target, tuple(values))
        labels = [axis.label(value) for value in values]
        if len(set(labels)) < len(labels):
            raise self.fail(where, "the same value is listed twice")
        return axis

    def count(self) -> int:
        count = self.get("count", int, "an integer, at least 1", 1)
        if count < 1:
            raise self.fail("count", f"must be at least 1, got {count}")
        return count

    def seed_policy(self) -> str:
        policy = self.get("seed_policy", str, "a string", "increment")
        if policy not in SEED_POLICIES:
            raise self.fail("seed_policy", f"unknown policy {policy!r}{did_you_mean(policy, SEED_POLICIES)}; choose one of: {', '.join(SEED_POLICIES)}")
        return policy

    def wildcards(self) -> _Wildcards:
        return _Wildcards(self.relative("wildcards") or self.path.parent / "wildcards")

    # -- the jobs --------------------------------------------------------------

    def combination(
        self, raw: Mapping[str, Any], axes: Sequence[_Axis], values: Sequence[Any], images: tuple[InitImage, ...]
    ) -> JobSpec:
        """The job of one combination of matrix values; a bad value is named by its matrix key."""
        raw = dict(raw)
        for axis, value in zip(axes, values, strict=True):
            axis.apply(raw, value)
        try:
            return JobSpec.from_mapping(raw, self.path, images=images)
        except JobFileError as error:
            for axis in axes:
                if error.key is not None and (error.key == axis.target or error.key.startswith(axis.target + ".")):
                    raise self.fail(f"matrix.{toml_key(axis.key)}", error.message) from None
            raise

    def image_groups(self) -> list[tuple[InitImage, ...]]:
        """The inputs of each job before variations: one image each, all of them, or none."""
        images = read_init_images(self.path, self.data)
        if images and self.data.get("per_image", True) is not False:  # a per_image of the wrong type fails later
            return [(image,) for image in images]
        return [images]

    def jobs(self, rng: random.Random, limit: int) -> list[JobSpec]:
        prompts, count, policy, wildcards = self.prompts(), self.count(), self.seed_policy(), self.wildcards()
        groups = self.image_groups()
        raw = {key: value for key, value in self.data.items() if key not in (*EXPANSION_KEYS, "prompt")}
        # Checks the stages; takes each image's prompt and seed, or draws a seed of -1.
        bases = [JobSpec.from_mapping(raw, self.path, rng, group) for group in groups]
        axes = self.matrix(len(bases[0].stages))
        total = len(groups) * max(len(prompts), 1) * math.prod(len(axis.values) for axis in axes) * count
        if total > limit:
            raise self.fail(None, f"expands to {total} jobs, more than {limit}; pass --yes to queue them all")
        jobs = []
        for group, base in zip(groups, bases, strict=True):
            raw["seed"] = base.seed
            texts = self.texts(prompts, base, count, wildcards)
            for values in itertools.product(*(axis.values for axis in axes)):
                combination = self.combination(raw, axes, values, group)
                labels = [axis.label(value) for axis, value in zip(axes, values, strict=True)]
                for number, repetition in itertools.product(range(len(texts)), range(count)):
                    parts = [base.name, *([f"#{number + 1}"] if len(texts) > 1 else []), *labels]
                    parts += [f"r{repetition + 1}"] if count > 1 else []
                    seed = {
                        "increment": (base.seed + repetition) % _SEED_SPACE,
                        "fixed": base.seed,
                        "random": rng.randrange(_SEED_SPACE),
                    }[policy]
                    jobs.append(attrs.evolve(combination, name=" ".join(parts), seed=seed, prompt=texts[number][repetition]))
        return jobs

    @staticmethod
    def texts(prompts: Sequence[_Prompt], base: JobSpec, count: int, wildcards: _Wildcards) -> list[list[str]]:
        """Each prompt's text for each repetition, wildcards drawn from the base job's seed; without prompts, the base job's own."""
        if not prompts:
            return [[base.prompt] * count]
        wildcard_rng = random.Random(base.seed)
        return [[wildcards.fill(prompt, wildcard_rng) for _ in range(count)] for prompt in prompts]
