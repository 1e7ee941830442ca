"""The `sdjobs` command.

Exit status: 0 every job done; 1 a job failed (or the WebUI could not be
reached); 2 bad usage or bad input (a queue file that cannot be used too), and
then nothing ran; 130 cancelled with Ctrl-C; 143 stopped by SIGTERM, the running
job back in the queue.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import sys
import time
from collections.abc import Collection, Mapping, Sequence
from datetime import datetime, timedelta
from importlib.metadata import version
from pathlib import Path

import attrs

from sdjobs import frontend as frontends
from sdjobs import machine
from sdjobs.client import DEFAULT_URL, WebUIClient, WebUIError
from sdjobs.expand import DEFAULT_LIMIT, load_jobs
from sdjobs.exits import EXIT_BROKEN_PIPE, EXIT_CANCELLED, EXIT_FAILED, EXIT_TERMINATED, EXIT_USAGE
from sdjobs.frontends.formatting import format_clock, format_duration, plural, printable
from sdjobs.frontends.pipe import silence
from sdjobs.history import Estimate, ServerHistory, plan_queue, queue_end
from sdjobs.hooks import Hooks, describe_plugins, make_plugin_manager, plugin_loggers
from sdjobs.job import JobSettings
from sdjobs.lanes import DEFAULT_HEALTH_INTERVAL, Lane, Lanes
from sdjobs.polling import DEFAULT_POLL_INTERVAL, POLL_INTERVAL_RANGE
from sdjobs.preflight import CatalogError, ServerCatalog, check_against_server, split_sampler_names
from sdjobs.runner import Runner
from sdjobs.postgres_store import is_postgres_url
from sdjobs.queues import migrate_queue, open_store, queue_location
from sdjobs.servers import (SERVERS_ENV, ServerConfig, ServerReport, ServersError, ask_all, check_routes, read_servers,
                            servers_from_urls)
from sdjobs.spec import JobFileError, JobSpec, StagePlan, StageSpec, load_job, read_toml
from sdjobs.sqlite_store import QUEUE_ENV
from sdjobs.status import CancelMode, JobState
from sdjobs.store import JobRecord, Store, StoreError
from sdjobs.watch import Watcher
from sdjobs.worker import Worker

DEMO_JOB = Path(__file__).resolve().parent / "demo.toml"
STALL_AFTER = attrs.fields(JobSettings).stall_after.default
WAIT_FOR_WEBUI = attrs.fields(JobSettings).wait_for_webui.default
LOG_LEVEL = attrs.fields(frontends.FrontendOptions).log_level.default


class UsageError(Exception):
    """Bad usage or bad input: reported in one line, exit status 2, nothing run."""


@attrs.frozen
class Plugins:
    """The plugins and front ends of one command, loaded once (see `load_plugins`).

    Attributes:
        hooks: The hooks of every plugin loaded.
        frontends: Each front end the plugins registered, by name.
    """

    hooks: Hooks
    frontends: Mapping[str, frontends.RegisteredFrontend]


def load_plugins() -> Plugins:
    """Load every plugin and gather the front ends; each plugin skipped is reported once, on stderr.

    A broken plugin stops no command: it is left out, and the rest runs.
    """
    hooks = Hooks(make_plugin_manager())
    found = frontends.collect_frontends(hooks)
    for problem in [*map(str, hooks.pm.failures), *hooks.pm.warnings]:
        print(f"sdjobs: warning: {problem}", file=sys.stderr)
    return Plugins(hooks, found)


def _poll_interval(text: str) -> float:
    low, high = POLL_INTERVAL_RANGE
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not low <= value <= high:
        raise argparse.ArgumentTypeError(f"must be between {low} and {high} seconds, got {value}")
    return value


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 < value < math.inf:  # false for nan too
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 <= value < math.inf:  # false for nan too
        raise argparse.ArgumentTypeError(f"must be a number of seconds, 0 or more, got {text}")
    return value


def _credentials(text: str | None) -> tuple[str, str] | None:
    if not text:
        return None
    user, sep, password = text.partition(":")
    if not sep or not user:
        # Never echo the value: it may be a password.
        raise UsageError("--auth / SDJOBS_WEBUI_AUTH must look like USER:PASSWORD")
    return user, password


def _add_run_options(parser: argparse.ArgumentParser, frontend_names: Collection[str]) -> None:
    show = _add_display_options(parser, frontend_names)
    show.add_argument("--preview", action="store_true", help="the live preview: in the tk window, else in preview.png in the running job's folder")
    _add_running_options(parser)


def _add_display_options(parser: argparse.ArgumentParser, frontend_names: Collection[str]) -> argparse._ArgumentGroup:
    names = ", ".join(frontend_names) or "none installed"
    show = parser.add_argument_group("display")
    show.add_argument(
        "--frontend",
        metavar="NAME",
        help=f"how to show progress: {names} (default: $SDJOBS_FRONTEND, else console "
        "on a terminal and log otherwise)",
    )
    show.add_argument("--log-file", type=Path, metavar="PATH", help="log front end: write here, not stderr")
    show.add_argument("--log-level", default=LOG_LEVEL, metavar="LEVEL", help=f"log front end: DEBUG, INFO, ... (default: {LOG_LEVEL})")
    show.add_argument("--log-format", metavar="FORMAT", help="log front end: a logging format string")
    show.add_argument("--close-when-done", action="store_true", help="tk: close the window when the queue has drained")
    parser.set_defaults(preview=False)
    return show


def _add_running_options(parser: argparse.ArgumentParser) -> None:
    jobs = parser.add_argument_group("running")
    jobs.add_argument("--out", type=Path, default=Path("outputs"), metavar="DIR", help="output folder (default: ./outputs)")
    jobs.add_argument(
        "--poll-interval",
        type=_poll_interval,
        default=DEFAULT_POLL_INTERVAL,
        metavar="SECONDS",
        help=f"seconds between progress samples, {POLL_INTERVAL_RANGE[0]} to {POLL_INTERVAL_RANGE[1]} (default: {DEFAULT_POLL_INTERVAL})",
    )
    jobs.add_argument(
        "--wait-for-webui",
        type=_seconds,
        default=WAIT_FOR_WEBUI,
        metavar="SECONDS",
        help="how long to wait for a WebUI that is down (refused, dropped, 502/503/504) before the "
        f"running job fails (default: {WAIT_FOR_WEBUI:g})",
    )
    jobs.add_argument(
        "--stall-after",
        type=_positive_seconds,
        default=STALL_AFTER,
        metavar="SECONDS",
        help=f"report a stall after this long without progress (default: {STALL_AFTER:g})",
    )
    jobs.add_argument(
        "--stall-interrupt-after",
        type=_positive_seconds,
        metavar="SECONDS",
        help="interrupt a stage stalled this long, failing the job (default: never)",
    )


def _add_queue_option(parser: argparse.ArgumentParser, *, lease: bool = False) -> None:
    if lease:
        parser.add_argument(
            "--lease",
            type=_positive_seconds,
            metavar="SECONDS",
            help="count a worker gone, its job resumed by another, after this long without a heartbeat; the"
            " same for every worker of a queue (default: 60 for a queue file, 30 for PostgreSQL)",
        )
    parser.add_argument(
        "--queue",
        metavar="PATH|URL",
        help=f"the queue: a file, or a postgresql:// URL shared by many machines (default: ${QUEUE_ENV}, else queue.db"
        " in the user's data folder)",
    )


def _add_job_id(parser: argparse.ArgumentParser, *, optional: bool = False) -> None:
    if optional:
        parser.add_argument("job", nargs="?", metavar="ID", help="one job (its id or a unique prefix); default: the whole queue")
    else:
        parser.add_argument("job", metavar="ID", help="the job's id, or a unique prefix of it")


def _position(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {value}")
    return value


def _date(text: str) -> float:
    """Unix time of a local date or date and time in ISO form."""
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a date like 2024-05-01 or 2024-05-01T12:00: {text!r}") from None


def _date_end(text: str) -> float:
    """As `_date`, but a date alone means the end of that day."""
    start = _date(text)
    return (datetime.fromtimestamp(start) + timedelta(days=1)).timestamp() if len(text) == len("2024-05-01") else start


def _add_job_files(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("jobs", nargs="+", type=Path, metavar="JOB.toml")
    parser.add_argument(
        "--yes", action="store_true", help=f"take files that expand to more than {DEFAULT_LIMIT:,} jobs"
    )


def _add_webui_options(parser: argparse.ArgumentParser, *, several: bool = False) -> None:
    if several:
        parser.add_argument("--webui", metavar="URL", action="append", help=f"a WebUI; repeat it to run on several (default: --servers, else ${SERVERS_ENV}, else $SDJOBS_WEBUI, else {DEFAULT_URL})")
        parser.add_argument("--servers", type=Path, metavar="FILE", help=f"TOML listing the WebUIs as [[servers]] tables: name, url, auth_env, weight, tags (default: ${SERVERS_ENV})")
    else:
        parser.add_argument("--webui", metavar="URL", help=f"the WebUI (default: $SDJOBS_WEBUI, else {DEFAULT_URL})")
    whose = " of the servers that name no auth_env" if several else ""
    parser.add_argument("--auth", metavar="USER:PASS", help=f"HTTP Basic credentials (--api-auth){whose}; default $SDJOBS_WEBUI_AUTH")


def _add_servers_file(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--servers", type=Path, metavar="FILE", help=f"the workers' servers file (default: ${SERVERS_ENV}): "
                        "every stage that names a server or tags must have one that fits, and check shows where each stage runs")


def _add_health_interval(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--health-interval", type=_positive_seconds, default=DEFAULT_HEALTH_INTERVAL, metavar="SECONDS",
                        help=f"with several servers: seconds between two pings of each; one that does not answer is marked down and its job runs elsewhere (default: {DEFAULT_HEALTH_INTERVAL:g})")


def build_parser(frontend_names: Collection[str]) -> argparse.ArgumentParser:
    """The command line; ``frontend_names`` are listed in the help of ``--frontend``."""
    parser = argparse.ArgumentParser(
        prog="sdjobs",
        description="Run multi-stage Stable Diffusion jobs (txt2img → img2img → ADetailer → upscale) "
        "against an AUTOMATIC1111-compatible WebUI, with live progress.",
        epilog="Exit status: 0 all jobs done, 1 a job failed, 2 bad usage or input, 130 cancelled (Ctrl-C), "
        "143 stopped by SIGTERM (the running job stays queued, to resume).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {version('sdjobs')}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser("demo", help="run the demo job against the built-in simulated WebUI")
    demo.add_argument("--step-time", type=_positive_seconds, metavar="S", help="simulator seconds per sampling step")
    _add_run_options(demo, frontend_names)

    run = commands.add_parser("run", help="run job files one after another (queued, so they survive a kill)")
    _add_job_files(run)
    _add_webui_options(run, several=True)
    _add_health_interval(run)
    _add_queue_option(run, lease=True)
    _add_run_options(run, frontend_names)

    worker = commands.add_parser("worker", help="run the jobs of the queue, waiting for more until stopped")
    worker.add_argument("--until-empty", action="store_true", help="stop when no job is queued or running")
    worker.add_argument("--pause-after-crash", action="store_true",
                        help="if a worker died with jobs running (kill -9, a crash), pause the queue instead of "
                             "resuming them (sdjobs queue resume goes on)")  # fmt: skip
    _add_webui_options(worker, several=True)
    _add_health_interval(worker)
    _add_queue_option(worker, lease=True)
    _add_run_options(worker, frontend_names)

    watch = commands.add_parser("watch", help="show every worker's jobs live, from any host that reaches the queue")
    watch.add_argument("--until-empty", action="store_true", help="stop when no job is queued or running")
    _add_queue_option(watch)
    _add_display_options(watch, frontend_names)

    servers = commands.add_parser("servers", help="list the WebUIs: up or not, what each offers, what each runs")
    _add_webui_options(servers, several=True)
    servers.add_argument("--json", action="store_true", help="print JSON")
    _add_queue_option(servers)

    queue = commands.add_parser("queue", help="the durable queue of jobs")
    queue_commands = queue.add_subparsers(dest="queue_command", required=True, metavar="ACTION")
    add = queue_commands.add_parser("add", help="queue job files; prints each job's id and name")
    _add_job_files(add)
    add.add_argument("--check", action="store_true", help="check every name against the WebUI first (--webui)")
    _add_webui_options(add)
    _add_servers_file(add)
    add.add_argument("--priority", type=int, default=0, metavar="N", help="higher runs sooner (default: 0)")
    add.add_argument("--paused", action="store_true", help="held back until resumed")
    _add_queue_option(add)
    for name, text in (("list", "the jobs that have not ended, in the order they run"),
                       ("show", "one job: its spec, the stages done, images, folder and seed")):  # fmt: skip
        shown = queue_commands.add_parser(name, help=text)
        if name == "show":
            _add_job_id(shown)
        else:
            shown.add_argument("--webui", metavar="URL", action="append", help="a WebUI whose history prices the jobs; "
                               f"repeat it for several, each running one job at a time (default: --servers, else ${SERVERS_ENV}, "
                               f"else $SDJOBS_WEBUI, else {DEFAULT_URL})")  # fmt: skip
            shown.add_argument("--servers", type=Path, metavar="FILE", help=f"TOML listing the WebUIs as [[servers]] tables (default: ${SERVERS_ENV})")
        shown.add_argument("--json", action="store_true", help="print JSON")
        _add_queue_option(shown)
    cancel = queue_commands.add_parser("cancel", help="cancel a job; a running one is stopped by its worker within a second")
    _add_job_id(cancel)
    cancel.add_argument("--after-stage", action="store_true", help="let a running job finish its running stage first")
    for name, text in (("remove", "forget a job that is not running (its files stay)"),
                       ("retry", "queue a failed or cancelled job again, from its first unfinished stage")):  # fmt: skip
        _add_job_id(queue_commands.add_parser(name, help=text))
    move = queue_commands.add_parser("move", help="move a job to another place in the queue")
    _add_job_id(move)
    where = move.add_mutually_exclusive_group(required=True)
    where.add_argument("--to", type=_position, metavar="N", help="to position N, as `queue list` numbers them")
    where.add_argument("--top", action="store_true", help="to the front of the queue")
    pause = queue_commands.add_parser("pause", help="start no further job (one job, or the whole queue) until resumed")
    _add_job_id(pause, optional=True)
    pause.add_argument("--now", action="store_true", help="also hand the running job back to the queue, to resume later")
    _add_job_id(queue_commands.add_parser("resume", help="undo pause"), optional=True)
    queue_commands.add_parser("migrate", help="make the queue or bring its schema up to date (a PostgreSQL queue: once, and after upgrades)")
    for name in ("cancel", "remove", "retry", "move", "pause", "resume", "migrate"):
        _add_queue_option(queue_commands.choices[name])

    history = commands.add_parser("history", help="finished jobs, latest first")
    history.add_argument("--name", help="only jobs of this name")
    history.add_argument("--outcome", choices=[str(state) for state in JobState if state.terminal])
    history.add_argument("--since", type=_date, metavar="DATE", help="ended at or after this local time (2024-05-01, 2024-05-01T12:00)")
    history.add_argument("--until", type=_date_end, metavar="DATE", help="ended before this local time (a date alone: up to its end)")
    history.add_argument("--limit", type=_position, default=HISTORY_LIMIT, metavar="N", help=f"at most N jobs (default: {HISTORY_LIMIT})")
    history.add_argument("--json", action="store_true", help="print JSON")
    _add_queue_option(history)

    check = commands.add_parser(
        "check", help="validate job files and print what they expand to; with --webui, check names on that server"
    )
    _add_job_files(check)
    check.add_argument("--all", action="store_true", help="list every job, not only the first ones")
    check.add_argument("--json", action="store_true", help="print the jobs as JSON")
    _add_webui_options(check)
    _add_servers_file(check)
    _add_queue_option(check)

    sim = commands.add_parser("sim", help="serve the simulated WebUI")
    from sdjobs.sim import cli as sim_cli

    sim_cli.add_arguments(sim)

    machine = commands.add_parser("machine", help="print the job state machine: its states and transitions")
    machine.add_argument("job", nargs="?", type=Path, metavar="JOB.toml", help="name this job's stages in the diagram")
    machine.add_argument("--format", choices=("table", "mermaid"), default="table", help="default: table")

    commands.add_parser("plugins", help="list loaded plugins and their hooks, as JSON")
    commands.add_parser("frontends", help="list the front ends --frontend can choose")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    plugins = load_plugins()
    parser = build_parser(plugins.frontends)
    parser.set_defaults(plugins=plugins)  # every command finds them as args.plugins
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except (UsageError, JobFileError, frontends.FrontendError, StoreError) as exc:
        print(f"sdjobs: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:  # `sdjobs check ... | head`: the reader has what it wanted
        silence(sys.stdout)
        return EXIT_BROKEN_PIPE


def _load_jobs(args: argparse.Namespace) -> list[JobSpec]:
    """Every job of every file (a file may expand to many), validated before anything runs."""
    limit = sys.maxsize if args.yes else DEFAULT_LIMIT
    return [spec for path in args.jobs for spec in load_jobs(path, limit=limit)]


def _checked_on_server(specs: list[JobSpec], args: argparse.Namespace) -> list[JobSpec]:
    """The jobs, with old combined sampler names split where the server splits them; every name the
    server does not know is reported at once, as a usage error, before anything is queued."""
    with _client(args) as client:
        try:
            catalog = ServerCatalog.from_client(client)
        except (WebUIError, CatalogError) as exc:
            raise UsageError(f"cannot check the jobs against the WebUI: {exc}") from None
    specs, notes = split_sampler_names(specs, catalog)
    for note in notes:
        print(f"sdjobs: note: {note}", file=sys.stderr)
    problems = check_against_server(specs, catalog)
    if problems:
        raise UsageError(f"{plural(len(problems), 'name')} the WebUI at {client.base_url} does not know:\n  " + "\n  ".join(problems))
    return specs


#: How many jobs `sdjobs check` lists without `--all`.
CHECK_SHOWN = 10


def _servers_file(args: argparse.Namespace) -> tuple[ServerConfig, ...] | None:
    """The servers of ``--servers`` or $SDJOBS_SERVERS; None when neither is given."""
    path = args.servers or os.environ.get(SERVERS_ENV)
    try:
        return None if not path else read_servers(Path(path))
    except ServersError as exc:
        raise UsageError(str(exc)) from None


def _routed(specs: list[JobSpec], servers: Sequence[ServerConfig] | None) -> list[JobSpec]:
    """The jobs, once every stage that names a server or tags has one among ``servers`` (None: not known)."""
    if servers is not None:
        check_routes(specs, servers)
    return specs


def _runs_on(stage: StageSpec, servers: Sequence[ServerConfig] | None) -> str:
    """`" · on desk or rented"`: where `sdjobs check` says a stage runs, given the servers; without
    them, what the stage asks for ("" when nothing)."""
    if servers is not None:
        names = [server.name for server in servers if server.takes(stage)]
        return " · on any server" if len(names) == len(servers) else f" · on {' or '.join(map(printable, names))}"
    tagged = f"tagged {', '.join(stage.tags)}" if stage.tags else ""
    if stage.server is None:
        return printable(f" · on a server {tagged}") if tagged else ""
    return printable(f" · on {stage.server}{', ' + tagged if tagged else ''}")


def cmd_check(args: argparse.Namespace) -> int:
    servers = _servers_file(args)
    specs = _routed(_load_jobs(args), servers)
    if args.webui or os.environ.get("SDJOBS_WEBUI"):
        specs = _checked_on_server(specs, args)
    history = _history(args, create=False)
    estimates = [None if history is None else history.estimate(spec) for spec in specs]
    if args.json:
        print(json.dumps([{**_plan_record(spec), "expected": _estimate_json(estimate)}
                          for spec, estimate in zip(specs, estimates, strict=True)], indent=2, default=str))  # fmt: skip
        return 0
    images = sum(spec.plan()[-1].images for spec in specs)
    print(f"{plural(len(specs), 'job')}, {plural(images, 'final image')}")
    if len(specs) > 1:
        print(f"expected duration of them all: {_expected_text(None if history is None else sum(estimates[1:], estimates[0]))}")
    shown = specs if args.all else specs[:CHECK_SHOWN]
    random_seeds = {path for path in args.jobs if _draws_seeds(path)}
    for spec, estimate in zip(shown, estimates, strict=False):
        seed = "random, drawn when queued" if spec.source in random_seeds else spec.seed
        print(f"{spec.source}: {spec.name!r}, seed {seed}")
        for index, (step, stage) in enumerate(zip(spec.plan(), spec.stages, strict=True)):
            print(
                f"  {index + 1}. {step.type:<9} {step.endpoint:<18} "
                f"{plural(step.requests, 'request')}, {plural(step.images, 'image')}, {_shown_steps(step)}"
                f"{_runs_on(stage, servers)}"
            )
        print(f"  expected duration: {_expected_text(estimate)}")
    if len(shown) < len(specs):
        print(f"... and {len(specs) - len(shown)} more (--all lists them)")
    return 0


def _shown_steps(plan: StagePlan) -> str:
    """`"step x/40 then hires x/20 per image"`: the steps per pass as the run will count them."""
    if not plan.shown_steps:
        return "no sampling"
    if plan.shown_steps[0][0] == "face":
        return f"ADetailer step x/{plan.shown_steps[0][1]} per face found"
    passes = " then ".join(f"{'' if kind == 'main' else kind + ' '}x/{steps}" for kind, steps in plan.shown_steps)
    return f"step {passes} per image"


def _server(args: argparse.Namespace) -> str:
    """The WebUI of ``--webui`` / ``$SDJOBS_WEBUI`` (else the default) as the store names it: no credentials."""
    url = args.webui or os.environ.get("SDJOBS_WEBUI") or DEFAULT_URL
    try:
        with WebUIClient(url) as client:
            return client.base_url
    except ValueError as exc:  # the message shows the URL without credentials
        raise UsageError(f"--webui / SDJOBS_WEBUI: {exc}") from None


def _history(args: argparse.Namespace, *, create: bool = True) -> ServerHistory | None:
    """What the store of ``--queue`` knows of the server of ``--webui``; None: nothing yet
    (without ``create``, a queue file that does not exist is not made)."""
    location = queue_location(args.queue)
    if not create and not is_postgres_url(location) and not Path(location).exists():
        return None
    with _open_store(args) as store:
        return ServerHistory.load(store, _server(args))


def _expected_text(estimate: Estimate | None, *, short: bool = False) -> str:
    """`"about 1m 05s"`, `"45s to 1m 25s"` when the history is unsure, or unknown."""
    if estimate is None:
        return "unknown" if short else "unknown: no history for this server yet"
    if estimate.sure:
        return f"about {format_duration(estimate.seconds)}"
    return f"{format_duration(estimate.low)} to {format_duration(estimate.high)}"


def _estimate_json(estimate: Estimate | None) -> dict[str, float] | None:
    return None if estimate is None else attrs.asdict(estimate)


def _draws_seeds(path: Path) -> bool:
    """Whether the file leaves its seeds to chance, so that the ones `check` drew are not the run's."""
    data = read_toml(path)
    return data.get("seed", -1) == -1 or data.get("seed_policy") == "random"


