"""Checking a job's names against the server before its first request.

A misspelt upscaler costs a 500 at stage 4, after three stages of work; a
misspelt ADetailer key costs nothing visible at all (ADetailer skips its
arguments and the request answers 200).  So before a job starts, the runner
asks the server what it has (`ServerCatalog.from_client`) and `preflight` lists
every name the job uses that the server does not know.  For a file of many jobs,
`check_against_server` reports each bad name once, before anything is queued.

A1111 1.9 split samplers from schedulers ("DPM++ 2M Karras" became sampler
"DPM++ 2M" with scheduler "Karras") and still accepts the old names;
`split_sampler_names` rewrites them for such a server, with a note.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

import attrs
from sdjobs.spec import JobSpec, StageSpec, did_you_mean
from sdjobs.webui_fields import ADETAILER_FIELDS

#: A1111's latent upscale modes, which `hr_upscaler` accepts besides the upscalers.
LATENT_UPSCALE_MODES = (
    "Latent",
    "Latent (antialiased)",
    "Latent (bicubic)",
    "Latent (bicubic antialiased)",
    "Latent (nearest)",
    "Latent (nearest-exact)",
)


class CatalogError(ValueError):
    """The server answered its lists, but not in the shape A1111 gives them."""


#: Names that mean "no change" where a VAE, scheduler or checkpoint is chosen.
_KEEP_VAE = ("Automatic", "None")
_KEEP_SCHEDULER = ("Use same scheduler",)
_KEEP_CHECKPOINT = ("Use same checkpoint",)
_LORA = re.compile(r"<lora:([^:>]+)[^>]*>")

#: The sampler and scheduler pairs a stage may set: (sampler key, scheduler key, where).
_SAMPLER_PAIRS = (("sampler_name", "scheduler", "settings"), ("hr_sampler_name", "hr_scheduler", "settings"),
                  ("ad_sampler", "ad_scheduler", "adetailer"))  # fmt: skip


#: The lists a catalog is made of, by the `CatalogSource` method that asks for each.
LISTS = ("samplers", "upscalers", "sd_models", "adetailer_models", "adetailer_schema", "schedulers", "sd_vae", "loras")


class CatalogSource(Protocol):
    """The part of `WebUIClient` a catalog is read from: decoded JSON of each route
    (None for an optional route the server lacks)."""

    def samplers(self) -> list[dict[str, Any]]: ...
    def upscalers(self) -> list[dict[str, Any]]: ...
    def sd_models(self) -> list[dict[str, Any]]: ...
    def adetailer_models(self) -> list[str] | None: ...
    def adetailer_schema(self) -> dict[str, Any] | None: ...
    def schedulers(self) -> list[dict[str, Any]] | None: ...
    def sd_vae(self) -> list[dict[str, Any]] | None: ...
    def loras(self) -> list[dict[str, Any]] | None: ...


@attrs.frozen
class Choices:
    """The names a server offers for one kind of thing, and other spellings it accepts.

    Attributes:
        names: The names to show a user, in the server's order.
        aliases: Other spellings the server accepts for them (sampler aliases,
            checkpoint model names).
    """

    names: tuple[str, ...]
    aliases: frozenset[str] = frozenset()

    def __contains__(self, value: object) -> bool:
        return value in self.names or value in self.aliases

    def __str__(self) -> str:
        return ", ".join(self.names)


@attrs.frozen
class ServerCatalog:
    """What one server has, as far as a job's names are concerned.

    Attributes:
        samplers: Sampler names, with their aliases.
        upscalers: Upscaler names (extras and img2img upscaling).
        checkpoints: Checkpoint titles, with their model names.
        ad_models: ADetailer's detection models; None when the server has no ADetailer.
        ad_fields: The keys ADetailer's schema allows; None when the server does
            not publish it (then `ADETAILER_FIELDS`, the known list, stands in).
        schedulers: Scheduler names with their labels and aliases; None for a
            server before 1.9, whose samplers carry their schedule in the name.
        vaes: VAE names; None when the server does not list them.
        loras: LoRA names with their aliases; None when the server does not list them.
    """

    samplers: Choices
    upscalers: Choices
    checkpoints: Choices
    ad_models: tuple[str, ...] | None = None
    ad_fields: frozenset[str] | None = None
    schedulers: Choices | None = None
    vaes: Choices | None = None
    loras: Choices | None = None

    @classmethod
    def from_client(cls, client: CatalogSource, lists: Iterable[str] = LISTS) -> ServerCatalog:
        """Ask the server for `lists` (by default all of them; `lists_needed` says which a job
        reads), at once, so the check costs one round trip.  Any error the client raises
        propagates (the job cannot start)."""
        return cls.from_answers(ask_for_lists(client, lists))

    @classmethod
    def from_answers(cls, answers: Mapping[str, Any]) -> ServerCatalog:
        """The catalog of the server's answers, by `CatalogSource` method; a list not asked for
        is empty (or None where None means "not listed"), which preflight only reads for a job
        that `lists_needed` says does not name anything in it.  Lists that are not A1111's
        shape raise `CatalogError`."""
        samplers, upscalers, models = (answers.get(name) or () for name in ("samplers", "upscalers", "sd_models"))
        ad_models, schema, schedulers, vaes, loras = (
            answers.get(name) for name in ("adetailer_models", "adetailer_schema", "schedulers", "sd_vae", "loras")
        )
        try:
            return cls(
                samplers=Choices(
                    tuple(sampler["name"] for sampler in samplers),
                    frozenset(alias for sampler in samplers for alias in sampler.get("aliases") or ()),
                ),
                upscalers=Choices(tuple(upscaler["name"] for upscaler in upscalers)),
                checkpoints=Choices(
                    tuple(model["title"] for model in models),
                    frozenset(model["model_name"] for model in models),
                ),
                ad_models=None if ad_models is None else tuple(ad_models),
                ad_fields=None if schema is None else frozenset(schema.get("properties", ())),
                schedulers=None if schedulers is None else Choices(
                    tuple(scheduler["label"] for scheduler in schedulers),
                    frozenset(name for scheduler in schedulers
                              for name in (scheduler["name"], *(scheduler.get("aliases") or ()))),
                ),
                vaes=None if vaes is None else Choices(tuple(vae["model_name"] for vae in vaes)),
                loras=None if loras is None else Choices(
                    tuple(lora["name"] for lora in loras), frozenset(lora.get("alias") or "" for lora in loras) - {""}
                ),
            )  # fmt: skip
        except (KeyError, TypeError, AttributeError) as exc:
            raise CatalogError(f"the server's lists are not shaped as A1111's ({type(exc).__name__}: {exc})") from exc


def ask_for_lists(client: CatalogSource, lists: Iterable[str]) -> dict[str, Any]:
    """The server's answer to each of `lists` (`CatalogSource` method names), asked for at once."""
    lists = list(lists)
    if not lists:
        return {}
    with ThreadPoolExecutor(max_workers=len(lists), thread_name_prefix="sdjobs-preflight") as pool:
        return dict(zip(lists, pool.map(lambda name: getattr(client, name)(), lists), strict=True))


