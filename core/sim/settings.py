"""How the simulated WebUI behaves: its speed, its mode, and the faults it plays."""

from __future__ import annotations

import attrs

from .catalog import VERSIONS, CatalogChoice
from .profiles import PROFILES, Timing


def _non_negative(instance: object, attribute: attrs.Attribute, value: float | None) -> None:
    if value is not None and value < 0:
        raise ValueError(f"{attribute.name} must not be negative, got {value!r}")


def _rate(instance: object, attribute: attrs.Attribute, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{attribute.name} must be within [0, 1], got {value!r}")


def _credentials(instance: object, attribute: attrs.Attribute, value: str | None) -> None:
    if value is None:
        return
    for pair in value.split(","):
        user, sep, password = pair.partition(":")
        if not (sep and user and password):
            raise ValueError(f"{attribute.name} must be USER:PASS[,USER:PASS...]")


def _faces(value: int | str | tuple[int, int]) -> tuple[int, int]:
    """`N`, `"A-B"` or `(A, B)` as the inclusive range of faces found per image."""
    if isinstance(value, str):
        low, sep, high = value.partition("-")
        try:
            value = (int(low), int(high if sep else low))
        except ValueError:
            raise ValueError(f"faces must be N or A-B, got {value!r}") from None
    elif isinstance(value, int):
        value = (value, value)
    low, high = value
    if not 0 <= low <= high:
        raise ValueError(f"faces must be N or A-B with 0 <= A <= B, got {low}-{high}")
    return low, high


def _profile(instance: object, attribute: attrs.Attribute, value: str) -> None:
    if value not in PROFILES:
        raise ValueError(f"profile must be one of {', '.join(PROFILES)}, got {value!r}")


@attrs.frozen
class SimSettings:
    """Settings of one simulated WebUI.

    Attributes:
        step_time: Seconds per sampling step of a 512×512 image (the profile's other
            costs scale with it).
        first_step_time: Seconds for the first step of a job (the model warming up);
            `None` means three steps' worth, as on the recorded server.
        profile: Whose costs steps, decodes and pauses follow (`profiles.PROFILES`):
            "flat" (every step `step_time`), "cpu", "h200-sd15" or "h200-sdxl".
        stepping: When true, time does not pass by itself: each sampling step waits
            for `SimulatedWebUI.release()`, so a test decides when every step happens.
        faces: Faces ADetailer "detects" per detection, as `(least, most)`: a count is
            drawn for each (seeded by `fault_seed`); an int N or "A-B" is accepted.
        api_auth: `USER:PASS` (comma-separated for several) protecting `/sdapi/v1/*`,
            like `--api-auth`; never shown in a repr.
        ui: False plays `--nowebui`: no `/internal/*` routes.
        progress_error_rate: Share of `/sdapi/v1/progress` calls answered with 500.
        progress_latency: Seconds `/sdapi/v1/progress` waits before answering.
        progress_stuck: `/sdapi/v1/progress` keeps reading 0.01 with `sampling_step` 0
            while a job runs (Forge issue #1814).
        drop_connection_at_step: Once a job has run this many sampling steps, its
            POST's connection is closed without an answer.
        generation_error: Generation POSTs fail with 500 and this message.
        hang: Start hung: connections are accepted and no route answers until
            `SimulatedWebUI.hang(False)` or `stop()`.
        stop_after_steps: After this many sampling steps overall the process exits at
            once, as a crashed WebUI does: only for a simulator in a process of its own.
        fault_seed: Seed of the random choices: `progress_error_rate`, `faces`.
        version: Which A1111 to play (`catalog.VERSIONS`): "1.7", the recorded
            server, or "1.10": samplers split from schedulers, `/sdapi/v1/schedulers`,
            400 for an unknown sampler.
        catalog: The checkpoints, samplers and upscalers offered, and whether
            ADetailer is installed; None offers the recorded server's.
    """

    step_time: float = attrs.field(default=0.15, validator=_non_negative)
    first_step_time: float | None = attrs.field(default=None, validator=_non_negative)
    stepping: bool = False
    profile: str = attrs.field(default="flat", validator=_profile)
    faces: tuple[int, int] = attrs.field(default=(1, 1), converter=_faces)
    api_auth: str | None = attrs.field(default=None, repr=False, validator=_credentials)
    ui: bool = True
    progress_error_rate: float = attrs.field(default=0.0, validator=_rate)
    progress_latency: float = attrs.field(default=0.0, validator=_non_negative)
    progress_stuck: bool = False
    drop_connection_at_step: int | None = attrs.field(
        default=None, validator=attrs.validators.optional(attrs.validators.ge(1))
    )
    generation_error: str | None = None
    hang: bool = False
    stop_after_steps: int | None = attrs.field(
        default=None, validator=attrs.validators.optional(attrs.validators.ge(1))
    )
    fault_seed: int = 0
    version: str = attrs.field(default=VERSIONS[0], validator=attrs.validators.in_(VERSIONS))
    catalog: CatalogChoice | None = None

    @property
    def timing(self) -> Timing:
        """What steps, decodes and pauses cost in seconds."""
        return Timing(PROFILES[self.profile], self.step_time, self.first_step_time)

    @property
    def credentials(self) -> frozenset[tuple[str, str]]:
        """The accepted (user, password) pairs; empty when the API is open."""
        if self.api_auth is None:
            return frozenset()
        return frozenset(tuple(pair.split(":", 1)) for pair in self.api_auth.split(","))  # type: ignore[misc]
