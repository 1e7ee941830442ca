"""Real PNGs, deterministic from seed and prompt, carrying their infotext like A1111's."""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import random

from PIL import Image, ImageDraw, PngImagePlugin

from .errors import ApiError

_PATTERN_CELLS = 4  # the picture is a smooth blend of a 4x4 grid of seeded colours


def render(seed: int, prompt: str, width: int, height: int) -> Image.Image:
    """The picture "generated" for `seed` and `prompt`: same inputs, same pixels."""
    digest = hashlib.sha256(f"{seed}\0{prompt}".encode()).digest()
    rng = random.Random(digest)
    cells = Image.new("RGB", (_PATTERN_CELLS, _PATTERN_CELLS))
    cells.putdata([tuple(rng.randrange(256) for _ in range(3)) for _ in range(_PATTERN_CELLS**2)])
    return cells.resize((max(width, 1), max(height, 1)), Image.Resampling.BICUBIC)


def blend(init: Image.Image, generated: Image.Image, denoising_strength: float) -> Image.Image:
    """img2img: the init image, resized, moved towards the new picture by the denoising strength."""
    base = init.convert("RGB").resize(generated.size, Image.Resampling.BICUBIC)
    return Image.blend(base, generated, min(max(denoising_strength, 0.0), 1.0))


def repaint_faces(image: Image.Image, faces: int, seed: int) -> Image.Image:
    """ADetailer's inpainting: one seeded ellipse per "detected" face."""
    result = image.copy()
    draw = ImageDraw.Draw(result)
    rng = random.Random(seed)
    width, height = result.size
    for index in range(faces):
        left = width * index // max(faces, 1)
        box = (left, height // 4, left + width // max(faces, 1) - 1, height * 3 // 4)
        draw.ellipse(box, fill=tuple(rng.randrange(256) for _ in range(3)))
    return result


def encode_png(image: Image.Image, text: dict[str, str]) -> str:
    """Base64 PNG (no `data:` prefix) with `text` as tEXt chunks, as `encode_pil_to_base64`."""
    info = PngImagePlugin.PngInfo()
    for key, value in text.items():
        info.add_text(key, value)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def decode_image(encoded: str) -> Image.Image:
    """`decode_base64_to_image`: raw base64 or a `data:` URI; URLs are not fetched here."""
    if encoded.startswith(("http://", "https://")):
        raise ApiError.http(500, "Invalid image url")
    if encoded.startswith("data:image/"):
        encoded = encoded.split(";", 1)[1].split(",", 1)[1]
    try:
        image = Image.open(io.BytesIO(base64.b64decode(encoded)))
        image.load()
    except (OSError, ValueError, binascii.Error, IndexError):
        raise ApiError.http(500, "Invalid encoded image") from None
    return image


def round_down_to_latent(size: int) -> int:
    """Output pixels come from an 8x smaller latent: 65 → 64, 63 → 56."""
    return size // 8 * 8