def _plan_record(spec: JobSpec) -> dict[str, object]:
    return {
        "name": spec.name,
        "source": spec.source,
        "seed": spec.seed,
        "stages": [attrs.asdict(step) for step in spec.plan()],
    }


def cmd_machine(args: argparse.Namespace) -> int:
    if args.format == "table":
        print(machine.as_table())
    else:
        stages = tuple(stage.type for stage in load_job(args.job).stages) if args.job else ()
        print(machine.as_mermaid(stages))
    return 0


def _make_out_dir(path: Path) -> None:
    """Make the output folder now: one that cannot be made stops the run before it starts."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"--out {path}: cannot create the folder: {exc.strerror or exc}") from None


def _open_store(args: argparse.Namespace) -> Store:
    """The queue of ``--queue`` or ``$SDJOBS_QUEUE``; one that cannot be used is a `StoreError`."""
    return open_store(args.queue, lease=getattr(args, "lease", None))


def _client(args: argparse.Namespace) -> WebUIClient:
    url = args.webui or os.environ.get("SDJOBS_WEBUI") or DEFAULT_URL
    auth = _credentials(args.auth or os.environ.get("SDJOBS_WEBUI_AUTH"))
    try:
        return WebUIClient(url, auth=auth)
    except ValueError as exc:  # the message shows the URL without credentials
        raise UsageError(f"--webui / SDJOBS_WEBUI: {exc}") from None


def _servers(args: argparse.Namespace) -> tuple[ServerConfig, ...]:
    """The servers of `--webui` (repeated), else `--servers`, else $SDJOBS_SERVERS, else the one WebUI of
    $SDJOBS_WEBUI or the default URL."""
    if args.webui and args.servers:
        raise UsageError("--webui and --servers: give one or the other")
    path = args.servers or os.environ.get(SERVERS_ENV)
    try:
        if args.webui or not path:
            return servers_from_urls(args.webui or [os.environ.get("SDJOBS_WEBUI") or DEFAULT_URL])
        return read_servers(Path(path))
    except ServersError as exc:
        raise UsageError(str(exc)) from None


def _server_clients(args: argparse.Namespace) -> dict[ServerConfig, WebUIClient]:
    """A client for each server; credentials from each one's `auth_env`, else --auth / $SDJOBS_WEBUI_AUTH."""
    auth = _credentials(args.auth or os.environ.get("SDJOBS_WEBUI_AUTH"))
    try:
        return {server: server.client(os.environ, auth) for server in _servers(args)}
    except ServersError as exc:
        raise UsageError(str(exc)) from None


