"""The simulator playing A1111 1.10: samplers apart from schedulers, `/schedulers`, 400 for a bad sampler."""

from __future__ import annotations

import argparse

import pytest
from sdjobs.sim import SimSettings
from sdjobs.sim.cli import add_arguments, settings_from

from .conftest import TXT2IMG, decode_png, get, post


@pytest.fixture
def sim_110(make_sim):
    return make_sim(step_time=0.0, first_step_time=0.0, version="1.10")


def test_it_lists_schedulers_and_samplers_without_their_schedule(sim_110):
    schedulers = get(sim_110, "/sdapi/v1/schedulers").json()
    assert {"name": "karras", "label": "Karras"}.items() <= schedulers[2].items()
    samplers = [sampler["name"] for sampler in get(sim_110, "/sdapi/v1/samplers").json()]
    assert "DPM++ 2M" in samplers and "DPM++ 2M Karras" not in samplers


def test_the_recorded_server_has_no_schedulers(fast_sim):
    assert get(fast_sim, "/sdapi/v1/schedulers").status_code == 404
    assert "DPM++ 2M Karras" in [sampler["name"] for sampler in get(fast_sim, "/sdapi/v1/samplers").json()]


@pytest.mark.parametrize(("version", "status"), [("1.10", 400), ("1.7", 404)])
def test_an_unknown_sampler_is_400_since_1_10(make_sim, version, status):
    sim = make_sim(step_time=0.0, first_step_time=0.0, version=version)
    response = post(sim, "/sdapi/v1/txt2img", {**TXT2IMG, "sampler_name": "Euler b"})
    assert (response.status_code, response.json()["detail"]) == (status, "Sampler not found")


def infotext(response) -> str:
    return decode_png(response.json()["images"][0]).info["parameters"]


def test_an_old_combined_name_is_split_into_sampler_and_scheduler(sim_110):
    response = post(sim_110, "/sdapi/v1/txt2img", {**TXT2IMG, "sampler_name": "DPM++ 2M Karras"})
    assert response.status_code == 200
    assert "Sampler: DPM++ 2M, Schedule type: Karras," in infotext(response)
    assert "Version: v1.10.1" in infotext(response)


def test_a_scheduler_is_taken_by_name_or_label_and_an_unknown_one_is_automatic(sim_110):
    by_name = post(sim_110, "/sdapi/v1/txt2img", {**TXT2IMG, "sampler_name": "Euler", "scheduler": "sgm_uniform"})
    assert "Sampler: Euler, Schedule type: SGM Uniform," in infotext(by_name)
    unknown = post(sim_110, "/sdapi/v1/txt2img", {**TXT2IMG, "sampler_name": "Euler", "scheduler": "karas"})
    assert "Schedule type" not in infotext(unknown)


def test_an_unknown_version_is_refused():
    with pytest.raises(ValueError, match="version"):
        SimSettings(version="1.9")


def test_the_command_line_chooses_the_version():
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert settings_from(parser.parse_args(["--a1111", "1.10"])).version == "1.10"
    assert settings_from(parser.parse_args([])).version == "1.7"
