"""Preflight: a job's names checked against what the recorded A1111 has."""

from __future__ import annotations

import json
import random
import threading
from pathlib import Path
from typing import Any

import attrs
import pytest
from sdjobs.expand import load_jobs
from sdjobs.preflight import (
    LISTS,
    CatalogError,
    Choices,
    ServerCatalog,
    check_against_server,
    lists_needed,
    preflight,
    split_sampler_names,
)
from sdjobs.sim import SimSettings
from sdjobs.spec import JobSpec

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

    def schedulers(self) -> None:
        return None  # 404 before 1.9

    def sd_vae(self) -> list[dict[str, Any]]:
        return recorded("sd_vae")

    def loras(self) -> list[dict[str, Any]]:
        return recorded("loras")


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
    assert check_against_server(load_jobs(path, rng=random.Random(1)), catalog) == []


def test_a_bad_upscaler_names_the_stage_the_value_and_the_choices(catalog):
    job = spec({"type": "img2img"}, {"type": "img2img"}, {"type": "upscale", "upscaler": "R-ESRGAN 5x"})
    (problem,) = preflight(job, catalog)
    assert problem.startswith("stage 4 (upscale): upscaler 'R-ESRGAN 5x' is not on the server; choose one of: ")
    assert problem.endswith(", ".join(server["name"] for server in recorded("upscalers")) + " (did you mean 'R-ESRGAN 4x+'?)")


def test_every_bad_name_is_reported(catalog):
    job = spec(
        {"type": "adetailer", "ad_model": "hand.pt", "checkpoint": "sdxl"},
        {"type": "upscale", "upscaler": "Lanczos", "upscaler_2": "Bicubic"},
        checkpoint="v15",
        settings={"sampler_name": "Euler b", "hr_sampler_name": "DDIM2", "hr_upscaler": "Latent (fancy)"},
    )
    problems = [_without_choices(problem) for problem in preflight(job, catalog)]
    assert problems == [
        "checkpoint 'v15' is not on the server",
        "stage 1 (txt2img): sampler_name 'Euler b' is not on the server (did you mean 'Euler a'?)",
        "stage 1 (txt2img): hr_sampler_name 'DDIM2' is not on the server (did you mean 'DDIM'?)",
        "stage 1 (txt2img): hr_upscaler 'Latent (fancy)' is not on the server (did you mean 'Latent (bicubic)'?)",
        "stage 2 (adetailer): checkpoint 'sdxl' is not on the server",
        "stage 2 (adetailer): sampler_name 'Euler b' is not on the server (did you mean 'Euler a'?)",
        "stage 2 (adetailer): ad_model 'hand.pt' is not on the server",
        "stage 3 (upscale): upscaler_2 'Bicubic' is not on the server",
    ]


def _without_choices(problem: str) -> str:
    """A problem without its list of choices, keeping its hint."""
    head, _, tail = problem.partition("; choose one of: ")
    return head + tail[tail.find(" (did you mean") :] if "(did you mean" in tail else head


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


# -------------------------------------------------------------------------
# A file's jobs against a real (simulated) server over HTTP
# -------------------------------------------------------------------------


@pytest.fixture
def sim_settings(request) -> SimSettings:
    """The simulator of `webui_client`: A1111 1.10 unless a test asks for another version."""
    return SimSettings(step_time=0.0, first_step_time=0.0, version=getattr(request, "param", "1.10"))


def prompt_pack(folder: Path, samplers: list[str], stage: str = "") -> list[JobSpec]:
    path = folder / "pack.toml"
    path.write_text(
        'name = "pack"\nprompts = ["a", "b"]\nseed = 1\ncount = 3\n'
        f'[[stages]]\ntype = "txt2img"\n{stage}\n'
        f"[matrix]\nsampler_name = {json.dumps(samplers)}\n"
    )
    return load_jobs(path)


def test_a_misspelt_sampler_in_a_matrix_is_reported_once_naming_its_jobs(tmp_path, webui_client):
    specs = prompt_pack(tmp_path, ["Euler a", "Eulr a"])
    (problem,) = check_against_server(specs, ServerCatalog.from_client(webui_client))
    assert problem.startswith("stage 1 (txt2img): sampler_name 'Eulr a' is not on the server; choose one of: Euler a, Euler, ")
    assert problem.endswith("(did you mean 'Euler a'?) (in 'pack #1 sampler_name=Eulr a r1', 'pack #1 sampler_name=Eulr a r2', 'pack #1 sampler_name=Eulr a r3' and 3 more)")


