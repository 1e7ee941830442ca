"""`sdjobs sim`: serve the simulated WebUI until Ctrl-C."""

from __future__ import annotations

import argparse
import errno
import threading
from pathlib import Path

from .catalog import VERSIONS, CatalogChoice
from .profiles import PROFILES
from .server import SimulatedWebUI
from .settings import SimSettings

_PROFILES_HELP = "; ".join(f"{p.name}: {p.summary}" for p in PROFILES.values())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `sdjobs sim`."""
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    parser.add_argument("--port", type=int, default=7860, help="port (default: %(default)s; 0 picks a free one)")
    parser.add_argument("--step-time", type=float, default=0.15, metavar="S", help="seconds per sampling step of a 512x512 image; the profile scales the rest (default: %(default)s)")
    parser.add_argument("--first-step-time", type=float, default=None, metavar="S", help="seconds of a job's first step, the model warm-up (default: 3 steps)")
    parser.add_argument("--profile", choices=list(PROFILES), default="flat", help=f"cost of steps and of the decode after a pass's last step, by width x height x batch (default: %(default)s). {_PROFILES_HELP}")
    parser.add_argument("--faces", default="1", metavar="N|A-B", help="faces ADetailer finds per image: N, or a count drawn from A-B seeded by --fault-seed (default: %(default)s)")
    parser.add_argument("--api-auth", metavar="USER:PASS", help="protect /sdapi/v1/* with HTTP Basic, like A1111's --api-auth")
    parser.add_argument("--a1111", choices=VERSIONS, default=VERSIONS[0], metavar="VERSION", help="which A1111 to play: 1.7 (the recorded server) or 1.10 (samplers split from schedulers, /sdapi/v1/schedulers, 400 for an unknown sampler) (default: %(default)s)")
    parser.add_argument("--catalog", type=Path, metavar="FILE", help="TOML naming what this server offers: checkpoints, samplers, upscalers (lists of names) and adetailer = true|false; unnamed lists stay the recorded server's")
    parser.add_argument("--nowebui", action="store_true", help="API only, like A1111's --nowebui: no /internal/* routes")
    faults = parser.add_argument_group("faults")
    faults.add_argument("--progress-error-rate", type=float, default=0.0, metavar="RATE", help="share of /sdapi/v1/progress calls that fail with 500")
    faults.add_argument("--progress-latency", type=float, default=0.0, metavar="S", help="seconds /sdapi/v1/progress waits before answering")
    faults.add_argument("--progress-stuck", action="store_true", help="progress stays at 0.01 while a job runs (Forge #1814)")
    faults.add_argument("--drop-connection-at-step", type=int, metavar="N", help="close a generation's connection unanswered after N steps")
    faults.add_argument("--generation-error", metavar="MESSAGE", help="generation requests fail with 500 and this message")
    faults.add_argument("--hang", action="store_true", help="accept connections and answer nothing, like a hung WebUI")
    faults.add_argument("--stop-after-steps", type=int, metavar="N", help="exit at once, like a crash, after N sampling steps overall")
    faults.add_argument("--fault-seed", type=int, default=0, metavar="N", help="seed of the random fault choices")


def settings_from(args: argparse.Namespace) -> SimSettings:
    """The `SimSettings` the parsed options describe (ValueError names a bad one)."""
    return SimSettings(
        step_time=args.step_time,
        first_step_time=args.first_step_time,
        faces=args.faces,
        api_auth=args.api_auth,
        ui=not args.nowebui,
        progress_error_rate=args.progress_error_rate,
        progress_latency=args.progress_latency,
        progress_stuck=args.progress_stuck,
        drop_connection_at_step=args.drop_connection_at_step,
        generation_error=args.generation_error,
        hang=args.hang,
        stop_after_steps=args.stop_after_steps,
        fault_seed=args.fault_seed,
        profile=args.profile,
        version=args.a1111,
        catalog=None if args.catalog is None else CatalogChoice.from_file(args.catalog),
    )


def run(args: argparse.Namespace) -> int:
    """Serve until Ctrl-C; 2 for bad options or a port that cannot be bound."""
    try:
        settings = settings_from(args)
    except ValueError as exc:
        print(f"sdjobs sim: {exc}")
        return 2
    try:
        sim = SimulatedWebUI(settings, host=args.host, port=args.port).start()
    except OSError as exc:
        hint = "; choose another with --port" if exc.errno == errno.EADDRINUSE else ""
        print(f"sdjobs sim: cannot listen on {args.host} port {args.port}: {exc.strerror}{hint}")
        return 2
    print(f"Simulated WebUI at {sim.url} (Ctrl-C to stop)", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        sim.stop()
    return 0
