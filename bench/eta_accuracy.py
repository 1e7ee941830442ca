"""How far off the ETA is: sdjobs' estimate against A1111's own `eta_relative`.

Replays every recorded A1111 run that has progress polls (tests/data/traces)
through `StageTracker`, each sample at its recorded time, and compares the ETA
at 25 %, 50 % and 75 % of the run with the truth (when the blocking request
returned).  Runs of a server that follows task ids are replayed twice: as
sdjobs follows them (task mode) and as it would without task ids (global mode).

Run: python bench/eta_accuracy.py [--traces-only]

With the simulated runs of `eta_sim.py` too (each cost profile, about a minute).
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import attrs
from sdjobs.history import CostModel
from sdjobs.progress import RequestShape, StageTracker
from sdjobs.spec import StagePlan, StageSpec
from sdjobs.status import ProgressInfo, TaskProgress

TRACES = Path(__file__).resolve().parents[1] / "tests" / "data" / "traces"
GLOBAL = "GET /sdapi/v1/progress"
TASK = "POST /internal/progress"
#: Where in a run the ETA is compared, as a share of its duration.
POINTS = (0.25, 0.50, 0.75)
#: A task poll and a global poll this close (seconds) count as one sample.
PAIRED = 0.05


@attrs.frozen
class Sample:
    """One progress sample as the poller reports it, at `t` seconds after the trace's first POST."""

    t: float
    info: ProgressInfo | None
    task: TaskProgress | None = None


@attrs.frozen
class Run:
    """One blocking generation request of a trace, and the samples to fold for it.

    Attributes:
        trace: The trace file's name.
        sent: When the request was sent.
        returned: When it answered.
        request: Its body.
        endpoint: `txt2img` or `img2img`.
        task_mode: Replayed as sdjobs follows a task id (else from global samples).
        baseline: The last global sample before `sent` (global mode).
        samples: Every sample of the trace, in time order.
    """

    trace: str
    sent: float
    returned: float
    request: Mapping[str, Any]
    endpoint: str
    task_mode: bool
    baseline: ProgressInfo | None
    samples: tuple[Sample, ...]

    def tracker(self, prior: CostModel | None = None) -> StageTracker:
        """A tracker planned as sdjobs plans this request: its passes, their sizes, one face assumed
        (or as many as the server's history usually finds, with a `prior`)."""
        settings = {key: value for key, value in self.request.items() if key != "alwayson_scripts"}
        scripts = {name.lower(): script for name, script in self.request.get("alwayson_scripts", {}).items()}
        ad_args = scripts.get("adetailer", {}).get("args", [])
        tab = next((arg for arg in ad_args if isinstance(arg, dict)), None)
        kind = self.endpoint
        if tab is not None and len(ad_args) > 1 and ad_args[1] is True and kind == "img2img":
            kind = "adetailer"  # skip_img2img: only the faces are sampled
        shape = RequestShape.of(kind, settings, tab)
        if prior is not None and prior.assumed_faces() is not None:
            shape = attrs.evolve(shape, faces=prior.assumed_faces())
        plan = StagePlan.of(StageSpec(type=self.endpoint, settings=settings), None)
        steps = sum(p.steps or 0 for p in shape.passes) * shape.iterations
        passes = len(shape.passes) * shape.iterations
        if shape.face is not None:
            steps += shape.iterations * shape.faces * (shape.face.steps or 0)
            passes += shape.iterations * shape.faces
        return StageTracker(
            requests=1,
            steps_per_request=max(steps, 1),
            passes_per_request=passes,
            images_per_request=plan.iterations,
            shape=shape,
            prior=prior,
        )

    @property
    def adetailer(self) -> bool:
        """ADetailer runs on it: its faces are a draw no estimate knows before the detection."""
        return any(name.lower() == "adetailer" for name in self.request.get("alwayson_scripts", {}))

    def at(self, share: float) -> float:
        """The time `share` of the way through the run."""
        return self.sent + share * (self.returned - self.sent)


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _info(line: dict[str, Any]) -> ProgressInfo | None:
    return ProgressInfo.from_response(line["body"]) if line["status"] == 200 else None