def cmd_servers(args: argparse.Namespace) -> int:
    """Ask every server what it offers; the queue says what runs on each."""
    clients = _server_clients(args)
    try:
        reports = ask_all(clients)
    finally:
        for client in clients.values():
            client.close()
    with _open_store(args) as store:
        running = [job for job in store.list() if job.state is JobState.RUNNING]
    reports = [attrs.evolve(report, running=tuple((job.id, job.spec.name) for job in running if job.server == report.server.url))
               for report in reports]  # fmt: skip
    if args.json:
        print(json.dumps([report.as_json() for report in reports], indent=2))
    else:
        for report in reports:
            _print_server(report)
    return 0


def _print_server(report: ServerReport) -> None:
    server, catalog = report.server, report.catalog
    print(f"{printable(server.name)}  {server.url}  {'up' if catalog else 'DOWN: ' + printable(report.error or '')}")
    if catalog is not None:
        adetailer = "no" if catalog.ad_models is None else f"yes ({plural(len(catalog.ad_models), 'model')})"
        print(f"  version: {report.version}; task ids: {'yes' if report.task_ids else 'no'}; ADetailer: {adetailer}")
        for label, choices in (("checkpoints", catalog.checkpoints), ("samplers", catalog.samplers), ("upscalers", catalog.upscalers)):
            print(f"  {label}: {printable(str(choices)) or '(none)'}")
    if server.weight != 1.0 or server.tags:
        print(f"  weight: {server.weight:g}; tags: {', '.join(sorted(server.tags)) or '-'}")
    jobs = ", ".join(f"{job_id[:8]} {printable(name)}" for job_id, name in report.running)
    print(f"  running: {jobs or 'nothing'}")


