"""Images as bytes: the format a client asked for, and images already encoded where they were made.

When inference runs in another process (an engine worker, a Ray Serve replica), the image is
encoded there, beside the model, and crosses to the HTTP process as `EncodedImage` bytes: PNG
compression is CPU work that would otherwise hold the HTTP process's GIL. In-process engines
hand back PIL images, encoded in a thread of the HTTP process.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

from PIL import Image

MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
# OpenAI's `output_compression`: 0-100, where 100 (its default) compresses least.
DEFAULT_OUTPUT_COMPRESSION = 100


@dataclass(frozen=True)
class ImageEncoding:
    """How a client wants its images: `format` png|jpeg|webp; `compression` OpenAI's 0-100 (100 least)."""

    format: str = "png"
    compression: int | None = None

    def __post_init__(self) -> None:
        if self.format not in MEDIA_TYPES:
            raise ValueError(f"`output_format` must be one of {sorted(MEDIA_TYPES)} but is {self.format!r}")


@dataclass(frozen=True)
class EncodedImage:
    """An image already encoded as `encoding` says; `size` is (width, height) in pixels."""

    data: bytes
    encoding: ImageEncoding
    size: tuple[int, int]


def encode_image(image: Image.Image, encoding: ImageEncoding) -> bytes:
    """PNG, JPEG or WebP bytes of a PIL image.

    `compression` has OpenAI's meaning, 0-100 with 100 the least compression, so it is the
    encoder's quality; PNG is lossless and ignores it.
    """
    buffer = io.BytesIO()
    if encoding.format == "png":
        image.save(buffer, format="PNG")
    else:
        quality = DEFAULT_OUTPUT_COMPRESSION if encoding.compression is None else encoding.compression
        image.convert("RGB").save(buffer, format=encoding.format.upper(), quality=quality)
    return buffer.getvalue()


def encoded(image: Image.Image, encoding: ImageEncoding) -> EncodedImage:
    """`image` encoded, with its size kept for the response."""
    return EncodedImage(encode_image(image, encoding), encoding, image.size)