def lists_needed(jobs: Iterable[JobSpec]) -> frozenset[str]:
    """The lists `preflight` reads for `jobs`: a job that names no checkpoint, VAE or LoRA
    does not wait for the server to list them."""
    needed: set[str] = set()
    for job in jobs:
        if job.checkpoint is not None:
            needed.add("sd_models")
        if _LORA.search(job.prompt) or _LORA.search(job.negative_prompt):
            needed.add("loras")
        for stage in job.stages:
            needed.update(name for _, value, lists, _ in _stage_names(stage) if value is not None for name in lists)
            if stage.type == "adetailer":
                needed.update(("adetailer_models", "adetailer_schema"))
            prompts = (stage.settings.get("hr_prompt"), stage.settings.get("hr_negative_prompt"),
                       stage.adetailer.get("ad_prompt"), stage.adetailer.get("ad_negative_prompt"))  # fmt: skip
            if any(_LORA.search(text or "") for text in prompts):
                needed.add("loras")
    return frozenset(needed)


def split_sampler(name: str, catalog: ServerCatalog) -> tuple[str, str] | None:
    """The (sampler, scheduler) an old combined name stands for on a server that splits them, else None."""
    if catalog.schedulers is None or name in catalog.samplers:
        return None
    for label in catalog.schedulers.names:
        sampler = name.removesuffix(f" {label}")
        if sampler != name and sampler in catalog.samplers:
            return sampler, label
    return None