def cmd_run(args: argparse.Namespace) -> int:
    """Queue the files for this process alone and run them, as a worker that runs only its own jobs."""
    return _work(args, add=_routed(_load_jobs(args), _servers(args)))


def cmd_worker(args: argparse.Namespace) -> int:
    return _work(args, until_empty=args.until_empty, pause_after_crash=args.pause_after_crash)


def _work(args: argparse.Namespace, *, add: Sequence[JobSpec] = (), until_empty: bool = False,
          pause_after_crash: bool = False) -> int:  # fmt: skip
    clients = _server_clients(args)
    with contextlib.ExitStack() as closing:
        for client in clients.values():
            closing.enter_context(client)
        shown = _frontend(args)
        _make_out_dir(args.out)
        with _open_store(args) as store:
            if len(clients) == 1:
                [client] = clients.values()
                worker = Worker(store, _runner([], client, args), add=add, until_empty=until_empty, lease=store.lease,
                                pause_after_crash=pause_after_crash)  # fmt: skip
            else:
                lanes = Lanes([Lane(server, _runner([], client, args, server.name)) for server, client in clients.items()],
                              health_interval=args.health_interval)
                worker = Worker(store, add=add, until_empty=until_empty, lease=store.lease, lanes=lanes,
                                pause_after_crash=pause_after_crash)  # fmt: skip
            status = _show(worker, shown)
            if worker.handed_back is not None:
                print(f"sdjobs: {worker.handed_back.describe()}", file=sys.stderr)
            return status


