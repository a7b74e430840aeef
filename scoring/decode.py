"""The one decoder: whatever a request carries for an image becomes the BGR uint8 array mmdet
expects (RTMDet's data preprocessor does not swap channels, so RGB in would be wrong colours)."""
from __future__ import annotations

import base64
import binascii
import io
import json
import re
from typing import Any

import numpy as np

from scoring import settings
from scoring.errors import InputError
from scoring.schema import INPUT_COLUMN

_URL = re.compile(r"^https?://", re.IGNORECASE)
_DATA_URI = re.compile(r"^data:[\w/+.-]*(;[\w=.-]+)*;base64,", re.IGNORECASE)
_WHITESPACE = re.compile(rb"\s+")


def decode_image(value, row: int | str | None = None) -> np.ndarray:
    """base64 (optionally a ``data:`` URI), an http(s) URL or raw bytes -> HxWx3 uint8 BGR, EXIF
    orientation applied. Raises InputError naming ``row``."""
    try:
        return image_from_bytes(image_bytes(value))
    except InputError as err:
        raise err.for_row(row) if row is not None else err


def image_bytes(value) -> bytes:
    """The encoded image that ``value`` stands for (fetched, when it is a URL)."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if not isinstance(value, str):
        kind = "nothing" if value is None else type(value).__name__
        raise InputError(f"expected a base64 string, an http(s) URL or bytes, got {kind}")
    text = value.strip()
    if not text:
        raise InputError("empty image string")
    if _URL.match(text):
        from scoring.fetch import fetch_url

        return fetch_url(text)
    data_uri = _DATA_URI.match(text)
    if data_uri:
        text = text[data_uri.end():]
    return _b64decode(text)


def image_value_problem(value: Any) -> str | None:
    """What is wrong with a request's or a table's image value, said in the request's terms
    before anything is decoded: it must be a string (bytes, from a parquet table, too)."""
    if isinstance(value, (str, bytes, bytearray, memoryview)):
        return None
    return f"the {INPUT_COLUMN!r} value must be a base64 string or an http(s) URL, got {preview(value)}"


def preview(value: Any, limit: int = 60) -> str:
    """A short, safe rendering of a request value for an error message."""
    try:
        text = repr(value) if isinstance(value, str) else json.dumps(value)
    except (TypeError, ValueError):  # numpy scalars and the like, from tables
        text = f"{type(value).__name__} {value!r}"
    return text if len(text) <= limit else text[:limit] + "..."


def _b64decode(text: str) -> bytes:
    raw = _WHITESPACE.sub(b"", text.encode("ascii", errors="replace"))
    if b"-" in raw or b"_" in raw:  # the URL-safe alphabet
        raw = raw.replace(b"-", b"+").replace(b"_", b"/")
    raw += b"=" * (-len(raw) % 4)
    try:
        return base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError):
        preview = text[:40] + ("..." if len(text) > 40 else "")
        raise InputError(f"not valid base64 and not an http(s) URL: {preview!r}") from None


def image_from_bytes(data: bytes) -> np.ndarray:
    """Decode with the same call mmdet's LoadImageFromFile makes (mmcv.imfrombytes, OpenCV), so
    our pixels are mmdet's pixels; the size is checked from the header before anything is
    allocated."""
    if not data:
        raise InputError("empty image")
    width, height, fmt = _header(data)
    limit = settings.MAX_IMAGE_PIXELS.value()  # a 12-megapixel photo passes, a bomb does not
    if width * height > limit:
        raise InputError(
            f"image is {width}x{height} = {width * height} pixels, over the limit of "
            f"{limit} ({settings.MAX_IMAGE_PIXELS.env})"
        )
    import mmcv

    try:
        image = mmcv.imfrombytes(data, flag="color", channel_order="bgr", backend="cv2")
    except Exception:  # OpenCV raises cv2.error for some corrupt streams
        image = None
    if image is None:  # a format OpenCV does not read (e.g. GIF): let Pillow try
        image = _decode_with_pillow(data, fmt)
    return image


def _header(data: bytes) -> tuple[int, int, str]:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:  # reads the header only
            return img.width, img.height, img.format or "unknown"
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        raise InputError(f"not an image ({len(data)} bytes in no format we can read)") from None


def _decode_with_pillow(data: bytes, fmt: str) -> np.ndarray:
    from PIL import Image, ImageOps

    try:
        with Image.open(io.BytesIO(data)) as img:
            rgb = ImageOps.exif_transpose(img).convert("RGB")
            return np.ascontiguousarray(np.asarray(rgb)[:, :, ::-1])
    except Exception as err:
        raise InputError(f"corrupt or truncated {fmt} image: {err}") from None