def test_a_name_bad_in_every_job_is_reported_once_without_the_jobs(tmp_path, webui_client):
    specs = prompt_pack(tmp_path, ["Euler"], stage='scheduler = "Karas"')
    catalog = ServerCatalog.from_client(webui_client)
    assert check_against_server(specs, catalog) == [
        "stage 1 (txt2img): scheduler 'Karas' is not on the server; choose one of: "
        + ", ".join(scheduler["label"] for scheduler in webui_client.schedulers())
        + " (did you mean 'Karras'?)"
    ]


def test_old_combined_names_are_split_on_a_server_that_splits_them(tmp_path, webui_client):
    specs = prompt_pack(tmp_path, ["DPM++ 2M Karras", "Euler a"])
    catalog = ServerCatalog.from_client(webui_client)
    assert check_against_server(specs, catalog) == []
    split, notes = split_sampler_names(specs, catalog)
    assert notes == ["sampler_name 'DPM++ 2M Karras' is sampler 'DPM++ 2M' with scheduler 'Karras' on this server; sent so"]
    assert {(job.stages[0].settings["sampler_name"], job.stages[0].settings.get("scheduler")) for job in split} == {
        ("DPM++ 2M", "Karras"), ("Euler a", None),
    }  # fmt: skip
    result = webui_client.txt2img({"prompt": "p", "steps": 2, "width": 64, "height": 64, **split[0].stages[0].settings})
    assert "Sampler: DPM++ 2M, Schedule type: Karras" in result.infotexts[0]


def test_a_stage_that_sets_its_scheduler_keeps_the_combined_name(tmp_path, webui_client):
    specs = prompt_pack(tmp_path, ["DPM++ 2M Karras"], stage='scheduler = "Exponential"')
    assert split_sampler_names(specs, ServerCatalog.from_client(webui_client)) == (specs, [])


@pytest.mark.parametrize("sim_settings", ["1.7"], indirect=True)
def test_the_recorded_server_has_no_schedulers_and_knows_the_combined_names(tmp_path, webui_client):
    catalog = ServerCatalog.from_client(webui_client)
    assert catalog.schedulers is None and catalog.vaes == Choices(()) and catalog.loras == Choices(())
    specs = prompt_pack(tmp_path, ["DPM++ 2M Karras", "DPM++ 2M Kras"])
    assert split_sampler_names(specs, catalog) == (specs, [])
    (problem,) = check_against_server(specs, catalog)
    assert problem.startswith("stage 1 (txt2img): sampler_name 'DPM++ 2M Kras' is not on the server; choose one of: ")
    assert "UniPC, LCM (did you mean 'DPM++ 2M Karras'?) (in 'pack #1 sampler_name=DPM++ 2M Kras r1'" in problem


def test_loras_vaes_and_adetailers_names_are_checked(catalog):
    catalog = attrs.evolve(catalog, loras=Choices(("detail",), frozenset({"det"})), vaes=Choices(("kl-f8.pt",)))
    job = spec(
        {"type": "adetailer", "ad_model": "face_yolov8n.pt", "ad_prompt": "<lora:detial:0.5>",
         "ad_sampler": "Euler b", "ad_vae": "kl.pt", "ad_checkpoint": "Use same checkpoint"},
        prompt="a <lora:detail:0.8> cat <lora:det:1> <lora:missing:1>",
        settings={"override_settings": {"sd_vae": "Automatic"}},
    )  # fmt: skip
    assert [_without_choices(problem) for problem in preflight(job, catalog)] == [
        "prompt: LoRA 'missing' is not on the server",
        "stage 2 (adetailer): ad_prompt: LoRA 'detial' is not on the server (did you mean 'detail'?)",
        "stage 2 (adetailer): ad_sampler 'Euler b' is not on the server (did you mean 'Euler a'?)",
        "stage 2 (adetailer): ad_vae 'kl.pt' is not on the server (did you mean 'kl-f8.pt'?)",
    ]


#: One job per name preflight checks, each name misspelt (and an old combined sampler name, fine on 1.10).
ONE_NAME_EACH = [
    spec(checkpoint="v15"),
    spec(prompt="a <lora:detial:1> cat"),
    spec(settings={"sampler_name": "DPM++ 2M Karras"}),
    spec(settings={"sampler_name": "Eulr a", "hr_sampler_name": "DDIM2", "scheduler": "Karas", "hr_scheduler": "Karas"}),
    spec(settings={"hr_upscaler": "Latent (fancy)", "hr_prompt": "<lora:x:1>", "hr_negative_prompt": "<lora:y:1>"}),
    spec(settings={"hr_checkpoint_name": "sdxl", "refiner_checkpoint": "sdxl", "override_settings": {"sd_vae": "kl.pt"}}),
    spec({"type": "img2img", "checkpoint": "sdxl"}),
    spec({"type": "upscale", "upscaler": "Lanczos2", "upscaler_2": "Bicubic"}),
    spec({"type": "adetailer", "ad_model": "hand.pt", "ad_sampler": "Eulr a", "ad_scheduler": "Karas", "ad_vae": "kl.pt",
          "ad_checkpoint": "sdxl", "ad_prompt": "<lora:z:1>", "ad_negative_prompt": "<lora:w:1>", "ad_bogus": 1}),
]  # fmt: skip


