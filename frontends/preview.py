"""`--preview` for the front ends without a window: the live preview as a file.

The console, log and jsonl front ends keep the server's latest live preview of
the running job in `preview.png` at the top of its folder, replaced whole as it
changes (a viewer never reads half of one) and removed when the job ends, so a
finished job's folder holds only its images and manifest.  A preview the server
sends as JPEG or WebP is converted; one that cannot be read is skipped.
"""

from __future__ import annotations

import base64
import binascii
import io
import logging
import os
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from sdjobs.status import RuntimeStatus

log = logging.getLogger(__name__)

#: The file's name in the running job's folder.
PREVIEW_FILE = "preview.png"

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class PreviewFiles:
    """Each running job's `preview.png` (several run at once on several servers); does nothing
    unless ``enabled`` (`--preview`).

    A job's calls come from its own thread, one at a time; entries of different jobs
    are separate, so no lock is needed (a live view may read `path` from another).
    """

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._written: dict[str, tuple[Path, str]] = {}  # job id -> the file, and the preview in it

    def path(self, job_id: str) -> Path | None:
        """The file written for the job, if any yet."""
        written = self._written.get(job_id)
        return None if written is None else written[0]

    def update(self, status: RuntimeStatus) -> Path | None:
        """Write ``status.preview`` when it is new; the file's path once one is written for the job."""
        written = self._written.get(status.job_id)
        if not self.enabled or status.folder is None or not status.preview or (written and written[1] == status.preview):
            return self.path(status.job_id)
        try:
            png = _as_png(base64.b64decode(status.preview, validate=True))
        except (binascii.Error, ValueError, OSError, UnidentifiedImageError) as exc:  # a preview is a nicety
            log.debug("%s: live preview not written: %s", status.name, exc)
            return self.path(status.job_id)
        path = status.folder / PREVIEW_FILE
        scratch = path.with_name(f".{PREVIEW_FILE}.partial")
        try:
            scratch.write_bytes(png)
            os.replace(scratch, path)
        except OSError as exc:
            log.warning("%s: cannot write the live preview %s: %s", status.name, path, exc.strerror or exc)
            return self.path(status.job_id)
        self._written[status.job_id] = (path, status.preview)
        return path

    def remove(self, job_id: str) -> None:
        """The job ended: its folder keeps no preview."""
        written = self._written.pop(job_id, None)
        if written is not None:
            written[0].unlink(missing_ok=True)


def _as_png(data: bytes) -> bytes:
    if data.startswith(_PNG_SIGNATURE):
        return data
    with Image.open(io.BytesIO(data)) as image:
        out = io.BytesIO()
        image.save(out, format="PNG")
        return out.getvalue()