def cmd_watch(args: argparse.Namespace) -> int:
    """Show the queue's running jobs, whichever worker runs them, until Ctrl-C (0) or, with --until-empty, until
    nothing is left to run."""
    shown = _frontend(args)
    with _open_store(args) as store:
        watcher = Watcher(store, args.plugins.hooks, until_empty=args.until_empty)
        previous = signal.signal(signal.SIGTERM, lambda signum, frame: watcher.stop())
        try:
            status = shown.run(watcher)
        finally:
            signal.signal(signal.SIGTERM, previous)
    return 0 if status in (None, EXIT_CANCELLED) else status  # a second Ctrl-C (130) stops watching too


def cmd_queue(args: argparse.Namespace) -> int:
    if args.queue_command == "migrate":
        print(migrate_queue(args.queue))
        return 0
    with _open_store(args) as store:
        return QUEUE_COMMANDS[args.queue_command](store, args)


def _queue_add(store: Store, args: argparse.Namespace) -> int:
    specs = _routed(_load_jobs(args), _servers_file(args))
    if args.check:
        specs = _checked_on_server(specs, args)
    for record in store.add(specs, priority=args.priority, paused=args.paused):
        print(f"{record.id}  {record.spec.name}")
    return 0


#: How many jobs `sdjobs history` lists without `--limit`.
HISTORY_LIMIT = 20


