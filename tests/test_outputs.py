"""A job's folder, images with provenance, and manifest on disk."""

from __future__ import annotations

import errno
import io
import json
import os
import re
import signal
import struct
import time
import zlib
from datetime import UTC, date, datetime, timedelta, timezone
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image, PngImagePlugin
from process_helpers import in_fork

from sdjobs.outputs import (
    MANIFEST,
    SCRATCH_SUFFIX,
    JobFolder,
    folder_name,
    random_job_id,
    read_parameters,
    read_provenance,
    read_text_chunks,
    slugify,
    with_text_chunks,
)
from sdjobs.spec import JobSpec
from sdjobs.status import JobState, StageResult

NOW = datetime(2024, 2, 26, 13, 5, 9, tzinfo=UTC)
INFOTEXT = "a cat\nSteps: 8, Sampler: Euler a, CFG scale: 7.0, Seed: 1234, Size: 64x64"


def png(parameters: str | None = None, **texts: str) -> bytes:
    if parameters is not None:
        texts["parameters"] = parameters
    info = PngImagePlugin.PngInfo()
    for key, text in texts.items():
        info.add_text(key, text)
    buffer = io.BytesIO()
    Image.new("RGB", (16, 8), (200, 100, 50)).save(buffer, "PNG", pnginfo=info)
    return buffer.getvalue()


def pixels(data: bytes) -> bytes:
    with Image.open(io.BytesIO(data)) as image:
        return image.tobytes()


@pytest.fixture
def folder(tmp_path) -> JobFolder:
    return JobFolder.create(tmp_path / "outputs", "20240226-130509-cat-00ff")


# --------------------------------------------------------------------------
# Job ids and folders
# --------------------------------------------------------------------------


@given(name=st.text())
def test_any_name_gives_a_safe_single_folder_name(name):
    folder = folder_name(random_job_id(), name, NOW)
    slug = slugify(name)
    assert re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", slug) and len(slug) <= 40
    assert Path(folder).name == folder and folder.startswith(f"20240226-130509-{slug}-")


def test_a_random_job_id_is_32_hex_digits_and_never_repeats():
    ids = {random_job_id() for _ in range(1000)}
    assert len(ids) == 1000 and all(re.fullmatch(r"[0-9a-f]{32}", job_id) for job_id in ids)


def test_a_folder_name_is_utc_time_slug_and_the_start_of_the_random_id():
    job_id = random_job_id()
    local = NOW.astimezone(timezone(timedelta(hours=9)))
    assert folder_name(job_id, "A cat, at dusk!", local) == f"20240226-130509-a-cat-at-dusk-{job_id[:8]}"


def test_a_job_folder_named_apart_from_its_id_records_the_id(tmp_path):
    job_id = random_job_id()
    folder = JobFolder.create(tmp_path, job_id, folder=folder_name(job_id, "cat", NOW))
    assert folder.path == tmp_path / f"20240226-130509-cat-{job_id[:8]}" and folder.job_id == job_id
    image = folder.write_image(0, "txt2img", 1, png(), provenance={"seed": 1})
    assert read_provenance(image.read_bytes())["job_id"] == job_id
    with pytest.raises(FileExistsError):
        JobFolder.create(tmp_path, random_job_id(), folder=folder.path.name)


def test_a_name_of_only_dots_or_slashes_still_gets_a_slug():
    assert slugify("../..") == slugify("///") == slugify("") == "job"


@pytest.mark.parametrize(
    ("name", "slug"),
    [
        ("--A cat--", "a-cat"),  # no dash at either end
        ("a" * 39 + " b", "a" * 39),  # cut at 40 characters, then no dash left at the end
        ("Ünïcødé cat", "unicde-cat"),  # accents dropped, letters kept
    ],
)
def test_a_slug_has_no_dash_at_either_end_even_once_cut(name, slug):
    assert slugify(name) == slug


def test_a_job_folder_is_made_with_the_folders_above_it(tmp_path):
    job_id = random_job_id()
    folder = JobFolder.create(tmp_path / "not" / "yet", job_id, folder="x")
    assert folder.path == tmp_path / "not" / "yet" / "x" and folder.path.is_dir()


