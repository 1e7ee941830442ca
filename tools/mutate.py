"""`./dev mutate [GROUP...]`: mutation testing of the core's logic with mutmut.

mutmut needs the package where its import name says (``src/sdjobs/...``), while sdjobs maps the
folder core/ onto the package.  So each group runs in a copy of its own under .mutate/GROUP,
laid out as ``src/sdjobs`` (core/, with plugins/ and frontends/ inside as in the installed
package) plus the tests; the working tree is never touched.  Each group runs only the test files
that exercise its modules (GROUPS below); within those, mutmut runs for each mutant only the
tests that call the mutated function, fastest first, stopping at the first failure, all under
a timeout of five times their clean duration plus five seconds.

Prints one line per group, then, last, the raw score: killed / all mutants, where a mutant the
tests kill by running into the timeout counts as killed and one no test reaches as not killed.
Survivors are listed in .mutate/survivors.txt; ``cd .mutate/GROUP && mutmut show NAME`` shows one.
Two groups run at once; $SDJOBS_MUTATE_CHILDREN sets how many mutants each runs at once (default:
one per CPU).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / ".mutate"

#: group -> (the modules mutated, as paths inside the package; the test files run for them)
GROUPS: dict[str, tuple[list[str], list[str]]] = {
    "progress": (
        ["progress.py"],
        [
            "tests/test_progress.py",
            "tests/test_request_shape.py",
            "tests/test_progress_reading.py",
            "tests/test_eta_steady.py",
            "tests/test_progress_details.py",
            "tests/test_progress_traces.py",
            # less the bench script's own test (it runs every trace through two models: 5 s a mutant)
            "-k",
            "not bench_prints_its_table",
        ],
    ),
    "job": (
        ["job.py", "machine.py", "stage.py"],
        [
            "tests/test_machine.py",
            "tests/test_job_paths.py",
            "tests/test_job_records.py",
            "tests/test_job_properties.py",
            "tests/test_job_start.py",
            "tests/test_hook_sequence.py",
            "tests/test_resume.py",
        ],
    ),
    "polling": (["plugins/progress_poller.py"], ["tests/test_polling.py"]),
    "preflight": (["preflight.py"], ["tests/test_preflight.py"]),
    "client": (
        ["client.py"],
        # less the end-to-end run through a hostile proxy: it needs every route asked in time,
        # which the slower mutated code does not always manage
        [
            "tests/test_client.py",
            "tests/test_client_calls.py",
            "tests/test_client_messages.py",
            "tests/test_hostile_answers.py",
            "-k",
            "not ends_done",
        ],
    ),
    "payloads": (["payloads.py"], ["tests/test_payloads.py"]),
    "outputs": (["outputs.py"], ["tests/test_outputs.py"]),
    # the SQLite store only (the PostgreSQL backend of the contract suite needs a server), less two
    # slow tests that reach nothing the others do not: specs read back (JobSpec's JSON, over many
    # specs) and workers in several processes (the mutant lives in this process only)
    "store": (
        ["store.py", "sql_store.py", "sqlite_store.py"],
        [
            "tests/test_store_contract.py",
            "tests/test_sqlite_store.py",
            "-k",
            "not postgres and not read_back_from_json and not several_processes",
        ],
    ),
}

#: Lines not mutated, as regular expressions, each with its reason:
NOT_MUTATED = [
    # debug-level log lines: text for a developer reading `--log-level debug`, promised to no one
    r"\blog\.debug\(",
    # SQL text (the stores): its string mutants are a change of case, which SQLite does not
    # see (keywords and names are case-insensitive), or an XX-wrapped statement, a syntax error the
    # first test of the call hits; they cost a whole test run each.  (The lines' other mutants,
    # the statement's arguments, go with them.)
    r'f?"\s*(SELECT|UPDATE|INSERT|DELETE|PRAGMA|BEGIN|CREATE|AND|OR|ORDER|ON CONFLICT)\b',
    r'^\s*f?" [a-z_]+ = ',
    # a column read from an `sqlite3.Row`, whose keys are case-insensitive too: `id=row["id"],`
    r'^\s*\w+=(bool\()?row\["\w+"\]\)?,$',
]

#: mutmut's exit codes that mean the tests noticed the mutant (a failure, an error, a timeout).
KILLED = {1, 3, 24, -24, 36, 152, 255}
TIMEOUT = {24, -24, 36, 152, 255}
SURVIVED = 0
NO_TEST = 33


def lay_out(group: str, modules: list[str], tests: list[str]) -> Path:
    """A fresh copy of the package in src/ layout, the tests, and mutmut's settings."""
    copy = WORK / group
    shutil.rmtree(copy, ignore_errors=True)
    skip = shutil.ignore_patterns("__pycache__", ".hypothesis")
    package = copy / "src" / "sdjobs"
    shutil.copytree(ROOT / "core", package, ignore=skip)
    shutil.copytree(ROOT / "plugins", package / "plugins", ignore=skip)
    shutil.copytree(ROOT / "frontends", package / "frontends", ignore=skip)
    for name in ("tests", "examples", "docs", "bench"):
        shutil.copytree(ROOT / name, copy / name, ignore=skip)
    settings = [
        "[tool.mutmut]",
        'source_paths = ["src"]',
        f"only_mutate = {json.dumps([f'src/sdjobs/{m}' for m in modules])}",
        f"do_not_mutate_patterns = {json.dumps(NOT_MUTATED)}",
        # A mutant that hangs is stopped after 5 x (its tests' clean duration + 1 s); mutmut's
        # default, 15 x, spends minutes on each mutant that makes a job wait forever.
        "timeout_multiplier = 5.0",
        f"pytest_add_cli_args_test_selection = {json.dumps(tests)}",
        'also_copy = ["examples", "docs", "bench", "README.md"]',
    ]
    shutil.copy2(ROOT / "README.md", copy / "README.md")
    pyproject = (ROOT / "pyproject.toml").read_text()
    (copy / "pyproject.toml").write_text(pyproject + "\n" + "\n".join(settings) + "\n")
    return copy