@pytest.mark.parametrize("job", ONE_NAME_EACH, ids=lambda job: ",".join(sorted(lists_needed([job]))) or "none")
def test_the_lists_a_job_needs_find_what_all_the_lists_find(job, webui_client):
    found = preflight(job, ServerCatalog.from_client(webui_client))
    assert found == preflight(job, ServerCatalog.from_client(webui_client, lists_needed([job])))
    assert bool(found) == (job is not ONE_NAME_EACH[2])


def test_a_job_that_names_no_checkpoint_vae_or_lora_needs_only_the_lists_of_what_it_names():
    assert lists_needed([spec()]) == frozenset()
    assert lists_needed([spec({"type": "adetailer", "ad_model": "face_yolov8n.pt"}, {"type": "upscale", "upscaler": "Lanczos"}, settings={"sampler_name": "Euler a"})]) == {
        "samplers", "schedulers", "upscalers", "adetailer_models", "adetailer_schema"
    }  # fmt: skip


@pytest.mark.parametrize(
    ("job", "named"),
    [
        (spec(settings={"hr_scheduler": "Karas"}), "stage 1 (txt2img): hr_scheduler 'Karas'"),
        (spec(settings={"hr_checkpoint_name": "sdxl"}), "stage 1 (txt2img): hr_checkpoint_name 'sdxl'"),
        (spec(settings={"refiner_checkpoint": "sdxl"}), "stage 1 (txt2img): refiner_checkpoint 'sdxl'"),
        (spec(settings={"override_settings": {"sd_vae": "kl.pt"}}), "stage 1 (txt2img): override_settings.sd_vae 'kl.pt'"),
        (spec({"type": "adetailer", "ad_model": "face_yolov8n.pt", "ad_scheduler": "Karas"}), "stage 2 (adetailer): ad_scheduler 'Karas'"),
        (spec({"type": "adetailer", "ad_model": "face_yolov8n.pt", "ad_checkpoint": "sdxl"}), "stage 2 (adetailer): ad_checkpoint 'sdxl'"),
        (spec({"type": "adetailer", "ad_model": "face_yolov8n.pt", "ad_vae": "kl.pt"}), "stage 2 (adetailer): ad_vae 'kl.pt'"),
    ],
    ids=lambda value: value if isinstance(value, str) else "",
)
def test_a_bad_name_is_reported_under_its_own_key(job, named, webui_client):
    (problem,) = preflight(job, ServerCatalog.from_client(webui_client))
    assert problem.startswith(f"{named} is not on the server; choose one of: ")


# -------------------------------------------------------------------------
# Names in every prompt, lists read from small answers, a file's jobs named
# -------------------------------------------------------------------------

#: A server with one sampler, scheduler, VAE and LoRA, each with an alias where A1111 has one.
SMALL = {
    "samplers": [{"name": "Euler a", "aliases": ["k_euler_a"]}, {"name": "DPM++ 2M", "aliases": []}],
    "upscalers": [{"name": "Lanczos"}],
    "sd_models": [{"title": "base.safetensors [abc]", "model_name": "base"}],
    "adetailer_models": ["face_yolov8n.pt"],
    "adetailer_schema": {"title": "ADetailer"},  # a schema that lists no settings
    "schedulers": [{"name": "karras", "label": "Karras", "aliases": ["Karras sched"]}],
    "sd_vae": [{"model_name": "kl-f8.pt", "filename": "/models/VAE/kl-f8.pt"}],
    "loras": [{"name": "detail", "alias": "det"}, {"name": "plain", "alias": ""}],
}


def small(**changes: Any) -> ServerCatalog:
    return ServerCatalog.from_answers({**SMALL, **changes})


FACE = {"type": "adetailer", "ad_model": "face_yolov8n.pt"}