def test_a_job_folder_is_never_reused(tmp_path, folder):
    assert folder.path == tmp_path / "outputs" / "20240226-130509-cat-00ff"
    assert folder.job_id == "20240226-130509-cat-00ff"
    with pytest.raises(FileExistsError):
        JobFolder.create(tmp_path / "outputs", folder.job_id)


@pytest.mark.parametrize("job_id", ["", ".", "..", "../escape", "a/b", "a\\b"])
def test_a_job_id_cannot_leave_the_output_folder(tmp_path, job_id):
    with pytest.raises(ValueError, match="one folder name"):
        JobFolder.create(tmp_path, job_id)
    with pytest.raises(ValueError, match="one folder name"):
        JobFolder.create(tmp_path, "abc", folder=job_id)


def test_stage_folders_are_numbered_from_one(folder):
    assert folder.stage_dir(0, "txt2img") == folder.path / "01-txt2img"
    assert folder.stage_dir(3, "upscale").is_dir()
    assert folder.stage_dir(3, "upscale") == folder.path / "04-upscale"  # asked again: the same folder


def test_a_naive_time_is_taken_as_utc_whatever_the_local_zone(monkeypatch):
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    try:
        naive = datetime(2024, 2, 26, 13, 5, 9)
        assert folder_name("00ff" * 8, "cat", naive) == "20240226-130509-cat-00ff00ff"
        assert folder_name("00ff" * 8, "cat", NOW) == "20240226-130509-cat-00ff00ff"
    finally:
        monkeypatch.undo()
        time.tzset()


def test_a_reopened_folder_keeps_the_finished_stages_and_clears_what_an_interrupted_attempt_left(folder):
    kept = folder.write_image(0, "txt2img", 1, png(INFOTEXT), provenance={"seed": 1})
    folder.write_image(1, "img2img", 1, png(), provenance={"seed": 1})
    folder.write_image(2, "upscale", 1, png(), provenance={"seed": 1})
    (folder.path / f".manifest.json.x1{SCRATCH_SUFFIX}").write_text("half a manifest")
    (folder.path / f".02-img2img-002.png.x2{SCRATCH_SUFFIX}").write_bytes(b"half an image")
    (folder.path / "notes").mkdir()
    reopened = JobFolder.open(folder.path, "the-id", finished_stages=1)
    assert reopened == JobFolder(folder.path, "the-id")
    assert sorted(path.name for path in folder.path.iterdir()) == ["01-txt2img", "notes"]
    assert [path.name for path in kept.parent.iterdir()] == ["001.png"]
    assert kept.read_bytes() and read_parameters(kept.read_bytes()) == INFOTEXT
    again = reopened.write_image(1, "img2img", 1, png(), provenance={"seed": 1})
    assert read_provenance(again.read_bytes())["job_id"] == "the-id"


