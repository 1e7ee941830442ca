"""A job's files on disk: `<out>/<folder>/NN-<stage>/NNN.png` and `manifest.json`.

A job's id is random (`random_job_id`), so two jobs never share one; its folder
is named `<UTC yyyymmdd-HHMMSS>-<slug of name>-<short id>` (`folder_name`),
readable and sorted by time, and is created exclusively, so a rerun never
overwrites anything.  A resumed job reopens its folder (`JobFolder.open`).

Every file is written whole or not at all: into a scratch file at the top of the
job folder (`.01-txt2img-001.png.<random>.partial`: a stage folder only ever holds
finished images), then renamed into place; a crash leaves at most a scratch file,
which reopening the folder removes.  An image is flushed to disk
before its rename (it cannot be made again, and the store records it next); the
manifest, which the store can always rebuild, is flushed only when the job ends.
Every PNG keeps the text chunks the server wrote (A1111's `parameters`
infotext) and gains an `sdjobs` chunk: JSON with the job id, stage and seed,
and for an image an interrupt cut short, `cut`: the pass and the last step
seen (its `parameters` still say the steps asked for).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import struct
import tempfile
import unicodedata
import uuid
import zlib
from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import attrs

from sdjobs.die_at import die_at
from sdjobs.spec import JobSpec
from sdjobs.status import JobState, StageResult

MANIFEST = "manifest.json"

#: How a file being written ends its name until it is renamed into place (`.01-txt2img-001.png.k3x9.partial`).
SCRATCH_SUFFIX = ".partial"

#: The PNG text key sdjobs writes its provenance under.
PROVENANCE_KEY = "sdjobs"

#: How much of a job's id its folder name shows.
SHORT_ID_LENGTH = 8

_SLUG_LENGTH = 40
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_STAGE_FOLDER = re.compile(r"(\d{2})-[a-z0-9]+")


def slugify(name: str) -> str:
    """A job name as a safe folder-name part: lowercase ASCII letters, digits and dashes.

    Never empty, never more than 40 characters, never a path separator or dot.
    """
    ascii_name = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode()
    slug = re.sub(r"[^a-z0-9]+", "-", ascii_name.lower()).strip("-")
    return slug[:_SLUG_LENGTH].rstrip("-") or "job"


def random_job_id() -> str:
    """A new job's id: 32 random hex digits (a uuid4), unique by construction, never from the clock."""
    return uuid.uuid4().hex


def folder_name(job_id: str, name: str, created: datetime) -> str:
    """`<UTC yyyymmdd-HHMMSS>-<slug of name>-<short id>`: a job's folder, readable and sorted by time.

    The short id is the start of the random `job_id`.  A naive `created` is
    taken to be UTC already.
    """
    utc = created.astimezone(UTC) if created.tzinfo is not None else created
    return f"{utc:%Y%m%d-%H%M%S}-{slugify(name)}-{job_id[:SHORT_ID_LENGTH]}"