def results(copy: Path, modules: list[str]) -> dict[str, int | None]:
    """Each mutant's exit code, from mutmut's files beside the mutated modules."""
    codes: dict[str, int | None] = {}
    for module in modules:
        meta = copy / "mutants" / "src" / "sdjobs" / f"{module}.meta"
        codes.update(json.loads(meta.read_text())["exit_code_by_key"])
    return codes


def run_group(group: str, mutmut: Path, children: int) -> tuple[dict[str, int | None], float]:
    modules, tests = GROUPS[group]
    copy = lay_out(group, modules, tests)
    started = time.monotonic()
    log = copy / "mutmut.log"
    with log.open("w") as out:
        done = subprocess.run(
            [str(mutmut), "run", "--max-children", str(children)],
            cwd=copy,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "SDJOBS_HYPOTHESIS_PROFILE": "mutate"},
        )
    seconds = time.monotonic() - started
    if done.returncode != 0:
        sys.exit(f"mutate: mutmut failed for {group} (exit {done.returncode}); its output: {log}")
    return results(copy, modules), seconds


def main(argv: list[str]) -> int:
    unknown = [g for g in argv if g not in GROUPS]
    if unknown:
        print(f"mutate: unknown group {', '.join(unknown)}; the groups: {', '.join(GROUPS)}", file=sys.stderr)
        return 2
    mutmut = Path(sys.executable).parent / "mutmut"
    # Two groups at once, each with a mutant per CPU: a group's own start (mutants generated, the tests
    # run clean and for their stats) is one process, which the other group's mutants overlap; and
    # many tests wait (on the simulator's HTTP, a thread, a timeout) more than they compute.
    children = int(os.environ.get("SDJOBS_MUTATE_CHILDREN") or os.cpu_count() or 1)
    WORK.mkdir(exist_ok=True)
    all_codes: dict[str, int | None] = {}
    survivors: list[str] = []
    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=2) as pool:
        runs = {pool.submit(run_group, group, mutmut, children): group for group in argv or list(GROUPS)}
        for run in as_completed(runs):
            group = runs[run]
            codes, seconds = run.result()
            killed = sum(code in KILLED for code in codes.values())
            timeouts = sum(code in TIMEOUT for code in codes.values())
            survived = [name for name, code in codes.items() if code == SURVIVED]
            untested = [name for name, code in codes.items() if code == NO_TEST]
            survivors += [f"{group} {name} survived" for name in sorted(survived)]
            survivors += [f"{group} {name} no test" for name in sorted(untested)]
            all_codes.update(codes)
            print(
                f"{group:<10} {len(codes):5} mutants {killed:5} killed ({timeouts} by timeout)"
                f" {len(survived):4} survived {len(untested):3} no test  {seconds:4.0f} s",
                flush=True,
            )
    (WORK / "survivors.txt").write_text("".join(f"{line}\n" for line in sorted(survivors)))
    killed = sum(code in KILLED for code in all_codes.values())
    total = len(all_codes)
    print(f"{len(survivors)} not killed, listed in {WORK / 'survivors.txt'}; {time.monotonic() - started:.0f} s in all")
    print(f"{100 * killed / total:.1f} % killed ({killed} of {total} mutants)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
