"""The words every front end shows: durations, ETAs, the one-line status, outcomes.

Written once, so the console, the log, and the Tk window say the same thing the
same way.  Every line built here is `printable`; a front end showing a bare
name or message passes it through `printable` itself.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime

from sdjobs.status import JobState, RuntimeStatus, StageResult

#: What an ETA reads until the server's figures allow a guess.
CALCULATING = "calculating..."

#: C0, DEL, C1, and the line and paragraph separators, each to its Python escape (`\n`, `\x1b`, `\u2028`).
_ESCAPES = str.maketrans(
    {code: ascii(chr(code))[1:-1] for code in (*range(0x20), *range(0x7F, 0xA0), 0x2028, 0x2029)}
)


def printable(text: str) -> str:
    r"""``text`` with control characters written as escapes: `a\nb\x1b[31m` for a newline and an ESC.

    Job names, stage names and a server's messages come from elsewhere; shown
    raw, a newline would forge a log line and an ESC would restyle a terminal.
    """
    return text.translate(_ESCAPES)


def format_duration(seconds: float) -> str:
    """`"45s"`, `"1m 05s"`, `"2h 03m"`: whole units, the smaller one zero-padded."""
    whole = max(0, round(seconds))
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h {minutes:02d}m"
    if minutes:
        return f"{minutes}m {secs:02d}s"
    return f"{secs}s"


def format_clock(moment: float, now: float) -> str:
    """A Unix time as a clock shows it: `"14:05"` today, `"Tue 02:10"` on another day."""
    local = datetime.fromtimestamp(moment)
    return local.strftime("%H:%M" if local.date() == datetime.fromtimestamp(now).date() else "%a %H:%M")


def format_queue_end(moment: float | None, now: float) -> str:
    """When the queue's last job should end: `"queue ends about 14:05 (in 2h 03m)"`; `"queue end unknown"`."""
    if moment is None:
        return "queue end unknown"
    return f"queue ends about {format_clock(moment, now)} (in {format_duration(moment - now)})"


def format_eta(seconds: float | None) -> str:
    """An ETA, or `"calculating..."` while there is none."""
    return CALCULATING if seconds is None else format_duration(seconds)


def format_seed(seed: int | None) -> str:
    return CALCULATING if seed is None else str(seed)


def format_step(status: RuntimeStatus) -> str | None:
    """`"12/30"`, or None until the pass's first step is done.

    At step 0 the server still reports the previous pass's step count, so a
    "0/30" there could be the wrong pass's 30.
    """
    if not status.step or not status.steps:  # None, or 0
        return None
    return f"{status.step}/{status.steps}"


def format_pass(status: RuntimeStatus) -> str | None:
    """Where the sampling is: `"step 12/30"`, `"hires 2/14"`, `"ADetailer face 1/2 · step 3/9"`.

    The step is left out while unknown (`format_step`); None when nothing is known.
    """
    step = format_step(status)
    if status.pass_kind == "face":
        face = "ADetailer" if status.face is None else f"ADetailer face {status.face[0]}/{status.face[1]}"
        return face if step is None else f"{face} · step {step}"
    if status.pass_kind == "hires":
        return "hires" if step is None else f"hires {step}"
    return None if step is None else f"step {step}"


def format_image(status: RuntimeStatus) -> str | None:
    """`"2/3"`: the image being sampled of the stage's, or None when the stage makes one.

    Shown beside the step, which starts again from 1 with every image.
    """
    if status.image is None or status.images is None:
        return None
    return f"{status.image}/{status.images}"