def test_a_job_folder_that_is_gone_cannot_be_reopened(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        JobFolder.open(tmp_path / "nowhere", "x", finished_stages=0)
    assert (error.value.errno, error.value.strerror, error.value.filename) == (
        errno.ENOENT, "the job's folder is gone", str(tmp_path / "nowhere")
    )


# --------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------


def test_an_image_keeps_its_infotext_and_pixels_and_gains_provenance(folder):
    source = png(INFOTEXT, extra="kept")
    path = folder.write_image(1, "img2img", 2, source, provenance={"seed": 1234})
    assert path == folder.path / "02-img2img" / "002.png"
    written = path.read_bytes()
    assert read_parameters(written) == INFOTEXT
    assert read_text_chunks(written)["extra"] == "kept"
    assert read_provenance(written) == {"job_id": folder.job_id, "stage": "img2img", "stage_index": 1, "seed": 1234}
    assert pixels(written) == pixels(source)


def test_an_extras_image_without_infotext_gets_its_sources(folder):
    path = folder.write_image(3, "upscale", 1, png(), provenance={"seed": 7}, parameters_fallback=INFOTEXT)
    assert read_parameters(path.read_bytes()) == INFOTEXT


def test_the_fallback_never_replaces_the_servers_own_infotext(folder):
    path = folder.write_image(3, "upscale", 1, png("server's own"), provenance={}, parameters_fallback=INFOTEXT)
    assert read_parameters(path.read_bytes()) == "server's own"


def test_text_beyond_latin1_survives(folder):
    prompt = "灯台, 夕暮れ — ölmalerei"
    path = folder.write_image(0, "txt2img", 1, png(), provenance={"prompt": prompt}, parameters_fallback=prompt)
    assert read_parameters(path.read_bytes()) == prompt
    assert read_provenance(path.read_bytes())["prompt"] == prompt


def test_an_image_is_never_overwritten_and_a_refused_write_leaves_no_scratch(folder):
    first = folder.write_image(0, "txt2img", 1, png("first"), provenance={})
    with pytest.raises(FileExistsError) as error:
        folder.write_image(0, "txt2img", 1, png("second"), provenance={})
    assert (error.value.errno, error.value.strerror, error.value.filename) == (errno.EEXIST, "will not overwrite", str(first))
    assert read_parameters(first.read_bytes()) == "first"
    assert sorted(path.name for path in folder.path.iterdir()) == ["01-txt2img"]


def test_writes_leave_only_the_files_written(folder):
    spec = JobSpec.from_mapping({"name": "cat", "seed": 1, "stages": [{"type": "txt2img"}]})
    folder.write_image(0, "txt2img", 1, png(), provenance={})
    folder.write_manifest(spec, [], outcome="running")
    assert sorted(str(path.relative_to(folder.path)) for path in folder.path.rglob("*")) == [
        "01-txt2img", "01-txt2img/001.png", MANIFEST
    ]  # fmt: skip


def test_image_numbers_start_at_one(folder):
    with pytest.raises(ValueError, match="start at 1"):
        folder.write_image(0, "txt2img", 0, png(), provenance={})


def test_only_png_images_are_accepted():
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, "JPEG")
    with pytest.raises(ValueError, match=r"^not a PNG image \(is the server's samples_format set to png\?\)$"):
        with_text_chunks(buffer.getvalue(), {"a": "b"})
    assert read_text_chunks(buffer.getvalue()) == {}  # nor does a JPEG carry text chunks to read


def chunks(data: bytes) -> list[str]:
    """The chunk types of a PNG, in order."""
    position, kinds = 8, []
    while position < len(data):
        length = int.from_bytes(data[position : position + 4], "big")
        kinds.append(data[position + 4 : position + 8].decode("ascii"))
        position += 12 + length
    return kinds


def test_text_chunks_go_after_the_header_and_before_the_image_data():
    source = png()
    assert chunks(with_text_chunks(source, {"a": "b", "c": "ü ☃"})) == ["IHDR", "tEXt", "iTXt", "IDAT", "IEND"]
    assert chunks(source) == ["IHDR", "IDAT", "IEND"]


def test_a_png_cut_short_before_its_image_data_is_refused():
    source = png()
    data_at = source.index(b"IDAT") - 4
    for cut in (source[:data_at], source[: data_at + 7], source[: data_at + 8]):  # no whole image data chunk
        with pytest.raises(ValueError, match="^a PNG without image data$"):
            with_text_chunks(cut, {"a": "b"})


def test_an_image_without_text_reads_as_having_none():
    assert read_parameters(png()) is None
    assert read_provenance(png()) is None


_keys = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=20)


@given(texts=st.lists(st.tuples(_keys, st.text(max_size=60), st.sampled_from(["tEXt", "zTXt", "iTXt", "zipped iTXt"])),
                      max_size=4, unique_by=lambda item: item[0]))  # fmt: skip
def test_text_chunks_read_as_pillow_reads_them(texts):
    """Read from the chunks alone, every kind of text chunk Pillow writes reads back as Pillow reads it."""
    info = PngImagePlugin.PngInfo()
    for key, text, kind in texts:
        if kind in ("tEXt", "zTXt") and text.isascii():
            info.add_text(key, text, zip=kind == "zTXt")
        else:
            info.add_itxt(key, text, zip=kind == "zipped iTXt")
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buffer, "PNG", pnginfo=info)
    with Image.open(io.BytesIO(buffer.getvalue())) as image:
        assert read_text_chunks(buffer.getvalue()) == dict(image.text) == {key: text for key, text, _ in texts}


