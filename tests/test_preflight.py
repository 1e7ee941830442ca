"""Preflight: a job's names checked against what the recorded A1111 has."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import attrs
import pytest

from sdjobs.preflight import CatalogError, Choices, ServerCatalog, preflight
from sdjobs.spec import JobSpec, load_job

TRACES = Path(__file__).parent / "data" / "traces"
EXAMPLES = Path(__file__).parent.parent / "examples"


def recorded(name: str) -> Any:
    data = json.loads((TRACES / f"meta_{name}.json").read_text())
    return data["body"] if "endpoint" in data else data


@attrs.define
class RecordedServer:
    """Answers the catalog routes with the recorded A1111's bodies (ADetailer optional)."""

    adetailer: bool = True
    schema: bool = True

    def samplers(self) -> list[dict[str, Any]]:
        return recorded("samplers")

    def upscalers(self) -> list[dict[str, Any]]:
        return recorded("upscalers")

    def sd_models(self) -> list[dict[str, Any]]:
        return recorded("sd_models")

    def adetailer_models(self) -> list[str] | None:
        return recorded("adetailer_ad_model")["ad_model"] if self.adetailer else None

    def adetailer_schema(self) -> dict[str, Any] | None:
        return recorded("adetailer_schema") if self.adetailer and self.schema else None


@pytest.fixture
def catalog() -> ServerCatalog:
    return ServerCatalog.from_client(RecordedServer())


def spec(*stages: dict, **top) -> JobSpec:
    return JobSpec.from_mapping({"name": "t", "seed": 1, **top, "stages": [{"type": "txt2img"}, *stages]})


def test_lists_not_shaped_as_a1111s_are_a_catalog_error():
    class Nameless(RecordedServer):
        def samplers(self) -> list[dict[str, Any]]:
            return [{"label": "Euler a"}]

    with pytest.raises(CatalogError, match="not shaped as A1111's .KeyError: 'name'"):
        ServerCatalog.from_client(Nameless())


def test_the_catalog_holds_the_servers_names(catalog):
    assert "Euler a" in catalog.samplers and "k_euler_a" in catalog.samplers
    assert "R-ESRGAN 4x+" in catalog.upscalers
    assert "empty.pt [d030ad8db7]" in catalog.checkpoints and "empty" in catalog.checkpoints
    assert "face_yolov8n.pt" in catalog.ad_models
    assert "ad_mask_k" in catalog.ad_fields


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.toml")), ids=lambda path: path.name)
def test_the_examples_pass_on_the_recorded_server(path, catalog):
    assert preflight(load_job(path, rng=random.Random(1)), catalog) == []


def test_a_bad_upscaler_names_the_stage_the_value_and_the_choices(catalog):
    job = spec({"type": "img2img"}, {"type": "img2img"}, {"type": "upscale", "upscaler": "R-ESRGAN 5x"})
    (problem,) = preflight(job, catalog)
    assert problem.startswith("stage 4 (upscale): upscaler 'R-ESRGAN 5x' is not on the server; choose one of: ")
    assert problem.endswith(", ".join(server["name"] for server in recorded("upscalers")))


def test_every_bad_name_is_reported(catalog):
    job = spec(
        {"type": "adetailer", "ad_model": "hand.pt", "checkpoint": "sdxl"},
        {"type": "upscale", "upscaler": "Lanczos", "upscaler_2": "Bicubic"},
        checkpoint="v15",
        settings={"sampler_name": "Euler b", "hr_sampler_name": "DDIM2", "hr_upscaler": "Latent (fancy)"},
    )
    problems = [problem.partition("; choose")[0] for problem in preflight(job, catalog)]
    assert problems == [
        "checkpoint 'v15' is not on the server",
        "stage 1 (txt2img): sampler_name 'Euler b' is not on the server",
        "stage 1 (txt2img): hr_sampler_name 'DDIM2' is not on the server",
        "stage 1 (txt2img): hr_upscaler 'Latent (fancy)' is not on the server",
        "stage 2 (adetailer): checkpoint 'sdxl' is not on the server",
        "stage 2 (adetailer): sampler_name 'Euler b' is not on the server",
        "stage 2 (adetailer): ad_model 'hand.pt' is not on the server",
        "stage 3 (upscale): upscaler_2 'Bicubic' is not on the server",
    ]


def test_aliases_model_names_and_latent_modes_are_accepted(catalog):
    job = spec(
        {"type": "img2img", "checkpoint": "empty.pt [d030ad8db7]"},
        checkpoint="empty",
        settings={"sampler_name": "k_euler_a", "hr_upscaler": "Latent (nearest-exact)"},
    )
    assert preflight(job, catalog) == []


def test_an_adetailer_key_the_schema_lacks_is_named_with_a_hint(catalog):
    job = spec({"type": "adetailer", "ad_model": "face_yolov8n.pt", "ad_mask_k_largest": 1})
    assert preflight(job, catalog) == [
        "stage 2 (adetailer): ad_mask_k_largest is not an ADetailer setting on this server (did you mean 'ad_mask_k'?)"
    ]


def test_without_a_schema_the_known_adetailer_fields_are_the_measure():
    catalog = ServerCatalog.from_client(RecordedServer(schema=False))
    assert catalog.ad_fields is None
    job = spec({"type": "adetailer", "ad_model": "face_yolov8n.pt", "ad_mask_k": 2, "ad_new_thing": 1})
    assert preflight(job, catalog) == ["stage 2 (adetailer): ad_new_thing is not an ADetailer setting on this server"]


def test_the_servers_schema_beats_the_known_fields():
    catalog = attrs.evolve(
        ServerCatalog.from_client(RecordedServer()), ad_fields=frozenset({"ad_model", "ad_new_thing"})
    )
    job = spec({"type": "adetailer", "ad_model": "face_yolov8n.pt", "ad_new_thing": 1})
    assert preflight(job, catalog) == []


def test_an_adetailer_stage_needs_adetailer_on_the_server():
    catalog = ServerCatalog.from_client(RecordedServer(adetailer=False))
    job = spec({"type": "adetailer", "ad_model": "face_yolov8n.pt"})
    assert preflight(job, catalog) == ["stage 2 (adetailer): the server has no ADetailer extension (no /adetailer/v1 routes)"]


def test_a_job_without_adetailer_does_not_need_it():
    catalog = ServerCatalog.from_client(RecordedServer(adetailer=False))
    assert preflight(spec({"type": "img2img"}), catalog) == []


def test_choices_read_as_the_names_in_order():
    assert str(Choices(("b", "a"), frozenset({"c"}))) == "b, a"