def split_sampler_names(specs: Iterable[JobSpec], catalog: ServerCatalog) -> tuple[list[JobSpec], list[str]]:
    """The jobs with old combined sampler names split for a server with schedulers, and a note for each name.

    A stage that sets its scheduler itself keeps both as written.
    """
    notes: dict[str, None] = {}

    def split(values: Mapping[str, Any]) -> dict[str, Any]:
        values = dict(values)
        for sampler_key, scheduler_key, _ in _SAMPLER_PAIRS:
            pair = split_sampler(values.get(sampler_key) or "", catalog)
            if pair is not None and scheduler_key not in values:
                notes[f"{sampler_key} {values[sampler_key]!r} is sampler {pair[0]!r} with scheduler {pair[1]!r} on this server; sent so"] = None
                values[sampler_key], values[scheduler_key] = pair
        return values

    jobs = [
        attrs.evolve(job, stages=tuple(
            attrs.evolve(stage, settings=split(stage.settings), adetailer=split(stage.adetailer)) for stage in job.stages
        ))
        for job in specs
    ]  # fmt: skip
    return jobs, list(notes)


def check_against_server(specs: Sequence[JobSpec], catalog: ServerCatalog) -> list[str]:
    """Every bad name in a file's jobs, each once, naming the jobs it is in when not all; [] when all is well.

    Meant for before a file's jobs are queued, so one typo in a matrix is found
    before the first of its jobs runs rather than when it fails.
    """
    found: dict[str, list[str]] = {}
    for job in specs:
        for problem in preflight(job, catalog):
            found.setdefault(problem, []).append(job.name)
    return [problem if len(names) == len(specs) else f"{problem} (in {_some(names)})" for problem, names in found.items()]


def _some(names: Sequence[str]) -> str:
    shown = ", ".join(repr(name) for name in names[:3])
    return shown if len(names) <= 3 else f"{shown} and {len(names) - 3} more"


def preflight(job: JobSpec, catalog: ServerCatalog, stages: Sequence[int] | None = None) -> list[str]:
    """Every name in `job` that the server does not know, as one message each; [] when all is well.

    With `stages` (0-based indexes), only what those stages use: the stages one server runs
    of a job whose stages run on several.
    """
    problems = []
    indexes = range(len(job.stages)) if stages is None else stages
    uses_job_checkpoint = any(job.stages[index].checkpoint is None and job.stages[index].endpoint != "extra-single-image"
                              for index in indexes)  # fmt: skip
    if job.checkpoint is not None and uses_job_checkpoint and job.checkpoint not in catalog.checkpoints:
        problems.append(_not_on_server("checkpoint", job.checkpoint, catalog.checkpoints))
    if catalog.loras is not None:
        for key, text in (("prompt", job.prompt), ("negative_prompt", job.negative_prompt)):
            problems.extend(_lora_problems(key, text, catalog.loras))
    for index in indexes:
        stage = job.stages[index]
        where = f"stage {index + 1} ({stage.type})"
        problems.extend(f"{where}: {problem}" for problem in _stage_problems(stage, catalog))
    return problems


def _stage_problems(stage: StageSpec, catalog: ServerCatalog) -> Iterator[str]:
    if catalog.loras is not None:
        prompts = [("hr_prompt", stage.settings), ("hr_negative_prompt", stage.settings)]
        if stage.type == "adetailer":
            prompts += [("ad_prompt", stage.adetailer), ("ad_negative_prompt", stage.adetailer)]
        for key, values in prompts:
            yield from _lora_problems(key, values.get(key) or "", catalog.loras)
    for key, value, _, choices in _stage_names(stage):
        if value is not None and (allowed := choices(catalog)) is not None and value not in allowed:
            yield _not_on_server(key, value, allowed)
    if stage.type == "adetailer":
        yield from _adetailer_problems(stage.adetailer, catalog)