@attrs.frozen
class JobFolder:
    """One job's output folder, made by `create` or reopened by `open`.

    Attributes:
        path: The folder, `<out>/<folder name>`.
        job_id: The job's id, recorded in its images and manifest; by default
            the folder's name.
    """

    path: Path
    job_id: str = attrs.field()

    @job_id.default
    def _folder_name(self) -> str:
        return self.path.name

    @classmethod
    def create(cls, out_dir: Path, job_id: str, *, folder: str | None = None) -> JobFolder:
        """Make `<out_dir>/<folder>` (by default named `job_id`), which must not exist yet.

        Raises `FileExistsError` if it does, so two jobs never share a folder.
        """
        folder = job_id if folder is None else folder
        if folder in ("", ".", "..") or Path(folder).name != folder or "\\" in folder:
            raise ValueError(f"a job's folder is one folder name, got {folder!r}")
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / folder
        path.mkdir()
        return cls(path, job_id)

    @classmethod
    def open(cls, path: Path, job_id: str, *, finished_stages: int) -> JobFolder:
        """Reopen a resumed job's folder, ready to run its stage `finished_stages` (0-based) again.

        What an interrupted attempt left is removed: scratch files, and the
        folders of stages from `finished_stages` on (their images are made
        anew, numbered from 001).  The finished stages' folders are kept as
        they are.  Raises `FileNotFoundError` when the folder is gone.
        """
        if not path.is_dir():
            raise FileNotFoundError(errno.ENOENT, "the job's folder is gone", str(path))
        for scratch in path.glob(f".*{SCRATCH_SUFFIX}"):
            scratch.unlink()
        for child in path.iterdir():
            match = _STAGE_FOLDER.fullmatch(child.name)
            if match and child.is_dir() and int(match[1]) > finished_stages:
                shutil.rmtree(child)
        return cls(path, job_id)

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
        """Write image `number` (1-based: `001.png`) of a stage, whole, with sdjobs' provenance added.

        `provenance` (the seed, at least) goes into the `sdjobs` text chunk with
        the job id and stage.  `parameters_fallback` is the source image's
        infotext, written as `parameters` when the server's PNG has none (an
        extras upscale), so every image keeps its prompt and seed.  Never
        overwrites a file (`FileExistsError`).
        """
        if number < 1:
            raise ValueError(f"image numbers start at 1, got {number}")
        texts = {}
        if parameters_fallback is not None and read_parameters(png) is None:
            texts["parameters"] = parameters_fallback
        record = {"job_id": self.job_id, "stage": stage_type, "stage_index": stage_index, **provenance}
        texts[PROVENANCE_KEY] = json.dumps(record, sort_keys=True)
        path = self.stage_dir(stage_index, stage_type) / f"{number:03d}.png"
        self._write_whole(path, with_text_chunks(png, texts), replace=False, durable=True)
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

        Fit to be rewritten after every stage (`outcome` then says where the job
        is): a reader sees the old manifest or the new one, never half of one.
        Flushed to disk only once the job has ended (`outcome` is not running):
        after a power cut the store still has every stage, and the resumed job
        writes the manifest again.  Image paths are relative to the job folder.
        """
        manifest = {
            "job_id": self.job_id,
            "name": spec.name,
            "seed": spec.seed,
            "outcome": str(outcome),
            "error": error,
            "spec": spec.to_dict(inputs=False),  # the input images stay in the store, not beside the outputs
            "stages": [self._stage_record(result) for result in results],
        }
        # `default=str`: a TOML date passed through to the WebUI is still recorded.  No indent:
        # only then does `json` use its C encoder, and the manifest is rewritten after every stage.
        text = json.dumps(manifest, default=str) + "\n"
        path = self.path / MANIFEST
        self._write_whole(path, text.encode("utf-8"), replace=True, durable=outcome != JobState.RUNNING)
        return path

    def _write_whole(self, path: Path, data: bytes, *, replace: bool, durable: bool) -> None:
        """Put `data` at `path` whole or not at all: a scratch file at the top of the job folder,
        renamed into place; `durable`: flushed to disk before the rename, and the rename after it."""
        name = path.relative_to(self.path).as_posix().replace("/", "-")
        descriptor, scratch = tempfile.mkstemp(dir=self.path, prefix=f".{name}.", suffix=SCRATCH_SUFFIX)
        try:
            with os.fdopen(descriptor, "wb") as file:
                file.write(data)
                if durable:
                    file.flush()
                    os.fsync(file.fileno())
            if not replace and path.exists():
                raise FileExistsError(errno.EEXIST, "will not overwrite", str(path))
            die_at(f"rename-{path.name}")
            os.replace(scratch, path)
        finally:
            Path(scratch).unlink(missing_ok=True)
        if durable:
            _fsync_folder(path.parent)

    def _stage_record(self, result: StageResult) -> dict[str, Any]:
        record = result.to_dict()
        record["images"] = [_relative(image, self.path) for image in result.images]
        if result.cut is not None:
            record["cut"]["images"] = [_relative(Path(image), self.path) for image in result.cut["images"]]
        del record["timing"]  # the server's speed is the queue's history, not the job's record
        return record


def _fsync_folder(path: Path) -> None:
    """Make a rename in `path` durable (POSIX; elsewhere a folder cannot be opened to sync)."""
    if os.name != "posix":
        return
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _relative(path: Path, folder: Path) -> str:
    return path.relative_to(folder).as_posix() if path.is_relative_to(folder) else str(path)


# --------------------------------------------------------------------------
# PNG text chunks
# --------------------------------------------------------------------------


def read_text_chunks(png: bytes) -> dict[str, str]:
    """Every text chunk of a PNG (tEXt, zTXt, iTXt), decoded; none for what is not a PNG.

    Read from the chunks alone: Pillow's `text` decodes the whole image to find
    chunks after the pixels (13 ms for a 1024² image), and every image a stage keeps is read.
    A chunk that cannot be decoded is skipped, as a reader of the infotext would.
    """
    texts = {}
    for kind, data, _ in _chunks(png):
        if kind in (b"tEXt", b"zTXt", b"iTXt"):
            with contextlib.suppress(ValueError, zlib.error):
                key, text = _decode_text(kind, data)
                texts[key] = text
    return texts


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
    position = next((start for kind, _, start in _chunks(png) if kind in (b"IDAT", b"IEND")), None)
    if position is None:
        raise ValueError("a PNG without image data")
    added = b"".join(_text_chunk(key, text) for key, text in texts.items())
    return png[:position] + added + png[position:]


def _chunks(png: bytes) -> Iterator[tuple[bytes, bytes, int]]:
    """Each chunk of a PNG as (type, data, where it starts), up to the end or a truncated chunk."""
    if not png.startswith(_PNG_SIGNATURE):
        return
    position = len(_PNG_SIGNATURE)
    while position + 12 <= len(png):
        length, kind = struct.unpack(">I4s", png[position : position + 8])
        end = position + 12 + length
        if end > len(png):
            return
        yield kind, png[position + 8 : end - 4], position
        position = end


def _decode_text(kind: bytes, data: bytes) -> tuple[str, str]:
    """The keyword and text of a tEXt, zTXt or iTXt chunk (PNG 1.2, 11.3.4)."""
    key, separator, rest = data.partition(b"\0")
    if not separator:
        raise ValueError("a text chunk without a keyword")
    if kind == b"tEXt":
        return key.decode("latin-1"), rest.decode("latin-1")
    if kind == b"zTXt":
        return key.decode("latin-1"), zlib.decompress(rest[1:]).decode("latin-1")
    compressed, rest = rest[:1] == b"\1", rest[2:]  # the flag, then the method
    _language, _, rest = rest.partition(b"\0")
    _translated, _, text = rest.partition(b"\0")
    return key.decode("latin-1"), (zlib.decompress(text) if compressed else text).decode("utf-8")


def _text_chunk(key: str, text: str) -> bytes:
    try:
        kind, data = b"tEXt", key.encode("latin-1") + b"\0" + text.encode("latin-1")
    except UnicodeEncodeError:
        # keyword, null, no compression (flag, method), empty language and translated keyword.
        kind, data = b"iTXt", key.encode("latin-1") + b"\0\0\0\0\0" + text.encode("utf-8")
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