def test_each_kind_of_text_chunk_reads_back():
    """One of each kind, beyond ASCII (the property test above meets them all only in longer runs)."""
    info = PngImagePlugin.PngInfo()
    info.add_text("plain", "café")
    info.add_text("zipped", "café au lait", zip=True)
    info.add_itxt("international", "☃ snow")
    info.add_itxt("zipped international", "☃ snow, zipped", zip=True)
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buffer, "PNG", pnginfo=info)
    assert chunks(buffer.getvalue()) == ["IHDR", "tEXt", "zTXt", "iTXt", "iTXt", "IDAT", "IEND"]
    assert read_text_chunks(buffer.getvalue()) == {
        "plain": "café", "zipped": "café au lait", "international": "☃ snow", "zipped international": "☃ snow, zipped",
    }


def test_text_after_the_pixels_is_read_too():
    source = png("before")
    end = source.rindex(b"IEND") - 4  # IEND's length field
    after = with_text_chunks(b"\x89PNG\r\n\x1a\n" + source[end:], {"late": "after the pixels"})[8:-12]
    assert read_text_chunks(source[:end] + after + source[end:]) == {"parameters": "before", "late": "after the pixels"}


def test_what_is_not_a_whole_png_reads_as_having_the_text_before_it_breaks():
    jpeg = io.BytesIO()
    Image.new("RGB", (8, 8)).save(jpeg, "JPEG")
    assert read_parameters(jpeg.getvalue()) is None
    whole = png(INFOTEXT)
    assert read_parameters(whole[: whole.index(b"IDAT") + 10]) == INFOTEXT  # cut in the pixels
    assert read_parameters(whole[: whole.index(b"parameters") + 5]) is None  # cut in the text chunk


# --------------------------------------------------------------------------
# The manifest
# --------------------------------------------------------------------------


def test_the_manifest_records_spec_stages_and_outcome(folder):
    spec = JobSpec.from_mapping(
        {"name": "cat", "seed": 1234, "stages": [{"type": "txt2img"}, {"type": "upscale", "upscaler": "Lanczos"}]}
    )
    image = folder.write_image(0, "txt2img", 1, png(INFOTEXT), provenance={"seed": 1234})
    cut_image = folder.write_image(1, "upscale", 1, png(INFOTEXT), provenance={"seed": 1234})
    cut = {"pass": "main", "face": None, "step": 3, "steps": 10}
    results = [
        StageResult("txt2img", 0, (image,), ({"seed": 1234, "all_seeds": [1234]},), (1234,), 100.0, 2.5, server="desk"),
        StageResult("upscale", 1, (cut_image,), (), (), 102.5, 0.1, partial=True, cut={**cut, "images": [str(cut_image)]}),
    ]
    path = folder.write_manifest(spec, results, outcome=JobState.CANCELLED, error=None)
    manifest = json.loads(path.read_text())
    assert manifest["job_id"] == folder.job_id
    assert (manifest["name"], manifest["seed"], manifest["outcome"], manifest["error"]) == ("cat", 1234, "cancelled", None)
    assert manifest["spec"] == json.loads(json.dumps(spec.to_dict(inputs=False)))
    assert manifest["stages"] == [
        {
            "stage": "txt2img", "stage_index": 0, "images": ["01-txt2img/001.png"],
            "infos": [{"seed": 1234, "all_seeds": [1234]}], "seeds": [1234],
            "started_at": 100.0, "elapsed": 2.5, "partial": False, "cut": None, "server": "desk",
        },
        {
            "stage": "upscale", "stage_index": 1, "images": ["02-upscale/001.png"], "infos": [], "seeds": [],
            "started_at": 102.5, "elapsed": 0.1, "partial": True, "cut": {**cut, "images": ["02-upscale/001.png"]},
            "server": None,
        },
    ]  # fmt: skip