def read_runs(path: Path, *, task_mode: bool = False) -> list[Run]:
    """The txt2img/img2img runs of one trace with progress polls while they were out."""
    lines = _lines(path)
    polls = sorted(
        (line for line in lines if line.get("t") is not None and "t_end" not in line),
        key=lambda line: line["t"],
    )
    globals_ = [line for line in polls if line["endpoint"].startswith(GLOBAL)]
    runs = []
    for line in lines:
        if "t_end" not in line or line["status"] != 200:
            continue
        endpoint = line["endpoint"].split()[1].removeprefix("/sdapi/v1/")  # "POST /sdapi/v1/txt2img [note]"
        if endpoint not in ("txt2img", "img2img"):
            continue
        request = line["request"]
        if task_mode:
            samples = _task_samples(polls, globals_, request.get("force_task_id"))
        else:
            samples = tuple(Sample(poll["t"], _info(poll)) for poll in globals_)
        if not any(line["t"] < sample.t < line["t_end"] for sample in samples):
            continue
        before = [poll for poll in globals_ if poll["t"] < line["t"]]
        runs.append(
            Run(
                trace=path.name,
                sent=line["t"],
                returned=line["t_end"],
                request=request,
                endpoint=endpoint,
                task_mode=task_mode,
                baseline=_info(before[-1]) if before else None,
                samples=samples,
            )
        )
    return runs


def _task_samples(polls: list[dict], globals_: list[dict], task_id: str | None) -> tuple[Sample, ...]:
    """Our task's polls, each paired (while active) with the nearest global poll, as the poller does."""
    samples = []
    for poll in polls:
        if not poll["endpoint"].startswith(TASK) or poll.get("request", {}).get("id_task") != task_id:
            continue
        task = TaskProgress.from_response(poll["body"])
        nearest = min(globals_, key=lambda line: abs(line["t"] - poll["t"]), default=None)
        if task.active and nearest is not None and abs(nearest["t"] - poll["t"]) <= PAIRED:
            samples.append(Sample(max(poll["t"], nearest["t"]), _info(nearest), task))
        else:
            samples.append(Sample(poll["t"], None, task))
    return tuple(samples)


def all_runs() -> list[Run]:
    """Every run with progress polls: global mode for all, task mode where the trace has task polls."""
    runs = []
    for path in sorted(TRACES.glob("*.jsonl")):
        runs += read_runs(path)
        runs += [run for run in read_runs(path, task_mode=True) if run.request.get("force_task_id")]
    return runs


def replay(run: Run, tracker: StageTracker | None = None) -> Iterator[tuple[Sample, StageTracker]]:
    """Feed the run's samples to a tracker as the runner would; yield after each fold.

    Samples from before the request was sent are folded too (and must count for
    nothing); the tracker sees the request sent at its recorded time and
    returned after the last sample before the answer.
    """
    tracker = tracker or run.tracker()
    sent = False
    for sample in run.samples:
        if sample.t > run.returned:
            break
        if not sent and sample.t >= run.sent:
            tracker.request_sent(run.sent, baseline=run.baseline, task_mode=run.task_mode)
            sent = True
        tracker.fold(sample.info, sample.task, sample.t)
        yield sample, tracker
    tracker.request_returned(run.returned)


def timing_of(run: Run) -> dict | None:
    """What the run showed of its server's speed, as a recorded stage keeps it (`StageTracker.timing`)."""
    tracker = run.tracker()
    for _ in replay(run, tracker):
        pass
    return tracker.timing()


def leave_one_out(runs: list[Run]) -> list[CostModel | None]:
    """Each run's history: a `CostModel` learned from the other runs on its server (other traces,
    or the other scenarios of its profile), never from its own."""
    timings = [(run.trace, timing_of(run)) for run in runs]
    return [CostModel.fit(timing for trace, timing in timings if trace != run.trace) for run in runs]


def etas_at(
    run: Run, shares: tuple[float, ...] = POINTS, prior: CostModel | None = None
) -> list[tuple[float | None, float | None]]:
    """`(ours, A1111's)` ETA at each share of the run, from the samples seen by then."""
    moments = [run.at(share) for share in shares]
    ours: list[float | None] = [None] * len(moments)
    theirs: list[float | None] = [None] * len(moments)
    for sample, tracker in replay(run, run.tracker(prior)):
        for i, moment in enumerate(moments):
            if sample.t <= moment:
                ours[i] = tracker.eta(moment)
                if sample.info is not None and not sample.info.idle:
                    theirs[i] = sample.info.eta_relative
    return list(zip(ours, theirs))


def _cell(estimate: float | None, truth: float) -> str:
    return "—" if estimate is None else f"{100 * (estimate - truth) / truth:+.0f}%"


