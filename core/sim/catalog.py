"""What the recorded server had installed: samplers, upscalers, models, scripts, options.

The lists were taken from the recorded A1111 (`tests/data/traces/meta_*.json`) and are
shipped in `data/catalog.json`, so the simulator works without the test data.  A1111
1.10's differences (samplers split from schedulers, `/sdapi/v1/schedulers`, the
`scheduler` request fields) are laid over them from `data/a1111_1_10.json`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import tomllib
from importlib import resources
from pathlib import Path
from typing import Any

import attrs

VERSION = "1.7.0"  # what the recorded dev checkout (c8a5322d) reported
#: The A1111 versions the simulator plays: the recorded one, and 1.10.
VERSIONS = ("1.7", "1.10")
ADETAILER_SCRIPT = "adetailer"
_SELECTABLE_TXT2IMG = ("prompt matrix", "prompts from file or textbox", "x/y/z plot")


def _load(name: str) -> Any:
    return json.loads(resources.files(__package__).joinpath("data", name).read_text("utf-8"))


def _names(path: Path, data: dict[str, Any], key: str) -> tuple[str, ...] | None:
    value = data.get(key)
    if value is None:
        return None
    if not isinstance(value, list) or not value or not all(isinstance(name, str) and name for name in value):
        raise ValueError(f"{path}: {key}: must be a non-empty list of names")
    return tuple(value)


@attrs.frozen
class CatalogChoice:
    """What one simulator offers instead of the recorded server's lists (`sdjobs sim --catalog FILE`),
    so that several simulators can differ and tests cover routing jobs by what a server has.

    Attributes:
        checkpoints: Checkpoint names ("sdxl.safetensors" or "sdxl"); the first is loaded.
            None keeps the recorded one.
        samplers: Sampler names; None keeps the recorded list.
        upscalers: Upscaler names; None keeps the recorded list.
        adetailer: False plays a server without the ADetailer extension.
    """

    checkpoints: tuple[str, ...] | None = None
    samplers: tuple[str, ...] | None = None
    upscalers: tuple[str, ...] | None = None
    adetailer: bool = True

    @classmethod
    def from_file(cls, path: Path) -> CatalogChoice:
        """Read a TOML catalog file; ValueError names the file and the key that is wrong."""
        try:
            with path.open("rb") as file:
                data = tomllib.load(file)
        except OSError as exc:
            raise ValueError(f"{path}: cannot read: {exc.strerror}") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{path}: not valid TOML: {exc}") from None
        known = ("checkpoints", "samplers", "upscalers", "adetailer")
        for key in data:
            if key not in known:
                raise ValueError(f"{path}: {key}: unknown key; the keys are {', '.join(known)}")
        adetailer = data.get("adetailer", True)
        if not isinstance(adetailer, bool):
            raise ValueError(f"{path}: adetailer: must be true or false")
        return cls(*(_names(path, data, key) for key in known[:3]), adetailer=adetailer)


def _checkpoint(name: str) -> dict[str, Any]:
    """An `/sdapi/v1/sd-models` entry for a checkpoint file name, its hash made from the name."""
    filename = name if "." in name else f"{name}.safetensors"
    sha256 = hashlib.sha256(filename.encode()).hexdigest()
    return {"title": f"{filename} [{sha256[:10]}]", "model_name": filename.rsplit(".", 1)[0], "hash": sha256[:10],
            "sha256": sha256, "filename": f"/srv/webui/models/Stable-diffusion/{filename}", "config": None}  # fmt: skip


def _entries(recorded: list[dict[str, Any]], names: tuple[str, ...], blank: dict[str, Any]) -> list[dict[str, Any]]:
    """The recorded entries of `names`, and `blank` named for a name the recording lacks."""
    known = {entry["name"]: entry for entry in recorded}
    return [known.get(name) or {**blank, "name": name} for name in names]


@attrs.frozen
class Catalog:
    """The read-only lists a client can ask for, and lookups into them."""

    data: dict[str, Any] = attrs.field(repr=False)
    request_fields: dict[str, dict[str, dict[str, Any]]] = attrs.field(repr=False)
    version: str = VERSION
    adetailer: bool = True

    @classmethod
    @functools.cache
    def load(cls, version: str = VERSIONS[0]) -> Catalog:
        """The lists of the A1111 `version` plays (one of `VERSIONS`)."""
        data, fields = _load("catalog.json"), _load("request_fields.json")
        if version == VERSIONS[0]:
            return cls(data, fields)
        overlay = _load("a1111_1_10.json")
        data = {**data, "samplers": overlay["samplers"], "schedulers": overlay["schedulers"]}
        fields = {kind: {**spec, **overlay["request_fields"].get(kind, {})} for kind, spec in fields.items()}
        return cls(data, fields, overlay["version"])

    def chosen(self, choice: CatalogChoice | None) -> Catalog:
        """This catalog with `choice`'s lists in place of the recorded ones."""
        if choice is None:
            return self
        data = dict(self.data)
        if choice.checkpoints is not None:
            data["sd_models"] = [_checkpoint(name) for name in choice.checkpoints]
            data["option_values"] = {**data["option_values"], "sd_model_checkpoint": data["sd_models"][0]["title"]}
        if choice.samplers is not None:
            data["samplers"] = _entries(data["samplers"], choice.samplers, {"aliases": [], "options": {}})
        if choice.upscalers is not None:
            blank = {"model_name": None, "model_path": None, "model_url": None, "scale": 4.0}
            data["upscalers"] = _entries(data["upscalers"], choice.upscalers, blank)
        return attrs.evolve(self, data=data, adetailer=choice.adetailer)

    @property
    def splits_samplers(self) -> bool:
        """Whether samplers and schedulers are apart (1.9+), with `/sdapi/v1/schedulers`."""
        return "schedulers" in self.data

    def __getitem__(self, key: str) -> Any:
        return self.data[key]

    @property
    def model(self) -> dict[str, Any]:
        return self.data["sd_models"][0]

    def sampler_exists(self, name: str) -> bool:
        return any(sampler["name"] == name for sampler in self.data["samplers"])

    def sampler_and_scheduler(self, name: str, scheduler: str | None) -> tuple[str, str | None] | None:
        """`get_sampler_and_scheduler` (1.9+): the sampler and scheduler label a request
        means, an old combined name split ("DPM++ 2M Karras"); None for an unknown sampler.

        An unknown scheduler silently becomes "Automatic", as in A1111.  Before 1.9 a
        name is a sampler or nothing, and the scheduler is None.
        """
        if not self.splits_samplers:
            return (name, None) if self.sampler_exists(name) else None
        labels = {key: entry["label"] for entry in self.data["schedulers"]
                  for key in (entry["name"], entry["label"], *(entry["aliases"] or ()))}  # fmt: skip
        if self.sampler_exists(name):
            return name, labels.get(scheduler or "", "Automatic")
        for label in dict.fromkeys(labels.values()):
            sampler = name.removesuffix(f" {label}")
            if sampler != name and self.sampler_exists(sampler):
                return sampler, label
        return None

    def upscaler_exists(self, name: str) -> bool:
        return any(upscaler["name"] == name for upscaler in self.data["upscalers"])

    def is_latent_upscaler(self, name: str | None) -> bool:
        """A hires upscaler that works on latents (None: A1111's default, "Latent")."""
        return name is None or any(mode["name"] == name for mode in self.data["latent_upscale_modes"])

    def hires_upscaler_exists(self, name: str) -> bool:
        """Hires fix takes latent modes as well as the image upscalers."""
        return self.is_latent_upscaler(name) or self.upscaler_exists(name)

    def checkpoint_exists(self, name: str) -> bool:
        """A1111's `checkpoint_aliases`: title, name, file name or hash."""
        return any(
            name in {model["title"], model["model_name"], model["filename"].rsplit("/", 1)[-1], model["hash"], model["sha256"]}
            for model in self.data["sd_models"]
        )

    def scripts(self, kind: str) -> list[str]:
        """`GET /sdapi/v1/scripts` for `kind`, ADetailer included when installed."""
        return [*self.data["scripts"][kind], *([ADETAILER_SCRIPT] if self.adetailer else [])]

    def is_selectable_script(self, kind: str, name: str) -> bool:
        selectable = [s for s in self.data["scripts"][kind] if s in _SELECTABLE_TXT2IMG]
        if kind == "img2img":
            selectable += ["img2img alternative test", "loopback", "outpainting mk2"]
            selectable += ["poor man's outpainting", "sd upscale"]
        return name.lower() in selectable

    def is_alwayson_script(self, kind: str, name: str) -> bool:
        known = {s.lower() for s in self.scripts(kind)}
        return name.lower() in known and not self.is_selectable_script(kind, name)

    def default_options(self) -> dict[str, Any]:
        """Every option key; values where the recording kept them, else None."""
        options = dict.fromkeys(self.data["option_keys"])
        options.update(self.data["option_values"])
        return options
