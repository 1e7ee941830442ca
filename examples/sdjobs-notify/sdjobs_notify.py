"""Tell someone when sdjobs jobs finish, stall, or the whole queue is done.

Two channels, each optional:

* a webhook: a JSON ``POST`` to ``SDJOBS_NOTIFY_URL``, with ``SDJOBS_NOTIFY_SECRET``
  (if set) in the ``X-Sdjobs-Secret`` header, so the receiver can tell it is us;
* the desktop, through ``notify-send`` where it is installed.

Hooks run on sdjobs' runner thread, so every send has a short timeout, and a
notification that cannot be delivered is logged (logger ``sdjobs_notify``) and
dropped: it never fails or delays a job beyond that timeout.  Logs name the
webhook's host only, because webhook URLs often carry a token in their path.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import time
from collections import Counter
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

import attrs
import requests

from sdjobs import hookimpl
from sdjobs.status import JobState, RuntimeStatus, StageResult

__version__ = "0.1.0"

log = logging.getLogger("sdjobs_notify")

URL_ENV = "SDJOBS_NOTIFY_URL"
SECRET_ENV = "SDJOBS_NOTIFY_SECRET"
SECRET_HEADER = "X-Sdjobs-Secret"


@attrs.frozen
class Notification:
    """One thing worth telling: a short text for the desktop, a JSON body for the webhook.

    Attributes:
        title: The desktop notification's summary line.
        body: The desktop notification's text.
        urgent: Something went wrong (a failure or a stall).
        data: The webhook's JSON body; its ``event`` names what happened.
    """

    title: str
    body: str
    urgent: bool
    data: Mapping[str, Any]

    @classmethod
    def job_finished(
        cls, status: RuntimeStatus, outcome: JobState, error: str | None, results: tuple[StageResult, ...]
    ) -> Notification:
        images = [str(path) for path in results[-1].images] if results else []
        elapsed = time.time() - status.started_at if status.started_at else None
        return cls(
            title=f"sdjobs: {status.name} {outcome}",
            body=error or f"{len(images)} image{'' if len(images) == 1 else 's'}, seed {status.seed}",
            urgent=outcome is not JobState.DONE,
            data={
                "event": "job_finished",
                "job": status.job_id,
                "name": status.name,
                "outcome": str(outcome),
                "error": error,
                "stage": status.stage,
                "stage_index": status.stage_index,
                "stage_count": status.stage_count,
                "seed": status.seed,
                "images": images,
                "elapsed": elapsed,
            },
        )

    @classmethod
    def job_stalled(cls, status: RuntimeStatus, seconds: float) -> Notification:
        return cls(
            title=f"sdjobs: {status.name} stalled",
            body=f"stage {status.stage_label}: no progress for {seconds:.0f} s at {status.percent} %",
            urgent=True,
            data={
                "event": "job_stalled",
                "job": status.job_id,
                "name": status.name,
                "stage": status.stage,
                "stage_index": status.stage_index,
                "stage_count": status.stage_count,
                "progress": status.progress,
                "seconds": seconds,
            },
        )

    @classmethod
    def queue_drained(cls, outcomes: Mapping[str, JobState]) -> Notification:
        counts = Counter(str(outcome) for outcome in outcomes.values())
        summary = ", ".join(f"{counts[state]} {state}" for state in ("done", "failed", "cancelled"))
        return cls(
            title="sdjobs: queue finished",
            body=summary,
            urgent=counts["done"] < len(outcomes),
            data={
                "event": "queue_drained",
                "jobs": len(outcomes),
                "done": counts["done"],
                "failed": counts["failed"],
                "cancelled": counts["cancelled"],
                "outcomes": {job_id: str(outcome) for job_id, outcome in outcomes.items()},
            },
        )


def _host(url: str) -> str:
    """The part of a webhook URL that is safe to log: no credentials, no path."""
    return urlsplit(url).hostname or "?"


@attrs.frozen
class Notifier:
    """An sdjobs plugin that sends a `Notification` for every finished job, stall and drained queue.

    Attributes:
        url: The webhook; None turns the webhook off.
        secret: Sent in the ``X-Sdjobs-Secret`` header; never logged or shown.
        notify_send: The ``notify-send`` program; None turns desktop notifications off.
        timeout: Seconds any one send may take.
    """

    url: str | None = None
    secret: str | None = attrs.field(default=None, repr=False)
    notify_send: str | None = attrs.field(factory=lambda: shutil.which("notify-send"))
    timeout: float = 5.0

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] = os.environ) -> Notifier:
        """Configured by ``SDJOBS_NOTIFY_URL`` and ``SDJOBS_NOTIFY_SECRET``; blank means unset."""
        return cls(url=environ.get(URL_ENV) or None, secret=environ.get(SECRET_ENV) or None)

    @hookimpl
    def sdjobs_job_finished(
        self, status: RuntimeStatus, outcome: JobState, error: str | None, results: tuple[StageResult, ...]
    ) -> None:
        self.send(Notification.job_finished(status, outcome, error, results))

    @hookimpl
    def sdjobs_job_stalled(self, status: RuntimeStatus, seconds: float) -> None:
        self.send(Notification.job_stalled(status, seconds))

    @hookimpl
    def sdjobs_queue_drained(self, outcomes: Mapping[str, JobState]) -> None:
        self.send(Notification.queue_drained(outcomes))

    def send(self, notification: Notification) -> None:
        """Deliver ``notification`` on every configured channel; log what fails, raise nothing."""
        if self.url:
            self._post(notification)
        if self.notify_send:
            self._show(notification)

    def _post(self, notification: Notification) -> None:
        headers = {"User-Agent": f"sdjobs-notify/{__version__}"}
        if self.secret:
            headers[SECRET_HEADER] = self.secret
        event = notification.data["event"]
        try:
            response = requests.post(self.url, json=notification.data, headers=headers, timeout=self.timeout)
        except requests.RequestException as exc:
            # The exception's text holds the whole URL: name its kind and the host only.
            log.warning("webhook %s to %s failed: %s", event, _host(self.url), type(exc).__name__)
            return
        if not response.ok:
            log.warning("webhook %s to %s answered %s", event, _host(self.url), response.status_code)

    def _show(self, notification: Notification) -> None:
        urgency = "critical" if notification.urgent else "normal"
        command = [
            self.notify_send, "--app-name=sdjobs", f"--urgency={urgency}",
            notification.title, notification.body,
        ]  # fmt: skip
        try:
            subprocess.run(command, timeout=self.timeout, check=True, capture_output=True)
        except (OSError, subprocess.SubprocessError) as exc:
            log.warning("desktop notification failed: %s", exc)


#: The plugin sdjobs loads through the entry point, configured from the environment.
notifier = Notifier.from_environ()