#: Runs left out of the accuracy figures: the truth is not a finished run (an interrupt).
INTERRUPTED = ("05_txt2img_20steps_interrupt_at_40pct.jsonl",)


def errors_of(runs: list[Run]) -> tuple[list[str], dict[str, list[list[float]]], int]:
    """Table rows and absolute % errors per point: `ours`, `history` (ours with the server's other
    runs as history), `plain` (the same for the runs without ADetailer), `a1111` (all its points),
    `paired` (A1111 where sdjobs has an estimate too);
    and how many points had two timed steps but no estimate."""
    whos = ("ours", "history", "plain", "a1111", "paired")
    errors: dict[str, list[list[float]]] = {who: [[] for _ in POINTS] for who in whos}
    rows, missing = [], 0
    for run, prior in zip(runs, leave_one_out(runs), strict=True):
        cells = []
        with_history = [ours for ours, _ in etas_at(run, prior=prior)]
        for i, (ours, theirs) in enumerate(etas_at(run)):
            truth = run.returned - run.at(POINTS[i])
            if with_history[i] is not None:
                errors["history"][i].append(100 * abs(with_history[i] - truth) / truth)
                if not run.adetailer:
                    errors["plain"][i].append(100 * abs(with_history[i] - truth) / truth)
            if ours is not None:
                errors["ours"][i].append(100 * abs(ours - truth) / truth)
            elif _timed_steps(run, run.at(POINTS[i])) >= 2:
                missing += 1
            if theirs is not None:
                errors["a1111"][i].append(100 * abs(theirs - truth) / truth)
                if ours is not None:
                    errors["paired"][i].append(100 * abs(theirs - truth) / truth)
            cells.append(f"{_cell(ours, truth)} / {_cell(with_history[i], truth)} / {_cell(theirs, truth)}")
        name = run.trace.removesuffix(".jsonl") + (f" ({run.request['force_task_id']})" if run.task_mode else "")
        mode = "task" if run.task_mode else "global"
        rows.append(f"| {name} | {mode} | {run.returned - run.sent:.1f} | " + " | ".join(cells) + " |")
    return rows, errors, missing


def _timed_steps(run: Run, moment: float) -> int:
    """Steps of our job seen (>= 1, so timed) by `moment`, as the tracker counts them."""
    seen = set()
    for sample, tracker in replay(run):
        if sample.t > moment:
            break
        if tracker.running and tracker.step is not None and tracker.step >= 1:
            seen.add((tracker.image, tracker.steps, tracker.step))
    return len(seen)


def _summary(label: str, errors: dict[str, list[list[float]]], missing: int) -> list[str]:
    out = []
    named = (("ours", "sdjobs"), ("history", "sdjobs, with history"), ("plain", "sdjobs, with history, no ADetailer"),
             ("paired", "A1111, same points"), ("a1111", "A1111, all points"))  # fmt: skip
    for who, name in named:
        cells = []
        for point in errors[who]:
            cells.append(f"{statistics.median(point):.0f} / {max(point):.0f}" if point else "—")
        every = [error for point in errors[who] for error in point]
        whole = f"{statistics.median(every):.0f} / {max(every):.0f}" if every else "—"
        n = len(every)
        out.append(f"| {label} | {name} | " + " | ".join(cells) + f" | {whole} | {n} |" + (f" {missing} |" if who == "ours" else " |"))
    return out


def main(simulated: bool = True) -> None:
    print("| run | mode | length s | " + " | ".join(f"{p:.0%}: sdjobs / with history / A1111" for p in POINTS) + " |")
    print("| --- | --- | ---: |" + " ---: |" * len(POINTS))
    sets = [("traces", [run for run in all_runs() if run.trace not in INTERRUPTED])]
    if simulated:
        from eta_sim import BASE_SIZE, simulated_runs

        sets += [(f"sim {profile}", simulated_runs((profile,))) for profile in BASE_SIZE]
    summaries = []
    for label, runs in sets:
        rows, errors, missing = errors_of(runs)
        print("\n".join(rows))
        summaries += _summary(label, errors, missing)
    print()
    print("Absolute error in % of the true time left, median / worst (n: points with an estimate;")
    print("missed: points past the second timed step with no estimate):")
    print()
    print("| runs | estimate | " + " | ".join(f"{p:.0%}" for p in POINTS) + " | all | n | missed |")
    print("| --- | --- |" + " ---: |" * (len(POINTS) + 3))
    print("\n".join(summaries))


if __name__ == "__main__":
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main(simulated="--traces-only" not in sys.argv)
