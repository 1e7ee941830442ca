"""Which WebUI servers a worker uses, and what each one offers.

A worker runs jobs on one server or on several: `--webui URL` given more than
once, or a servers file (`--servers FILE`, else `$SDJOBS_SERVERS`), TOML with
one `[[servers]]` table each:

    [[servers]]
    name = "desk"                   # shown by every front end; unique
    url = "http://127.0.0.1:7860"
    auth_env = "DESK_AUTH"          # optional: the variable holding USER:PASS
    weight = 2                      # optional (default 1): more jobs go to it
    tags = ["sdxl", "fast"]         # optional: labels a job's stage may ask for

The file names the variable that holds a server's credentials, never the
credentials themselves, so it can be shared or committed.  A mistake is one
`ServersError` line naming the file and the key.

A job's stage may name the server it must run on (`server = "desk"`) or the
tags that server must have (`tags = ["sdxl"]`); `check_routes` refuses a job
file whose stage no server takes, naming the file and the key.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import attrs
from sdjobs.client import WebUIClient, WebUIError, parse_base_url
from sdjobs.preflight import CatalogError, ServerCatalog
from sdjobs.spec import JobFileError, JobSpec, StageSpec

#: The environment variable naming the servers file when `--servers` is not given.
SERVERS_ENV = "SDJOBS_SERVERS"

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_KEYS = ("name", "url", "auth_env", "weight", "tags")


class ServersError(ValueError):
    """A servers file, `--webui` list or credentials variable that cannot be used; one line."""


@attrs.frozen
class ServerConfig:
    """One WebUI server a worker may run jobs on.

    Attributes:
        name: How front ends and `sdjobs servers` call it.
        url: Its base URL, without credentials.
        auth_env: The environment variable holding its USER:PASS, if it needs any.
        weight: Its share of the jobs when several servers are free (higher: more).
        tags: Labels a job's stage may ask for (`StageSpec.tags`).
    """

    name: str
    url: str
    auth_env: str | None = None
    weight: float = 1.0
    tags: frozenset[str] = frozenset()

    def client(self, environ: Mapping[str, str], auth: tuple[str, str] | None = None) -> WebUIClient:
        """A client for this server; credentials from `auth_env` in ``environ``, else ``auth``."""
        if self.auth_env is not None:
            value = environ.get(self.auth_env)
            if value is None:
                raise ServersError(f"server {self.name!r}: the variable ${self.auth_env} (auth_env) is not set")
            user, sep, password = value.partition(":")
            if not (sep and user):  # never echo the value: it is a password
                raise ServersError(f"server {self.name!r}: ${self.auth_env} must look like USER:PASSWORD")
            auth = (user, password)
        return WebUIClient(self.url, auth=auth)

    def takes(self, stage: StageSpec) -> bool:
        """Whether ``stage`` may run here: it names this server, or none, and asks for no tag it lacks."""
        return stage.server in (None, self.name) and self.tags.issuperset(stage.tags)


def route_problem(stage: StageSpec, servers: Sequence[ServerConfig]) -> tuple[str, str] | None:
    """Why no server of ``servers`` takes ``stage``, as ``(key, message)``; None when one does."""
    if any(server.takes(stage) for server in servers):
        return None
    names = ", ".join(server.name for server in servers)
    if stage.server is not None and all(server.name != stage.server for server in servers):
        return "server", f"no server is named {stage.server!r}; the servers: {names}"
    missing = sorted(set(stage.tags) - {tag for server in servers for tag in server.tags})
    if missing:
        return "tags", f"no server has the tag {', '.join(map(repr, missing))}; the servers' tags: {_tags(servers)}"
    if stage.server is not None:
        [named] = (server for server in servers if server.name == stage.server)
        lacks = ", ".join(map(repr, sorted(set(stage.tags) - named.tags)))
        return "tags", f"server {stage.server!r} (named by server) does not have the tag {lacks}; the servers' tags: {_tags(servers)}"
    return "tags", f"no server has all of {', '.join(map(repr, stage.tags))}; the servers' tags: {_tags(servers)}"


def _tags(servers: Sequence[ServerConfig]) -> str:
    return "; ".join(f"{server.name}: {', '.join(sorted(server.tags)) or '-'}" for server in servers)


def check_routes(specs: Iterable[JobSpec], servers: Sequence[ServerConfig]) -> None:
    """Raise `JobFileError` (file and key) for the first stage of ``specs`` that no server of ``servers`` takes."""
    for spec in specs:
        for index, stage in enumerate(spec.stages):
            if (problem := route_problem(stage, servers)) is not None:
                key, message = problem
                raise JobFileError(spec.source, f"stages[{index + 1}].{key}", message)


def servers_from_urls(urls: Sequence[str]) -> tuple[ServerConfig, ...]:
    """One server per `--webui URL`, named HOST:PORT; the same server twice is an error."""
    servers = []
    for url in urls:
        try:
            base, _ = parse_base_url(url)
        except ValueError as exc:  # the message shows the URL without credentials
            raise ServersError(f"--webui / SDJOBS_WEBUI: {exc}") from None
        name = base.split("://", 1)[1]
        if any(server.url == base for server in servers):
            raise ServersError(f"--webui: {base} is given twice")
        servers.append(ServerConfig(name, base))
    return tuple(servers)


def read_servers(path: Path) -> tuple[ServerConfig, ...]:
    """The servers a servers file lists; `ServersError` names the file and key of any mistake."""
    try:
        with path.open("rb") as file:
            data = tomllib.load(file)
    except OSError as exc:
        raise ServersError(f"{path}: cannot read: {exc.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ServersError(f"{path}: not valid TOML: {exc}") from None
    for key in data:
        if key != "servers":
            raise ServersError(f"{path}: {key}: unknown key; list servers as [[servers]] tables")
    tables = data.get("servers")
    if not isinstance(tables, list) or not tables or not all(isinstance(table, dict) for table in tables):
        raise ServersError(f"{path}: servers: expected one or more [[servers]] tables")
    servers: list[ServerConfig] = []
    for index, table in enumerate(tables, 1):
        server = _server(table, lambda key, message, i=index: ServersError(f"{path}: servers[{i}].{key}: {message}"))
        for other in servers:
            if other.name == server.name:
                raise ServersError(f"{path}: servers[{index}].name: {server.name!r} names another server too")
            if other.url == server.url:
                raise ServersError(f"{path}: servers[{index}].url: {server.url} is server {other.name!r} too")
        servers.append(server)
    return tuple(servers)


def _server(table: dict[str, Any], error: Any) -> ServerConfig:
    for key in table:
        if key not in _KEYS:
            raise error(key, f"unknown key; the keys are {', '.join(_KEYS)}")
    for key in ("name", "url"):
        if not isinstance(table.get(key), str) or not table[key].strip():
            raise error(key, "required, a non-empty string")
    try:
        url, credentials = parse_base_url(table["url"])
    except ValueError as exc:
        raise error("url", str(exc)) from None
    if credentials is not None:
        raise error("url", "holds credentials; name the variable that holds them with auth_env instead")
    auth_env = table.get("auth_env")
    if auth_env is not None and not (isinstance(auth_env, str) and _ENV_NAME.fullmatch(auth_env)):
        # never echo it: it may be the secret itself, written where the name belongs
        raise error("auth_env", "must be the name of an environment variable holding USER:PASS, not the credentials")
    weight = table.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, int | float) or not weight > 0:
        raise error("weight", f"must be a number above 0, got {weight!r}")
    tags = table.get("tags", [])
    if not isinstance(tags, list) or not all(isinstance(tag, str) and tag for tag in tags):
        raise error("tags", "must be a list of words")
    return ServerConfig(table["name"].strip(), url, auth_env, float(weight), frozenset(tags))


@attrs.frozen
class ServerReport:
    """What `sdjobs servers` found out about one server.

    Attributes:
        server: Which server.
        error: Why it could not be asked (down, hung, refused the credentials); None when up.
        catalog: What it offers; None when it could not be asked.
        task_ids: Whether it follows our task ids (so a cancel can tell our job from another's).
        running: `(job id, job name)` of the jobs the queue runs on it.
    """

    server: ServerConfig
    error: str | None = None
    catalog: ServerCatalog | None = None
    task_ids: bool = False
    running: tuple[tuple[str, str], ...] = ()

    @property
    def version(self) -> str:
        """A1111 has no version route; its schedulers route says 1.9 or later."""
        if self.catalog is None:
            return "-"
        return "1.9 or later" if self.catalog.schedulers is not None else "before 1.9"

    def as_json(self) -> dict[str, Any]:
        catalog = self.catalog
        return {
            "name": self.server.name,
            "url": self.server.url,
            "weight": self.server.weight,
            "tags": sorted(self.server.tags),
            "up": self.error is None,
            "error": self.error,
            "version": self.version,
            "task_ids": self.task_ids,
            "adetailer": None if catalog is None else catalog.ad_models is not None,
            "checkpoints": None if catalog is None else list(catalog.checkpoints.names),
            "samplers": None if catalog is None else list(catalog.samplers.names),
            "upscalers": None if catalog is None else list(catalog.upscalers.names),
            "running": [{"id": job_id, "name": name} for job_id, name in self.running],
        }


def ask(server: ServerConfig, client: WebUIClient) -> ServerReport:
    """Ask one server what it offers and whether it follows task ids; its error when it cannot answer."""
    try:
        client.ping()
        catalog = ServerCatalog.from_client(client)
    except (WebUIError, CatalogError) as exc:
        return ServerReport(server, error=str(exc))
    return ServerReport(server, catalog=catalog, task_ids=client.supports_task_progress())


def ask_all(clients: Mapping[ServerConfig, WebUIClient]) -> list[ServerReport]:
    """`ask` every server at once, so that a down one costs its timeout once, not per server."""
    with ThreadPoolExecutor(max_workers=max(1, len(clients)), thread_name_prefix="sdjobs-servers") as pool:
        return list(pool.map(lambda item: ask(*item), clients.items()))