def _images(job: JobRecord) -> tuple[Path, ...]:
    """The job's latest images: those of its last recorded stage."""
    return job.stages[-1].images if job.stages else ()


def _elapsed(job: JobRecord) -> float | None:
    return None if job.started_at is None or job.ended_at is None else job.ended_at - job.started_at


def _job_json(job: JobRecord) -> dict[str, object]:
    return {
        "id": job.id,
        "name": job.spec.name,
        "state": str(job.state),
        "paused": job.paused,
        "priority": job.priority,
        "stage_count": len(job.spec.stages),
        "stages_done": job.next_stage,
        "attempts": job.attempts,
        "seed": job.spec.seed,
        "folder": None if job.folder is None else str(job.folder),
        "images": [str(path) for path in _images(job)],
        "error": job.error,
        "added_at": job.added_at,
        "started_at": job.started_at,
        "ended_at": job.ended_at,
        "elapsed": _elapsed(job),
    }


def _describe(job: JobRecord) -> str:
    """`"job 3fa2b1c0 (lighthouse)"`, as every queue command names what it changed."""
    return f"job {job.short_id} ({printable(job.spec.name)})"


def _print_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    widths = [max(map(len, column)) for column in zip(header, *rows, strict=True)]
    for row in (header, *rows):
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


def _queue_list(store: Store, args: argparse.Namespace) -> int:
    jobs, paused = store.list(), store.queue_paused()
    now = time.time()
    servers = _servers(args)
    planned = plan_queue(jobs, {server.url: ServerHistory.load(store, server.url) for server in servers}, now=now, paused=paused)
    names = {server.url: server.name for server in servers}
    if args.json:
        print(json.dumps({"paused": paused, "expected_end": queue_end(planned), "jobs": [
            {"position": n, **_job_json(job.record), "expected": _estimate_json(job.estimate),
             "expected_start": job.start, "expected_end": job.end, "expected_server": names.get(job.server)}
            for n, job in enumerate(planned, 1)]}, indent=2))  # fmt: skip
        return 0
    if paused:
        print("The queue is paused: no job starts until `sdjobs queue resume`.")
    if not jobs:
        print("The queue is empty.")
        return 0
    several = len(servers) > 1
    rows = [[str(n), job.short_id, printable(job.spec.name), f"{job.next_stage}/{len(job.spec.stages)}", job.shown_state, str(job.attempts),
             _expected_text(plan.estimate, short=True), _clock_time(plan.start, now), _clock_time(plan.end, now)]
            + ([printable(names.get(plan.server, "-"))] if several else [])
            for n, (job, plan) in enumerate(((plan.record, plan) for plan in planned), 1)]  # fmt: skip
    _print_table(["#", "id", "name", "stages", "state", "attempts", "expected", "start", "end"] + (["server"] if several else []), rows)
    end = queue_end(planned)
    if end is not None:
        print(f"The last job should end at {_clock_time(end, now)} (in {format_duration(end - now)}).")
    elif any(plan.runs for plan in planned):
        print(f"When the last job ends: unknown: no history for {'a server' if several else 'this server'} yet")
    return 0


