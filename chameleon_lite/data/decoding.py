"""Validating decoders for raw webdataset members: images, UTF-8 text, JSON objects.

Everything that can be wrong with one member of a real-world shard is named here: ``SKIP_REASONS`` (the sample
cannot be used) and ``REPAIR_REASONS`` (it was fixed and kept). Decoders raise :class:`SkipSample` with one of those
reasons; the readers in :mod:`chameleon_lite.data.readers` catch, count and log them.

- **Images:** decoded with PIL and returned as RGB. Repairs: CMYK/greyscale/palette/other modes convert to
  RGB; 16-bit greyscale (``I;16``) is scaled by 1/257 (PIL's own ``convert`` would clip it to 255);
  anything with alpha (RGBA, LA, PA, palette or RGB/L with a transparency key) is **composited on white**
  (``image_preprocessing.to_rgb``, the same conversion prompt images get at inference);
  an EXIF orientation tag is applied. Limits (``ImageLimits``) are checked on the header before any pixel
  is decoded: more than ``max_pixels`` pixels is rejected (``image_too_large``; this is the decompression-bomb
  guard, and PIL's global ``MAX_IMAGE_PIXELS`` warning is silenced because this limit is the one that
  applies; PIL still refuses beyond twice its own limit and that is counted the same), long side / short
  side above ``max_aspect_ratio`` is rejected (``extreme_aspect_ratio``). Images are never downscaled here:
  resizing is the job of ``image_transform``.
"""

from __future__ import annotations

import io
import json
import struct
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from PIL import Image, ImageOps, UnidentifiedImageError

from chameleon_lite.tokenization.image_preprocessing import MAX_ASPECT_RATIO
from chameleon_lite.tokenization.image_preprocessing import to_rgb as _to_rgb  # the conversion prompts get too

SKIP_REASONS: dict[str, str] = {
    "missing_image": "no image member (pair/QA), or a segment names an image member that is absent",
    "not_an_image": "the image member is not a recognisable image file",
    "corrupt_image": "an image file whose header is recognised but whose data is truncated or damaged",
    "empty_image": "a zero-byte image member, or an image with a zero width or height",
    "image_too_large": "more pixels than ImageLimits.max_pixels (decompression-bomb guard)",
    "extreme_aspect_ratio": "long side / short side above ImageLimits.max_aspect_ratio",
    "missing_text": "pair without a caption, or with an empty/whitespace-only one (when text is required)",
    "invalid_utf8": "caption bytes are not valid UTF-8 (when text is required)",
    "missing_json": "QA or interleaved sample without its .json member",
    "invalid_json": "QA or interleaved .json that does not parse as a JSON object",
    "missing_field": "QA json without a non-empty string 'question' or 'answer'",
    "invalid_segments": "interleaved json 'segments' is not a non-empty list of {'text': str} / {'image': str}",
    "tar_error": "a shard could not be opened or read (truncated/corrupt tar): counted once per shard per pass; "
    "samples in the unreadable rest of that shard cannot be counted one by one",
}
REPAIR_REASONS: dict[str, str] = {
    "cmyk_to_rgb": "CMYK image converted to RGB",
    "grey_to_rgb": "greyscale (L) or bilevel (1) image converted to RGB",
    "high_bit_depth_to_rgb": "16/32-bit greyscale (I;16, I, F) scaled to 8 bits and converted to RGB",
    "palette_to_rgb": "palette (P) image converted to RGB",
    "alpha_on_white": "image with alpha (RGBA, LA, PA, transparency key) composited on a white background",
    "other_mode_to_rgb": "another PIL mode (YCbCr, LAB, HSV, ...) converted to RGB",
    "exif_orientation": "EXIF orientation tag applied (image rotated/flipped upright)",
    "invalid_json": "pair whose metadata .json is unparseable: kept with meta = {}",
    "invalid_utf8": "pair with an invalid UTF-8 caption kept with text = '' (only when require_text=False)",
}


