"""A job's files on disk: `<out>/<job id>/NN-<stage>/NNN.png` and `manifest.json`.

A job folder is made fresh for every run (its id carries the time and a random
suffix, and it is created exclusively), so a rerun never overwrites anything.
Every PNG keeps the text chunks the server wrote (A1111's `parameters`
infotext) and gains an `sdjobs` chunk: JSON with the job id, stage and seed.
"""

from __future__ import annotations

import io
import json
import os
import random
import re
import struct
import unicodedata
import zlib
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import attrs
from PIL import Image

from sdjobs.spec import JobSpec
from sdjobs.status import StageResult

MANIFEST = "manifest.json"

#: The PNG text key sdjobs writes its provenance under.
PROVENANCE_KEY = "sdjobs"

_SLUG_LENGTH = 40
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def slugify(name: str) -> str:
    """A job name as a safe folder-name part: lowercase ASCII letters, digits and dashes.

    Never empty, never more than 40 characters, never a path separator or dot.
    """
    ascii_name = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode()
    slug = re.sub(r"[^a-z0-9]+", "-", ascii_name.lower()).strip("-")
    return slug[:_SLUG_LENGTH].rstrip("-") or "job"


def new_job_id(name: str, now: datetime, rng: random.Random) -> str:
    """`<UTC yyyymmdd-HHMMSS>-<slug of name>-<4 hex>`: sortable by time, unique enough, safe.

    A naive `now` is taken to be UTC already.
    """
    utc = now.astimezone(UTC) if now.tzinfo is not None else now
    return f"{utc:%Y%m%d-%H%M%S}-{slugify(name)}-{rng.getrandbits(16):04x}"


@attrs.frozen
class JobFolder:
    """One job's output folder, made by `create`.

    Attributes:
        path: The folder, `<out>/<job id>`.
    """

    path: Path

    @property
    def job_id(self) -> str:
        return self.path.name

    @classmethod
    def create(cls, out_dir: Path, job_id: str) -> JobFolder:
        """Make `<out_dir>/<job_id>`, which must not exist yet (`FileExistsError` if it does)."""
        if job_id in ("", ".", "..") or Path(job_id).name != job_id or "\\" in job_id:
            raise ValueError(f"a job id is one folder name, got {job_id!r}")
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / job_id
        path.mkdir()
        return cls(path)

    def stage_dir(self, stage_index: int, stage_type: str) -> Path:
        """The folder of stage `stage_index` (0-based), `01-txt2img`; made when first asked for."""
        path = self.path / f"{stage_index + 1:02d}-{stage_type}"
        path.mkdir(exist_ok=True)
        return path

    def write_image(
        self,
        stage_index: int,
        stage_type: str,
        number: int,
        png: bytes,
        *,
        provenance: Mapping[str, Any],
        parameters_fallback: str | None = None,
    ) -> Path:
        """Write image `number` (1-based: `001.png`) of a stage, with sdjobs' provenance added.

        `provenance` (the seed, at least) goes into the `sdjobs` text chunk with
        the job id and stage.  `parameters_fallback` is the source image's
        infotext, written as `parameters` when the server's PNG has none (an
        extras upscale), so every image keeps its prompt and seed.  Never
        overwrites a file.
        """
        if number < 1:
            raise ValueError(f"image numbers start at 1, got {number}")
        texts = {}
        if parameters_fallback is not None and read_parameters(png) is None:
            texts["parameters"] = parameters_fallback
        record = {"job_id": self.job_id, "stage": stage_type, "stage_index": stage_index, **provenance}
        texts[PROVENANCE_KEY] = json.dumps(record, sort_keys=True)
        path = self.stage_dir(stage_index, stage_type) / f"{number:03d}.png"
        with path.open("xb") as file:
            file.write(with_text_chunks(png, texts))
        return path

    def write_manifest(
        self,
        spec: JobSpec,
        results: Sequence[StageResult],
        *,
        outcome: str,
        error: str | None = None,
    ) -> Path:
        """Write (or replace, atomically) `manifest.json`: the spec, each stage's results, the outcome.

        Written once, when the job ends (a rename costs milliseconds on some
        disks; the images themselves are on disk as soon as each request
        returns).  Image paths are relative to the job folder.
        """
        manifest = {
            "job_id": self.job_id,
            "name": spec.name,
            "seed": spec.seed,
            "outcome": str(outcome),
            "error": error,
            "spec": spec.to_dict(),
            "stages": [self._stage_record(result) for result in results],
        }
        path = self.path / MANIFEST
        scratch = path.with_name(f".{MANIFEST}.tmp")
        # `default=str`: a TOML date passed through to the WebUI is still recorded.
        scratch.write_text(json.dumps(manifest, indent=2, default=str) + "\n", encoding="utf-8")
        os.replace(scratch, path)
        return path

    def _stage_record(self, result: StageResult) -> dict[str, Any]:
        return {
            "stage": result.stage,
            "stage_index": result.stage_index,
            "images": [_relative(image, self.path) for image in result.images],
            "infos": list(result.infos),
            "seeds": list(result.seeds),
            "started_at": result.started_at,
            "elapsed": result.elapsed,
            "partial": result.partial,
        }


def _relative(path: Path, folder: Path) -> str:
    return path.relative_to(folder).as_posix() if path.is_relative_to(folder) else str(path)


# --------------------------------------------------------------------------
# PNG text chunks
# --------------------------------------------------------------------------


def read_text_chunks(png: bytes) -> dict[str, str]:
    """Every text chunk of a PNG (tEXt, zTXt, iTXt), decoded."""
    with Image.open(io.BytesIO(png)) as image:
        return dict(getattr(image, "text", {}))


def read_parameters(png: bytes) -> str | None:
    """The infotext the WebUI wrote into a PNG (`parameters`), if any."""
    return read_text_chunks(png).get("parameters")


def read_provenance(png: bytes) -> dict[str, Any] | None:
    """What sdjobs recorded in a PNG it wrote (job id, stage, seed, ...), if any."""
    text = read_text_chunks(png).get(PROVENANCE_KEY)
    return None if text is None else json.loads(text)


def with_text_chunks(png: bytes, texts: Mapping[str, str]) -> bytes:
    """`png` with text chunks added before its image data, every byte of it kept.

    Text that Latin-1 can hold goes in a tEXt chunk, any other in a UTF-8 iTXt
    chunk, as Pillow (and so the WebUI) writes them.  Raises `ValueError` for
    anything but a PNG.
    """
    if not png.startswith(_PNG_SIGNATURE):
        raise ValueError("not a PNG image (is the server's samples_format set to png?)")
    position = len(_PNG_SIGNATURE)
    while position + 8 <= len(png):
        length, kind = struct.unpack(">I4s", png[position : position + 8])
        if kind in (b"IDAT", b"IEND"):
            break
        position += 12 + length
    else:
        raise ValueError("a PNG without image data")
    added = b"".join(_text_chunk(key, text) for key, text in texts.items())
    return png[:position] + added + png[position:]


def _text_chunk(key: str, text: str) -> bytes:
    try:
        kind, data = b"tEXt", key.encode("latin-1") + b"\0" + text.encode("latin-1")
    except UnicodeEncodeError:
        # keyword, null, no compression (flag, method), empty language and translated keyword.
        kind, data = b"iTXt", key.encode("latin-1") + b"\0\0\0\0\0" + text.encode("utf-8")
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
