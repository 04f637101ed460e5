"""Decoding and encoding, in the worker processes: every image is decoded once, converted to 8-bit RGB,
shrunk to --max-resolution and encoded once (lossless PNG when small, else JPEG)."""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from PIL import Image

from convert.sources import Sample

# Images whose longer side is at most this many pixels are stored losslessly (FFCV raw, PNG in the shards).
RAW_MAX_SIDE = 64
# Transparent pixels are shown over white, as an image viewer or a web page shows them.
BACKGROUND = (255, 255, 255, 255)
# Modes with an alpha channel; other images may have transparency as a palette entry or colour key
# (`transparency` in image.info).
ALPHA_MODES = ("LA", "La", "PA", "RGBA", "RGBa")
# 16-bit integer greyscale (PNG, TIFF): PIL's "I;16*" modes, and "I", which PIL uses for them as well.
# 0..65535 is scaled to 0..255 (value / 257, rounded); PIL's convert("RGB") would clip at 255 instead.
WIDE_INTEGER_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N")
WIDE_INTEGER_MAX = 65535
# Floating point greyscale ("F", e.g. TIFF): 0.0..1.0 is scaled to 0..255; values outside are clipped.


def fit_within(size: tuple[int, int], limit: int) -> tuple[int, int]:
    """`size` scaled down, aspect kept, so that its longer side is at most `limit`."""
    longer = max(size)
    if longer <= limit:
        return size
    return tuple(max(1, round(side * limit / longer)) for side in size)


def open_image(sample: Sample, root: Path | None, max_resolution: int) -> tuple[Image.Image, tuple[int, int]]:
    """The sample as a PIL image, not decoded yet, and the size it is stored at. PIL identifies formats by
    content, so a PNG named .JPEG opens. A JPEG much larger than the target is set to decode at 1/2..1/8
    scale, kept at least twice the target for quality (what PIL's thumbnail() does)."""
    image = Image.fromarray(sample.pixels) if sample.pixels is not None else Image.open(root / sample.name)
    target = fit_within(image.size, max_resolution)
    if target != image.size:
        image.draft(None, (2 * target[0], 2 * target[1]))  # JPEG only; a no-op for other formats
    return image, target


def to_rgb(image: Image.Image) -> Image.Image:
    """Decode `image` into 8-bit RGB, whatever its mode: 16-bit and float greyscale scaled (not clipped),
    transparency composited over white, CMYK, palette, 1-bit and greyscale converted by PIL."""
    if image.mode in WIDE_INTEGER_MODES:
        return image.convert("I").point(lambda v: v * (255 / WIDE_INTEGER_MAX) + 0.5).convert("L").convert("RGB")
    if image.mode == "F":
        return image.point(lambda v: v * 255 + 0.5).convert("L").convert("RGB")
    if image.mode in ALPHA_MODES or "transparency" in image.info:
        return Image.alpha_composite(Image.new("RGBA", image.size, BACKGROUND), image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


def shrink(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """`image` resized to `size` (bicubic), or itself if it has that size already."""
    return image if image.size == size else image.resize(size, Image.Resampling.BICUBIC)


def load_rgb(sample: Sample, root: Path | None, max_resolution: int) -> Image.Image:
    """Decode the sample once into RGB no larger than `max_resolution`. Raises for a corrupt or truncated
    file. (EXIF orientation is ignored, as torchvision's and FFCV's ImageNet loaders do.)"""
    image, target = open_image(sample, root, max_resolution)
    with image:
        rgb = to_rgb(image)  # the full decode: raises here for corrupt data
    return shrink(rgb, target)


def encode(image: Image.Image, jpeg_quality: int) -> tuple[str, bytes]:
    """(extension, bytes): lossless PNG for small images, else JPEG at `jpeg_quality` (4:2:0, as FFCV does)."""
    buffer = io.BytesIO()
    if max(image.size) <= RAW_MAX_SIDE:
        image.save(buffer, "PNG")
        return "png", buffer.getvalue()
    image.save(buffer, "JPEG", quality=jpeg_quality)
    return "jpg", buffer.getvalue()


def convert_sample(sample: Sample, root: Path | None, max_resolution: int, jpeg_quality: int
                   ) -> tuple[str | None, bytes | str]:
    """Worker task: (extension, encoded bytes), or (None, reason) for an image PIL cannot decode."""
    try:
        image = load_rgb(sample, root, max_resolution)
    except Exception as error:  # PIL raises many types for corrupt data: OSError, SyntaxError, ValueError...
        if isinstance(error, OSError) and error.errno is not None:
            raise  # a missing or unreadable file is a problem of the machine, not of the image: stop
        return None, f"{type(error).__name__}: {error}"
    return encode(image, jpeg_quality)


def convert_chunk(samples: list[Sample], **settings: Any) -> list[tuple[str | None, bytes | str]]:
    """Worker task: `convert_sample` over a few samples (fewer round trips for small images)."""
    return [convert_sample(sample, **settings) for sample in samples]
