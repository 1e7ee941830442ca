"""What a sampling step, a VAE decode and a pause cost, by image size and batch.

The GPU figures are `reference/gpu-costs.md`'s (one H200, fp16); the CPU ones were read off
the recorded traces (2 vCPUs, SD1.5 at 64² and 128²).  Between two measured sizes a cost is
interpolated linearly in pixels; below the smallest it stays at the smallest (small images
are launch- or overhead-bound); above the largest it follows the last segment.  A step costs
its image size's batch-1 cost times the batch factor measured at the profile's base size.
The simulator scales every cost so that the profile's 512×512 single-image step takes
`step_time` seconds.
"""

from __future__ import annotations

import itertools

import attrs

Curve = tuple[tuple[float, float], ...]  # (x, milliseconds), x ascending

_MP = 1024 * 1024  # pixels of a 1024×1024 image
_REFERENCE_PIXELS = 512 * 512

# The SD VAE's decode on the H200, by pixels × batch (the table's 512²×4 row, 62 ms, says a
# batch decodes a little cheaper than one image of as many pixels; not modelled).
_SD_VAE: Curve = ((512 * 512, 23.0), (_MP, 86.0), (1536 * 1536, 206.0), (2048 * 2048, 396.0), (3072 * 3072, 1172.0))


def read(curve: Curve, x: float) -> float:
    """The cost at `x`: held below the first point, linear between and beyond the last two."""
    if x <= curve[0][0] or len(curve) == 1:
        return curve[0][1]
    segments = list(itertools.pairwise(curve))
    (xa, ya), (xb, yb) = next((s for s in segments if x <= s[1][0]), segments[-1])
    return ya + (yb - ya) * (x - xa) / (xb - xa)


@attrs.frozen
class Profile:
    """One machine's costs, in milliseconds.

    Attributes:
        name: What `--profile` calls it.
        summary: One line for `--help`.
        step: Batch-1 sampling step by pixels per image.
        batch: Step cost factor by batch size (1 at batch 1), measured at the base size.
        decode: Decode (and save) after a pass, by pixels × batch.
        moment: Work between passes that shows stale state: text conditioning, a pass change.
    """

    name: str
    summary: str
    step: Curve
    batch: Curve
    decode: Curve
    moment: float

    def step_ms(self, pixels: int, batch: int) -> float:
        return read(self.step, pixels) * read(self.batch, batch)

    def decode_ms(self, pixels: int, batch: int) -> float:
        return read(self.decode, pixels * batch)


PROFILES = {
    profile.name: profile
    for profile in (
        Profile(
            "flat",
            "every step takes --step-time whatever the size; decode as h200-sd15's",
            step=((_REFERENCE_PIXELS, 25.0),),
            batch=((1, 1.0),),
            decode=_SD_VAE,
            moment=25.0 / 4,  # a quarter step, as conditioning took on the recorded server
        ),
        Profile(
            "cpu",
            "the recorded 2-vCPU A1111 (SD1.5): 64² steps ~1.7 s, 128² ~2.4 s, decode 0.3-1.4 s",
            step=((64 * 64, 1700.0), (128 * 128, 2400.0)),
            batch=((1, 1.0), (2, 1.0)),  # batch 2 at 64² cost no more than batch 1
            decode=((64 * 64, 280.0), (2 * 64 * 64, 500.0), (128 * 128, 1400.0)),
            moment=350.0,
        ),
        Profile(
            "h200-sd15",
            "SD1.5 on an H200: 25 ms steps up to 768², 40 ms at 1024², 309 ms at 2048²",
            step=(
                (_REFERENCE_PIXELS, 25.0),
                (512 * 768, 25.0),
                (768 * 768, 28.0),
                (_MP, 40.0),
                (1536 * 1536, 122.0),
                (2048 * 2048, 309.0),
            ),
            batch=((1, 1.0), (2, 1.0), (4, 1.2), (8, 2.0)),
            decode=_SD_VAE,
            moment=10.0,  # an estimate (text encoding on a GPU), not measured
        ),
        Profile(
            "h200-sdxl",
            "SDXL on an H200: 59 ms steps at 1024², 196 ms at 2048², 582 ms at 3072²",
            step=(
                (832 * 1216, 61.0),
                (_MP, 59.0),
                (1536 * 1536, 103.0),
                (2048 * 2048, 196.0),
                (3072 * 3072, 582.0),
            ),
            batch=((1, 1.0), (2, 78 / 59), (4, 149 / 59)),
            decode=_SD_VAE,
            moment=10.0,  # an estimate, as for h200-sd15
        ),
    )
}


@attrs.frozen
class Timing:
    """A profile's costs in simulated seconds: its 512² single-image step takes `step_time`.

    Attributes:
        profile: Where the costs come from.
        step_time: Seconds of the profile's 512×512 batch-1 step.
        first_step_time: Seconds of a job's first step (the warm-up); None: three steps.
    """

    profile: Profile
    step_time: float
    first_step_time: float | None = None

    @property
    def _seconds_per_ms(self) -> float:
        return self.step_time / self.profile.step_ms(_REFERENCE_PIXELS, 1)

    def step(self, size: tuple[int, int], batch: int, *, first: bool = False) -> float:
        """One sampling step; a job's first is the warm-up."""
        if first and self.first_step_time is not None:
            return self.first_step_time
        seconds = self.profile.step_ms(size[0] * size[1], batch) * self._seconds_per_ms
        return 3 * seconds if first else seconds

    def decode(self, size: tuple[int, int], batch: int) -> float:
        """The tail after a pass's last step, while progress shows that step."""
        return self.profile.decode_ms(size[0] * size[1], batch) * self._seconds_per_ms

    @property
    def moment(self) -> float:
        """A stale state's while: conditioning before a pass, a pass change."""
        return self.profile.moment * self._seconds_per_ms