def _stage_names(stage: StageSpec) -> Iterator[tuple[str, Any, tuple[str, ...], Callable[[ServerCatalog], Choices | None]]]:
    """Every name `stage` may set that must be on the server: (key, value or None, the lists
    it is checked against, the choices it must be one of)."""
    settings, ad = stage.settings, stage.adetailer
    yield "checkpoint", stage.checkpoint, ("sd_models",), _checkpoints
    yield "upscaler", stage.upscaler, ("upscalers",), _upscalers
    yield "upscaler_2", settings.get("upscaler_2"), ("upscalers",), _upscalers
    yield "sampler_name", settings.get("sampler_name"), ("samplers", "schedulers"), _samplers
    yield "hr_sampler_name", settings.get("hr_sampler_name"), ("samplers", "schedulers"), _samplers
    yield "scheduler", settings.get("scheduler"), ("schedulers",), _schedulers
    yield "hr_scheduler", settings.get("hr_scheduler"), ("schedulers",), _schedulers
    yield "hr_upscaler", settings.get("hr_upscaler"), ("upscalers",), _hires_upscalers
    yield "hr_checkpoint_name", settings.get("hr_checkpoint_name"), ("sd_models",), _checkpoints_or_same
    yield "refiner_checkpoint", settings.get("refiner_checkpoint"), ("sd_models",), _checkpoints
    yield "override_settings.sd_vae", (settings.get("override_settings") or {}).get("sd_vae"), ("sd_vae",), _vaes
    if stage.type == "adetailer":
        yield "ad_checkpoint", ad.get("ad_checkpoint"), ("sd_models",), _checkpoints_or_same
        yield "ad_sampler", ad.get("ad_sampler"), ("samplers", "schedulers"), _samplers
        yield "ad_scheduler", ad.get("ad_scheduler"), ("schedulers",), _schedulers_or_same
        yield "ad_vae", ad.get("ad_vae"), ("sd_vae",), _vaes


def _checkpoints(catalog: ServerCatalog) -> Choices:
    return catalog.checkpoints


def _checkpoints_or_same(catalog: ServerCatalog) -> Choices:
    return attrs.evolve(catalog.checkpoints, aliases=catalog.checkpoints.aliases | set(_KEEP_CHECKPOINT))


def _upscalers(catalog: ServerCatalog) -> Choices:
    return catalog.upscalers


def _hires_upscalers(catalog: ServerCatalog) -> Choices:
    return Choices(catalog.upscalers.names + LATENT_UPSCALE_MODES)


def _samplers(catalog: ServerCatalog) -> Choices:
    """The samplers, and on a server that splits them from schedulers, the old combined names."""
    samplers = catalog.samplers
    if catalog.schedulers is None:
        return samplers
    combined = {f"{sampler} {label}" for sampler in samplers.names for label in catalog.schedulers.names}
    return attrs.evolve(samplers, aliases=samplers.aliases | combined)


def _schedulers(catalog: ServerCatalog) -> Choices | None:
    return catalog.schedulers


def _schedulers_or_same(catalog: ServerCatalog) -> Choices | None:
    schedulers = catalog.schedulers
    return schedulers and attrs.evolve(schedulers, aliases=schedulers.aliases | set(_KEEP_SCHEDULER))


def _vaes(catalog: ServerCatalog) -> Choices | None:
    return None if catalog.vaes is None else Choices(_KEEP_VAE + catalog.vaes.names)


def _lora_problems(key: str, text: str, loras: Choices) -> Iterator[str]:
    for name in _LORA.findall(text):
        if name not in loras:
            choices = str(loras) or "(the server has none)"
            yield f"{key}: LoRA {name!r} is not on the server; choose one of: {choices}{did_you_mean(name, loras.names)}"


def _adetailer_problems(settings: Mapping[str, Any], catalog: ServerCatalog) -> Iterator[str]:
    if catalog.ad_models is None:
        yield "the server has no ADetailer extension (no /adetailer/v1 routes)"
        return
    fields = ADETAILER_FIELDS.keys() if catalog.ad_fields is None else catalog.ad_fields
    for key in settings:
        if key not in fields:
            yield f"{key} is not an ADetailer setting on this server{did_you_mean(key, fields)}"
    model = settings.get("ad_model")
    if model not in catalog.ad_models:
        yield _not_on_server("ad_model", model, Choices(catalog.ad_models))


def _not_on_server(key: str, value: Any, choices: Choices) -> str:
    return f"{key} {value!r} is not on the server; choose one of: {choices}{did_you_mean(str(value), choices.names)}"