def test_the_manifest_records_dates_as_text_and_images_outside_the_folder_by_their_path(folder, tmp_path):
    spec = JobSpec.from_mapping(
        {"name": "cat", "seed": 1, "stages": [{"type": "txt2img", "extra": {"when": date(2026, 1, 2)}}]}
    )
    elsewhere = tmp_path / "elsewhere.png"
    results = [StageResult("txt2img", 0, (elsewhere,), (), (1,), 100.0, 1.0)]
    manifest = json.loads(folder.write_manifest(spec, results, outcome=JobState.DONE).read_text())
    assert manifest["spec"]["stages"][0]["extra"] == {"when": "2026-01-02"}
    assert manifest["stages"][0]["images"] == [str(elsewhere)]


def test_the_manifest_is_replaced_whole_and_leaves_no_scratch_file(folder):
    spec = JobSpec.from_mapping({"name": "cat", "seed": 1, "stages": [{"type": "txt2img"}]})
    folder.write_manifest(spec, [], outcome="running")
    folder.write_manifest(spec, [], outcome=JobState.FAILED, error="stage 1 (txt2img): 500 from the server")
    assert sorted(path.name for path in folder.path.iterdir()) == ["manifest.json"]
    manifest = json.loads((folder.path / "manifest.json").read_text())
    assert (manifest["outcome"], manifest["error"]) == ("failed", "stage 1 (txt2img): 500 from the server")


def test_a_manifest_rewrite_killed_at_its_rename_leaves_the_last_one_whole(folder):
    """The kill point tests/test_kill.py kills whole runs at, here in a fork of this process."""
    spec = JobSpec.from_mapping({"name": "cat", "seed": 1, "stages": [{"type": "txt2img"}]})
    folder.write_manifest(spec, [], outcome="running")

    def write_killed_at_the_rename() -> None:
        os.environ["SDJOBS_TEST_DIE_AT"] = "rename-manifest.json"
        folder.write_manifest(spec, [], outcome=JobState.DONE)

    _, status = in_fork(write_killed_at_the_rename)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    assert json.loads((folder.path / "manifest.json").read_text())["outcome"] == "running"


def test_an_image_and_the_last_manifest_reach_the_disk_before_their_names_do(folder, monkeypatch):
    """A power cut cannot be made in a test, so which writes are flushed is watched instead:
    an image (it cannot be made again) and the manifest of an ended job, each written at the
    top of the job folder (a stage folder holds only finished images) and flushed before its
    rename, the rename after; a manifest between stages is not (the store has it all)."""
    flushed = []

    def fsync(descriptor, real=os.fsync):
        path = Path(os.readlink(f"/proc/self/fd/{descriptor}")).relative_to(folder.path)
        flushed.append(re.sub(r"\.[^.]+\.partial$", ".partial", path.as_posix()))
        real(descriptor)

    monkeypatch.setattr(os, "fsync", fsync)
    spec = JobSpec.from_mapping({"name": "cat", "seed": 1, "stages": [{"type": "txt2img"}]})
    folder.write_image(0, "txt2img", 1, png(), provenance={"seed": 1})
    assert flushed == [".01-txt2img-001.png.partial", "01-txt2img"]
    folder.write_manifest(spec, [], outcome="running")
    assert flushed == [".01-txt2img-001.png.partial", "01-txt2img"]
    folder.write_manifest(spec, [], outcome=JobState.DONE)
    assert flushed == [".01-txt2img-001.png.partial", "01-txt2img", ".manifest.json.partial", "."]


def test_a_text_chunk_that_cannot_be_decoded_is_skipped_and_the_others_read():
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    source = png(INFOTEXT)
    end = source.rindex(b"IEND") - 4
    broken = chunk(b"tEXt", b"no keyword separator") + chunk(b"zTXt", b"key\0\0not zlib data")
    broken += chunk(b"iTXt", b"key\0\1\0\0\0not zlib either") + chunk(b"tEXt", b"late\0read")
    assert read_text_chunks(source[:end] + broken + source[end:]) == {"parameters": INFOTEXT, "late": "read"}