@pytest.mark.parametrize(
    ("job", "key"),
    [
        (spec(prompt="<lora:missing:1>"), "prompt"),
        (spec(negative_prompt="<lora:missing:1>"), "negative_prompt"),
        (spec(settings={"hr_prompt": "<lora:missing:1>"}), "stage 1 (txt2img): hr_prompt"),
        (spec(settings={"hr_negative_prompt": "<lora:missing:1>"}), "stage 1 (txt2img): hr_negative_prompt"),
        (spec({**FACE, "ad_prompt": "<lora:missing:1>"}), "stage 2 (adetailer): ad_prompt"),
        (spec({**FACE, "ad_negative_prompt": "<lora:missing:1>"}), "stage 2 (adetailer): ad_negative_prompt"),
    ],
    ids=lambda value: value if isinstance(value, str) else "",
)
def test_a_lora_missing_from_any_prompt_is_reported_under_its_key_and_needs_the_list(job, key):
    catalog = attrs.evolve(small(), ad_fields=frozenset({"ad_model", "ad_prompt", "ad_negative_prompt"}))
    assert [_without_choices(problem) for problem in preflight(job, catalog)] == [f"{key}: LoRA 'missing' is not on the server"]
    assert "loras" in lists_needed([job])


def test_a_server_without_loras_says_so_in_the_choices():
    (problem,) = preflight(spec(prompt="<lora:detail:1>"), small(loras=[]))
    assert problem == "prompt: LoRA 'detail' is not on the server; choose one of: (the server has none)"


def test_the_lists_are_read_with_their_aliases():
    catalog = small()
    assert preflight(spec(prompt="<lora:detail:1> <lora:det:1> <lora:plain:1>"), catalog) == []
    assert catalog.loras == Choices(("detail", "plain"), frozenset({"det"}))
    assert catalog.vaes == Choices(("kl-f8.pt",))
    assert catalog.schedulers == Choices(("Karras",), frozenset({"karras", "Karras sched"}))
    assert catalog.ad_fields == frozenset()  # a schema without properties allows nothing


def test_an_adetailer_scheduler_may_keep_the_samplers_or_name_a_scheduler_by_its_alias():
    job = spec({**FACE, "ad_scheduler": "Use same scheduler"}, {**FACE, "ad_scheduler": "Karras sched"})
    catalog = attrs.evolve(small(), ad_fields=frozenset({"ad_model", "ad_scheduler"}))
    assert preflight(job, catalog) == []


def test_without_a_vae_list_any_vae_passes():
    assert preflight(spec({**FACE, "ad_vae": "anything.pt"}), attrs.evolve(small(sd_vae=None), ad_fields=None)) == []


def test_an_old_name_is_split_only_into_a_sampler_the_server_has():
    catalog = small()
    job = spec({**FACE, "ad_sampler": "DPM++ 2M Karras"}, settings={"sampler_name": "Euler Karras"})
    split, notes = split_sampler_names([job], catalog)
    assert notes == ["ad_sampler 'DPM++ 2M Karras' is sampler 'DPM++ 2M' with scheduler 'Karras' on this server; sent so"]
    assert split[0].stages[1].adetailer["ad_sampler"] == "DPM++ 2M" and split[0].stages[1].adetailer["ad_scheduler"] == "Karras"
    assert split[0].stages[0].settings["sampler_name"] == "Euler Karras"  # no sampler "Euler" here: kept, and reported
    assert [_without_choices(problem) for problem in preflight(split[0], catalog)][0] == (
        "stage 1 (txt2img): sampler_name 'Euler Karras' is not on the server (did you mean 'Euler a'?)"
    )


@pytest.mark.parametrize(("bad", "named"), [(3, "(in 'j0', 'j1', 'j2')"), (4, "(in 'j0', 'j1', 'j2' and 1 more)")])
def test_a_name_bad_in_some_jobs_names_three_of_them_and_counts_the_rest(bad, named):
    jobs = [spec(name=f"j{i}", **({"checkpoint": "v15"} if i < bad else {})) for i in range(5)]
    (problem,) = check_against_server(jobs, small())
    assert problem.endswith(named)


def test_the_lists_are_asked_for_at_once():
    """Each list waits for all the others to be asked: they are asked in parallel, or never answered."""
    waiting = threading.Barrier(len(LISTS), timeout=10)

    class AllAtOnce(RecordedServer):
        def __getattribute__(self, name: str) -> Any:
            method = super().__getattribute__(name)
            if name not in LISTS:
                return method

            def asked() -> Any:
                waiting.wait()
                return method()

            return asked

    assert ServerCatalog.from_client(AllAtOnce()) == ServerCatalog.from_client(RecordedServer())


def test_a_server_running_some_of_a_jobs_stages_checks_only_what_they_use():
    job = spec({"type": "upscale", "upscaler": "Nope"}, checkpoint="v15", settings={"sampler_name": "Eulr a"})
    problems = [_without_choices(problem) for problem in preflight(job, small(), stages=[1])]
    # extras load no checkpoint and take no sampler: only the upscaler is this server's business
    assert problems == ["stage 2 (upscale): upscaler 'Nope' is not on the server"]
    assert len(preflight(job, small())) == 3  # all of it: the checkpoint, the sampler, the upscaler