def _clock_time(moment: float | None, now: float) -> str:
    """`"14:05"` today, `"Tue 02:10"` on another day; `"-"` for none."""
    return "-" if moment is None else format_clock(moment, now)


def _queue_show(store: Store, args: argparse.Namespace) -> int:
    job = store.get(args.job)
    if args.json:
        print(json.dumps({**_job_json(job), "stages": [result.to_dict() for result in job.stages],
                          "spec": job.spec.to_dict(inputs=False)}, indent=2, default=str))  # fmt: skip
        return 0
    print(f"{_describe(job)}: {job.shown_state}, {plural(job.attempts, 'attempt')}")
    print(f"id:     {job.id}")
    print(f"seed:   {job.spec.seed}")
    print(f"folder: {job.folder or 'not made yet'}")
    if job.error:
        print(f"error:  {printable(job.error)}")
    print("stages:")
    for index, stage in enumerate(job.spec.stages):
        result = job.stages[index] if index < len(job.stages) else None
        done = "not run" if result is None else ("cut short" if result.partial else "done") + f", {plural(len(result.images), 'image')}"
        print(f"  {index + 1}. {stage.type:<9} {done}")
        for path in result.images if result else ():
            print(f"     {path}")
    print("spec:")
    print(json.dumps(job.spec.to_dict(inputs=False), indent=2, default=str))
    return 0


def _queue_cancel(store: Store, args: argparse.Namespace) -> int:
    mode = CancelMode.AFTER_STAGE if args.after_stage else CancelMode.NOW
    job = store.request_cancel(args.job, mode)
    if job.ended:
        print(f"cancelled {_describe(job)}")
    else:
        when = "after its running stage" if args.after_stage else "now"
        print(f"{_describe(job)} is running: its worker cancels it {when}")
    return 0


def _queue_remove(store: Store, args: argparse.Namespace) -> int:
    job = store.get(args.job)
    store.remove(job.id)
    files = f"; its files stay in {job.folder}" if job.folder else ""
    print(f"removed {_describe(job)}{files}")
    return 0


def _queue_retry(store: Store, args: argparse.Namespace) -> int:
    job = store.retry(args.job)
    print(f"queued {_describe(job)} again, last; it starts at stage {job.next_stage + 1} of {len(job.spec.stages)}")
    return 0


def _queue_move(store: Store, args: argparse.Namespace) -> int:
    job = store.get(args.job)
    others = [other.id for other in store.list() if other.id != job.id]
    place = 0 if args.top else args.to - 1
    if place < len(others):
        store.move(job.id, before=others[place])
    else:  # last; alone in the queue, it stays where it is (an ended job is refused either way)
        store.move(job.id, after=others[-1] if others else job.id)
    position = [other.id for other in store.list()].index(job.id) + 1
    print(f"moved {_describe(job)} to position {position}")
    return 0


def _queue_pause(store: Store, args: argparse.Namespace) -> int:
    store.pause(args.job, now=args.now)
    running = "goes back to the queue" if args.now else "finishes"
    if args.job is None:
        print(f"paused the queue: no job starts until `sdjobs queue resume`; a running job {running}")
    else:
        print(f"paused {_describe(store.get(args.job))}" + (f": if it runs, it {running}" if args.now else ""))
    return 0


