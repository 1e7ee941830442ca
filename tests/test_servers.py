"""Several WebUI servers: the servers file, `--webui` repeated, and `sdjobs servers`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sdjobs.servers import ServerConfig, ServersError, read_servers, servers_from_urls
from sdjobs.sim import CatalogChoice, SimSettings, SimulatedWebUI
from sdjobs.sqlite_store import SQLiteStore

from process_helpers import sdjobs
from runner_helpers import job_spec

SECRET = "alice:s3cret-pass"


def _file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "servers.toml"
    path.write_text(text)
    return path


def test_a_servers_file_lists_each_server_with_its_defaults(tmp_path) -> None:
    path = _file(tmp_path, '[[servers]]\nname = "desk"\nurl = "http://127.0.0.1:7860/"\n\n'
                           '[[servers]]\nname = "rented"\nurl = "https://gpu.example:443"\nauth_env = "RENTED_AUTH"\n'
                           'weight = 2\ntags = ["sdxl"]\n')  # fmt: skip
    assert read_servers(path) == (
        ServerConfig("desk", "http://127.0.0.1:7860"),
        ServerConfig("rented", "https://gpu.example:443", "RENTED_AUTH", 2.0, frozenset({"sdxl"})),
    )


@pytest.mark.parametrize(("text", "named"), [
    ("", "servers: expected one or more [[servers]] tables"),
    ('[[servers]]\nurl = "http://a:1"', "servers[1].name: required"),
    ('[[servers]]\nname = "a"', "servers[1].url: required"),
    ('[[servers]]\nname = "a"\nurl = "ftp://a"', "servers[1].url: 'ftp://a' is not a WebUI URL"),
    ('[[servers]]\nname = "a"\nurl = "http://a:1"\nport = 3', "servers[1].port: unknown key"),
    ('[[servers]]\nname = "a"\nurl = "http://a:1"\nweight = 0', "servers[1].weight: must be a number above 0"),
    ('[[servers]]\nname = "a"\nurl = "http://a:1"\ntags = "x"', "servers[1].tags: must be a list"),
    ('[[servers]]\nname = "a"\nurl = "http://a:1"\n[[servers]]\nname = "a"\nurl = "http://b:1"', "servers[2].name: 'a' names another server"),
    ('[[servers]]\nname = "a"\nurl = "http://a:1"\n[[servers]]\nname = "b"\nurl = "http://a:1/"', "servers[2].url: http://a:1 is server 'a' too"),
    ("[[servers]\n", "not valid TOML"),
    ('webui = "http://a:1"', "webui: unknown key"),
])  # fmt: skip
def test_a_bad_servers_file_names_the_file_and_key(tmp_path, text, named) -> None:
    path = _file(tmp_path, text)
    with pytest.raises(ServersError) as raised:
        read_servers(path)
    assert str(raised.value).startswith(f"{path}: ") and named in str(raised.value)


@pytest.mark.parametrize("text", [
    f'[[servers]]\nname = "a"\nurl = "http://a:1"\nauth_env = "{SECRET}"',
    f'[[servers]]\nname = "a"\nurl = "http://{SECRET}@a:1"',
])  # fmt: skip
def test_credentials_written_into_the_file_are_refused_and_never_echoed(tmp_path, text) -> None:
    with pytest.raises(ServersError) as raised:
        read_servers(_file(tmp_path, text))
    assert "s3cret" not in str(raised.value) and "servers[1]" in str(raised.value)


def test_webui_urls_become_servers_named_by_host_and_port() -> None:
    assert [(s.name, s.url) for s in servers_from_urls(["http://127.0.0.1:7860/", "http://u:p@gpu:7861"])] == [
        ("127.0.0.1:7860", "http://127.0.0.1:7860"), ("gpu:7861", "http://gpu:7861")]  # fmt: skip
    with pytest.raises(ServersError, match="given twice"):
        servers_from_urls(["http://a:1", "http://a:1/"])


def test_a_server_reads_its_credentials_from_the_variable_auth_env_names() -> None:
    server = ServerConfig("a", "http://127.0.0.1:9", auth_env="A_AUTH")
    with server.client({"A_AUTH": SECRET}) as client:
        assert "s3cret" not in repr(client)
    with pytest.raises(ServersError, match=r"\$A_AUTH \(auth_env\) is not set"):
        server.client({})
    with pytest.raises(ServersError) as raised:
        server.client({"A_AUTH": "s3cret"})
    assert "USER:PASSWORD" in str(raised.value) and "s3cret" not in str(raised.value)


# -- sdjobs servers, against real simulators ----------------------------------


@pytest.fixture
def two_sims():
    """A simulator with the recorded lists and ADetailer, and one with SDXL checkpoints, no ADetailer, behind --api-auth."""
    sdxl = CatalogChoice(checkpoints=("sdxl.safetensors",), samplers=("Euler a",), upscalers=("Lanczos",), adetailer=False)
    with SimulatedWebUI(SimSettings(step_time=0.01)) as plain, \
            SimulatedWebUI(SimSettings(step_time=0.01, catalog=sdxl, api_auth=SECRET)) as locked:  # fmt: skip
        yield plain, locked


def _servers_file(tmp_path: Path, *urls: str) -> Path:
    names = ("plain", "sdxl", "gone")
    auth = {"sdxl": 'auth_env = "SDXL_AUTH"\n'}
    return _file(tmp_path, "".join(f'[[servers]]\nname = "{name}"\nurl = "{url}"\n{auth.get(name, "")}\n'
                                   for name, url in zip(names, urls)))  # fmt: skip


def test_sdjobs_servers_shows_what_each_offers_whether_up_and_what_it_runs(tmp_path, two_sims, closed_port_url, queue_file) -> None:
    plain, locked = two_sims
    path = _servers_file(tmp_path, plain.url, locked.url, closed_port_url)
    with SQLiteStore(queue_file) as store:
        worker = store.register_worker()
        [job] = store.add([job_spec(name="cat")])
        store.claim(worker.id, server=locked.url)
    result = sdjobs("servers", "--servers", path, "--json", env={"SDXL_AUTH": SECRET})
    assert result.returncode == 0, result.stderr
    assert "s3cret" not in result.stdout + result.stderr
    shown = {server["name"]: server for server in json.loads(result.stdout)}
    assert shown["plain"]["up"] and shown["plain"]["adetailer"] and shown["plain"]["task_ids"]
    assert shown["plain"]["checkpoints"] == ["empty.pt [d030ad8db7]"] and shown["plain"]["running"] == []
    assert shown["sdxl"]["up"] and shown["sdxl"]["adetailer"] is False
    assert shown["sdxl"]["checkpoints"][0].startswith("sdxl.safetensors [") and shown["sdxl"]["upscalers"] == ["Lanczos"]
    assert shown["sdxl"]["running"] == [{"id": job.id, "name": "cat"}]
    assert shown["gone"]["up"] is False and "cannot reach" in shown["gone"]["error"]
    assert shown["gone"]["checkpoints"] is None and shown["plain"]["version"] == "before 1.9"


def test_sdjobs_servers_as_text_one_block_a_server(tmp_path, two_sims, closed_port_url) -> None:
    plain, _ = two_sims
    result = sdjobs("servers", "--webui", plain.url, "--webui", closed_port_url)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"{plain.url.split('://')[1]}  {plain.url}  up"
    assert "  version: before 1.9; task ids: yes; ADetailer: yes (5 models)" in lines
    assert "  checkpoints: empty.pt [d030ad8db7]" in lines and "  running: nothing" in lines
    assert any(line.startswith(f"{closed_port_url.split('://')[1]}  {closed_port_url}  DOWN: cannot reach") for line in lines)


@pytest.mark.parametrize(("args", "env", "message"), [
    (("--webui", "http://a:1", "--servers", "x.toml"), {}, "--webui and --servers: give one or the other"),
    (("--servers", "missing.toml"), {}, "missing.toml: cannot read"),
    ((), {"SDJOBS_SERVERS": "missing.toml"}, "missing.toml: cannot read"),
    (("--webui", "nonsense"), {}, "--webui / SDJOBS_WEBUI: 'nonsense' is not a WebUI URL"),
])  # fmt: skip
def test_bad_server_options_are_one_line_and_exit_2(args, env, message) -> None:
    result = sdjobs("servers", *args, env=env)
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr.startswith("sdjobs: error: ") and message in result.stderr and result.stderr.count("\n") == 1


def test_the_worker_takes_the_same_server_options() -> None:
    result = sdjobs("worker", "--until-empty", "--servers", "missing.toml")
    assert (result.returncode, result.stderr) == (2, "sdjobs: error: missing.toml: cannot read: No such file or directory\n")


def test_a_missing_credentials_variable_is_named_and_nothing_runs(tmp_path, two_sims) -> None:
    _, locked = two_sims
    path = _servers_file(tmp_path, "http://127.0.0.1:9", locked.url)
    result = sdjobs("servers", "--servers", path)
    assert result.returncode == 2
    assert result.stderr == "sdjobs: error: server 'sdxl': the variable $SDXL_AUTH (auth_env) is not set\n"