IMAGE_MEMBERS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp")
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_IMAGE_SIGNATURES = (_PNG_SIGNATURE, b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*")


@dataclass(frozen=True)
class ImageLimits:
    """Limits checked on the image header before decoding pixels.

    ``max_pixels`` defaults to 2**25 (~5800 x 5800, ~100 MB as RGB). ``max_aspect_ratio`` is long side over
    short side (default 20: a 20,000 x 500 strip is rejected, a 1920 x 1080 photo is fine).
    """

    max_pixels: int = 2**25
    max_aspect_ratio: float = MAX_ASPECT_RATIO

    def __post_init__(self) -> None:
        if not isinstance(self.max_pixels, int) or self.max_pixels < 1:
            raise ValueError(f"max_pixels must be a positive int, got {self.max_pixels!r}")
        if not self.max_aspect_ratio >= 1.0:
            raise ValueError(f"max_aspect_ratio must be >= 1, got {self.max_aspect_ratio!r}")


class SkipSample(Exception):
    """A raw sample (or image) that cannot be used; ``reason`` is a key of SKIP_REASONS, ``detail`` says more.

    Raised by ``decode_image`` and the decoders; the readers catch it and count it.
    """

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(reason, detail)
        self.reason = reason
        self.detail = detail


def _looks_like_image(data: bytes) -> bool:
    return data.startswith(_IMAGE_SIGNATURES) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP")


def _png_header_has_zero_side(data: bytes) -> bool:
    """PIL refuses to identify a PNG whose IHDR says width or height 0; recognise that case by hand."""
    if not data.startswith(_PNG_SIGNATURE) or len(data) < 24 or data[12:16] != b"IHDR":
        return False
    width, height = struct.unpack(">II", data[16:24])
    return width == 0 or height == 0


def decode_image(data: bytes, limits: ImageLimits = ImageLimits()) -> tuple[Image.Image, list[str]]:
    """Decode image bytes to a PIL RGB image, checking ``limits`` on the header first.

    Returns ``(image, repairs)`` with ``repairs`` a list of REPAIR_REASONS keys applied.
    Raises ``SkipSample`` (reason ``empty_image``, ``not_an_image``, ``corrupt_image``, ``image_too_large`` or
    ``extreme_aspect_ratio``) for an image that cannot be used.
    """
    if len(data) == 0 or _png_header_has_zero_side(data):
        raise SkipSample("empty_image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our max_pixels is the limit
            image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise SkipSample("image_too_large", str(exc)) from None
    except UnidentifiedImageError:
        raise SkipSample("corrupt_image" if _looks_like_image(data) else "not_an_image") from None
    except Exception as exc:  # PIL raises many types (SyntaxError, struct.error, ...) on broken headers
        raise SkipSample("corrupt_image", repr(exc)) from None
    width, height = image.size
    if width == 0 or height == 0:
        raise SkipSample("empty_image")
    if width * height > limits.max_pixels:
        raise SkipSample("image_too_large", f"{width}x{height} > {limits.max_pixels} pixels")
    if max(width, height) / min(width, height) > limits.max_aspect_ratio:
        raise SkipSample("extreme_aspect_ratio", f"{width}x{height}")
    repairs: list[str] = []
    try:
        image.load()
        try:
            orientation = image.getexif().get(0x0112, 1)
        except Exception:  # unreadable EXIF block: keep the pixels, ignore orientation
            orientation = 1
        if orientation in (2, 3, 4, 5, 6, 7, 8):
            image = ImageOps.exif_transpose(image)
            repairs.append("exif_orientation")
        image, repair = _to_rgb(image)
    except Exception as exc:  # truncated data (OSError), zlib/codec errors, ...
        raise SkipSample("corrupt_image", repr(exc)) from None
    if repair is not None:
        repairs.append(repair)
    return image, repairs


def decode_utf8(data: bytes) -> str:
    try:
        return bytes(data).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SkipSample("invalid_utf8", str(exc)) from None


def decode_json_object(data: bytes) -> dict[str, Any]:
    try:
        value = json.loads(bytes(data).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SkipSample("invalid_json", str(exc)) from None
    if not isinstance(value, dict):
        raise SkipSample("invalid_json", f"top level is {type(value).__name__}, not an object")
    return value


def image_member(raw: Mapping[str, Any]) -> bytes:
    for ext in IMAGE_MEMBERS:
        if ext in raw:
            return raw[ext]
    raise SkipSample("missing_image")