def status_line(status: RuntimeStatus) -> str:
    """`"Stage 2/4 img2img · image 1/3 · step 12/30 · 40% · ETA 1m 05s · seed 1234567890"`.

    The image is left out when the stage makes one, the step while unknown; a
    hires pass reads `hires 2/14` instead of a step, ADetailer's
    `ADetailer face 1/2 · step 3/9` (`format_pass`); a request waiting in the
    server's own queue says so instead.
    """
    parts = [f"Stage {status.stage_label}"]
    if (image := format_image(status)) is not None:
        parts.append(f"image {image}")
    if status.queue_position is not None:
        position, length = status.queue_position
        parts.append(f"waiting in the server's queue {position}/{length}")
    elif (sampling := format_pass(status)) is not None:
        parts.append(sampling)
    parts += [f"{status.percent}%", f"ETA {format_eta(status.eta)}", f"seed {format_seed(status.seed)}"]
    return printable(" · ".join(parts))


def unreachable_line(error: str, retry_in: float) -> str:
    """`"WebUI unreachable (cannot reach http://127.0.0.1:7860/: refused), retrying in 4 s"`."""
    return printable(f"WebUI unreachable ({error}), retrying in {retry_in:.0f} s")


def plural(count: int, noun: str) -> str:
    """`"1 stage"`, `"3 stages"`."""
    return f"{count} {noun}{'' if count == 1 else 's'}"


def images_text(count: int, *, partial: bool = False) -> str:
    """`"1 image"`, `"3 partial images"`."""
    return plural(count, "partial image" if partial else "image")


def stage_finished_line(status: RuntimeStatus, result: StageResult) -> str:
    """`"Stage 1/3 txt2img finished in 12s · 2 images in out/01-txt2img: 001.png, 002.png"`.

    Several images in one folder name it once, so the line stays readable; a
    single image keeps its whole path, ready to copy.
    """
    verb = "cut short after" if result.partial else "finished in"
    line = f"Stage {status.stage_label} {verb} {format_duration(result.elapsed)}"
    line += f" · {images_text(len(result.images), partial=result.partial)}"
    images = result.images
    folders = {path.parent for path in images}
    if len(images) > 1 and len(folders) == 1:
        line += f" in {folders.pop()}: " + ", ".join(path.name for path in images)
    elif images:
        line += ": " + ", ".join(str(path) for path in images)
    return printable(line)


def outcome_text(outcome: JobState) -> str:
    """How an outcome reads: `done`, `failed`, `cancelled`, `handed back`."""
    return outcome.value.replace("_", " ")


def outcome_line(
    name: str, outcome: JobState, error: str | None, elapsed: float, results: tuple[StageResult, ...]
) -> str:
    """`"lighthouse: done in 1m 05s · 4 images"`, or why it failed, or that it was cancelled or handed back."""
    images = sum(len(result.images) for result in results)
    took = format_duration(elapsed)
    ended = f"done in {took}" if outcome is JobState.DONE else f"{outcome_text(outcome)} after {took}"
    line = f"{name}: {ended} · {images_text(images)}"
    if outcome is JobState.HANDED_BACK:
        line += " (back in the queue: it resumes at its first unfinished stage)"
    if outcome is JobState.CANCELLED and any(result.partial for result in results):
        line += " (the stage's partial images are kept)"
    if error:
        line += f": {error}"
    return printable(line)


def drained_line(outcomes: Mapping[str, JobState], queued: int) -> str:
    """`"3 jobs: 1 done, 1 failed, 1 not run"`, outcomes in a fixed order."""
    counts = {state: 0 for state in (JobState.DONE, JobState.FAILED, JobState.CANCELLED, JobState.HANDED_BACK)}
    for outcome in outcomes.values():
        counts[outcome] += 1
    parts = [f"{count} {outcome_text(state)}" for state, count in counts.items() if count]
    if queued > len(outcomes):
        parts.append(f"{queued - len(outcomes)} not run")
    return f"{plural(queued, 'job')}: " + ", ".join(parts)


def where(status: RuntimeStatus) -> str | None:
    """Where the job runs, when there is a choice: its server (a worker with several, or `sdjobs watch`),
    and in `sdjobs watch` its worker: `"desk, worker 3fa2b1c0 on gpu1"`; None for a worker's one server."""
    parts = [status.server, None if status.worker is None else f"worker {status.worker}"]
    return ", ".join(part for part in parts if part) or None
