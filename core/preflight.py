"""Checking a job's names against the server before its first request.

A misspelt upscaler costs a 500 at stage 4, after three stages of work; a
misspelt ADetailer key costs nothing visible at all (ADetailer skips its
arguments and the request answers 200).  So before a job starts, the runner
asks the server what it has (`ServerCatalog.from_client`) and `preflight` lists
every name the job uses that the server does not know.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
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


class CatalogSource(Protocol):
    """The part of `WebUIClient` a catalog is read from: decoded JSON of each route."""

    def samplers(self) -> list[dict[str, Any]]: ...
    def upscalers(self) -> list[dict[str, Any]]: ...
    def sd_models(self) -> list[dict[str, Any]]: ...
    def adetailer_models(self) -> list[str] | None: ...
    def adetailer_schema(self) -> dict[str, Any] | None: ...


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
    """

    samplers: Choices
    upscalers: Choices
    checkpoints: Choices
    ad_models: tuple[str, ...] | None = None
    ad_fields: frozenset[str] | None = None

    @classmethod
    def from_client(cls, client: CatalogSource) -> ServerCatalog:
        """Ask the server; any error the client raises propagates (the job cannot start),
        and lists that are not A1111's shape raise `CatalogError`.

        The five lists are asked for at once, so the check costs one round trip.
        """
        calls = (
            client.samplers,
            client.upscalers,
            client.sd_models,
            client.adetailer_models,
            client.adetailer_schema,
        )
        with ThreadPoolExecutor(max_workers=len(calls), thread_name_prefix="sdjobs-preflight") as pool:
            samplers, upscalers, models, ad_models, schema = pool.map(lambda call: call(), calls)
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
            )
        except (KeyError, TypeError, AttributeError) as exc:
            raise CatalogError(f"the server's lists are not shaped as A1111's ({type(exc).__name__}: {exc})") from exc


def preflight(job: JobSpec, catalog: ServerCatalog) -> list[str]:
    """Every name in `job` that the server does not know, as one message each; [] when all is well."""
    problems = []
    if job.checkpoint is not None and job.checkpoint not in catalog.checkpoints:
        problems.append(_not_on_server("checkpoint", job.checkpoint, catalog.checkpoints))
    for index, stage in enumerate(job.stages):
        where = f"stage {index + 1} ({stage.type})"
        problems.extend(f"{where}: {problem}" for problem in _stage_problems(stage, catalog))
    return problems


def _stage_problems(stage: StageSpec, catalog: ServerCatalog) -> Iterator[str]:
    hires_upscalers = Choices(catalog.upscalers.names + LATENT_UPSCALE_MODES)
    named: Iterable[tuple[str, Any, Choices]] = (
        ("checkpoint", stage.checkpoint, catalog.checkpoints),
        ("upscaler", stage.upscaler, catalog.upscalers),
        ("upscaler_2", stage.settings.get("upscaler_2"), catalog.upscalers),
        ("sampler_name", stage.settings.get("sampler_name"), catalog.samplers),
        ("hr_sampler_name", stage.settings.get("hr_sampler_name"), catalog.samplers),
        ("hr_upscaler", stage.settings.get("hr_upscaler"), hires_upscalers),
    )
    for key, value, choices in named:
        if value is not None and value not in choices:
            yield _not_on_server(key, value, choices)
    if stage.type == "adetailer":
        yield from _adetailer_problems(stage.adetailer, catalog)


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
    return f"{key} {value!r} is not on the server; choose one of: {choices}"