def _queue_resume(store: Store, args: argparse.Namespace) -> int:
    store.resume(args.job)
    print("resumed the queue" if args.job is None else f"resumed {_describe(store.get(args.job))}")
    return 0


QUEUE_COMMANDS = {
    "add": _queue_add,
    "list": _queue_list,
    "show": _queue_show,
    "cancel": _queue_cancel,
    "remove": _queue_remove,
    "retry": _queue_retry,
    "move": _queue_move,
    "pause": _queue_pause,
    "resume": _queue_resume,
}


def cmd_history(args: argparse.Namespace) -> int:
    with _open_store(args) as store:
        outcome = None if args.outcome is None else JobState(args.outcome)
        jobs = store.history(name=args.name, outcome=outcome, since=args.since, until=args.until, limit=args.limit)
    if args.json:
        print(json.dumps([_job_json(job) for job in jobs], indent=2))
        return 0
    if not jobs:
        print("No finished job" + (" matches." if any((args.name, args.outcome, args.since, args.until)) else " yet."))
        return 0
    rows = [[datetime.fromtimestamp(job.ended_at).strftime("%Y-%m-%d %H:%M"), job.short_id, str(job.state),
             printable(job.spec.name), str(len(_images(job))),
             "-" if _elapsed(job) is None else format_duration(_elapsed(job)), str(job.folder or "-")]
            for job in jobs]  # fmt: skip
    _print_table(["ended", "id", "outcome", "name", "images", "time", "folder"], rows)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from sdjobs.sim import SimSettings, SimulatedWebUI

    specs = [load_job(DEMO_JOB)]
    try:
        settings = SimSettings() if args.step_time is None else SimSettings(step_time=args.step_time)
    except ValueError as exc:
        raise UsageError(f"--step-time: {exc}") from None
    shown = _frontend(args)
    _make_out_dir(args.out)
    with SimulatedWebUI(settings) as sim, WebUIClient(sim.url) as client:
        print(f"sdjobs demo: simulated WebUI at {sim.url}", file=sys.stderr)
        return _run(specs, client, shown, args)


def _frontend(args: argparse.Namespace) -> frontends.Frontend:
    """The chosen front end, made and registered as a plugin before anything starts (a bad name runs nothing)."""
    plugins: Plugins = args.plugins
    name = frontends.choose_frontend(args.frontend, os.environ, sys.stdout.isatty(), plugins.frontends)
    chosen = plugins.frontends[name]
    shown = chosen.cls(
        frontends.FrontendOptions(
            log_file=args.log_file,
            log_level=args.log_level,
            log_format=args.log_format,
            preview=args.preview,
            close_when_done=args.close_when_done,
            loggers=plugin_loggers(plugins.hooks.pm),
        )
    )
    plugins.hooks.pm.register(shown, name=chosen.plugin_name)
    return shown


def _runner(specs: list[JobSpec], client: WebUIClient, args: argparse.Namespace, server: str | None = None) -> Runner:
    return Runner(
        specs=specs,
        client=client,
        server=server,
        hooks=args.plugins.hooks,
        out_dir=args.out,
        settings=JobSettings(
            poll_interval=args.poll_interval,
            stall_after=args.stall_after,
            stall_interrupt_after=args.stall_interrupt_after,
            wait_for_webui=args.wait_for_webui,
            preview=args.preview,
        ),
    )


def _run(specs: list[JobSpec], client: WebUIClient, shown: frontends.Frontend, args: argparse.Namespace) -> int:
    return _show(_runner(specs, client, args), shown)


def _show(session: Runner | Worker, shown: frontends.Frontend) -> int:
    """Run ``session`` in the front end; SIGTERM meanwhile hands its running job back (143)."""
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: session.hand_back())
    try:
        status = shown.run(session)
    finally:
        signal.signal(signal.SIGTERM, previous)
    if status is not None:
        return status
    return exit_status(session)


def exit_status(session: Runner | Worker) -> int:
    outcomes = set(session.outcomes.values())
    if session.handing_back:
        return EXIT_TERMINATED
    if session.stopped:
        return EXIT_CANCELLED
    if JobState.FAILED in outcomes or isinstance(session, Worker) and session.gave_up:
        return EXIT_FAILED
    if JobState.CANCELLED in outcomes:
        return EXIT_CANCELLED
    return 0


def cmd_sim(args: argparse.Namespace) -> int:
    from sdjobs.sim import cli as sim_cli

    return sim_cli.run(args)


def cmd_plugins(args: argparse.Namespace) -> int:
    plugins: Plugins = args.plugins
    owners = {name: frontend.plugin for name, frontend in plugins.frontends.items()}
    print(json.dumps(describe_plugins(plugins.hooks.pm, owners), indent=2))
    return 0


def cmd_frontends(args: argparse.Namespace) -> int:
    for name, frontend in args.plugins.frontends.items():
        print(f"{name:<10} {frontend.cls.description}")
    return 0


COMMANDS = {
    "check": cmd_check,
    "demo": cmd_demo,
    "frontends": cmd_frontends,
    "history": cmd_history,
    "machine": cmd_machine,
    "plugins": cmd_plugins,
    "queue": cmd_queue,
    "run": cmd_run,
    "servers": cmd_servers,
    "sim": cmd_sim,
    "watch": cmd_watch,
    "worker": cmd_worker,
}
