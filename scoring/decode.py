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
from scoring.truncation import ENDS_EARLY, ends_early, signature

_URL = re.compile(r"^https?://", re.IGNORECASE)
_DATA_URI = re.compile(r"^data:[\w/+.-]*(;[\w=.-]+)*;base64,", re.IGNORECASE)
_WHITESPACE = b" \t\n\r\f\v"  # what rb"\s" matches: bytes.translate drops them in one pass, no regex
_BOMB_PIXELS = re.compile(r"\((\d+) pixels\)")  # in the message of Pillow's DecompressionBombError


def decode_image(value, row: int | str | None = None, budget=None) -> np.ndarray:
    """base64 (optionally a ``data:`` URI), an http(s) URL or raw bytes -> HxWx3 uint8 BGR, EXIF
    orientation applied. Raises InputError naming ``row``. ``budget``: the time the request's
    URLs may still take together (scoring.fetch.FetchBudget), when there is one."""
    try:
        return image_from_bytes(image_bytes(value, budget))
    except InputError as err:
        raise err.for_row(row) if row is not None else err


def image_bytes(value, budget=None) -> bytes:
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

        return fetch_url(text, budget)
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
    raw = text.encode("ascii", errors="replace").translate(None, _WHITESPACE)
    if b"-" in raw or b"_" in raw:  # the URL-safe alphabet
        raw = raw.replace(b"-", b"+").replace(b"_", b"/")
    raw += b"=" * (-len(raw) % 4)
    try:
        return base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError):
        preview = text[:40] + ("..." if len(text) > 40 else "")
        raise InputError(f"not valid base64 and not an http(s) URL: {preview!r}") from None


# The formats we accept, by Pillow's name for them, and who decodes each. Only these are even
# identified (Pillow's open() is told so), so no other plugin parses untrusted bytes, and each
# one's size is read from its header before any pixel is allocated. (Pillow opens the
# multi-picture JPEGs many phones write as JPEG and names them MPO: OpenCV decodes them.)
OPENCV_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "TIFF")
PILLOW_FORMATS = ("GIF",)  # OpenCV 4.10 reads no GIF: Pillow decodes its first frame
ACCEPTED_FORMATS = OPENCV_FORMATS + PILLOW_FORMATS


def image_from_bytes(data: bytes) -> np.ndarray:
    """Decode as mmdet's LoadImageFromFile does (mmcv.imfrombytes with the cv2 backend is
    ``cv2.imdecode(..., IMREAD_COLOR)``: BGR, EXIF orientation applied), so our pixels are
    mmdet's pixels, without needing mmcv; the format and size are checked from the header first,
    and data cut short is refused before decoding (scoring/truncation.py: OpenCV would return
    a cut baseline JPEG's missing rows as whatever memory held), so every pixel comes from
    ``data`` and the same bytes always give the same array."""
    if not data:
        raise InputError("empty image")
    width, height, fmt, cut = _header(data)
    limit = settings.MAX_IMAGE_PIXELS.value()  # a 12-megapixel photo passes, a bomb does not
    if width * height > limit:
        raise InputError(
            f"image is {width}x{height} = {width * height} pixels, over the limit of "
            f"{limit} ({settings.MAX_IMAGE_PIXELS.source()})"
        )
    if cut:
        raise InputError(f"{ENDS_EARLY}: {cut}; send the whole file")
    if fmt in PILLOW_FORMATS:
        return _decode_with_pillow(data, fmt)
    import cv2

    try:
        image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    except cv2.error:
        image = None
    if image is None or image.ndim != 3 or image.shape[2] != 3:
        raise InputError(f"corrupt or truncated {fmt} image ({len(data)} bytes)")
    if sorted(image.shape[:2]) != sorted((height, width)):  # EXIF orientation may swap them
        raise InputError(f"{fmt} image decodes to {image.shape[1]}x{image.shape[0]} but its header "
                         f"says {width}x{height}")
    return image


def _header(data: bytes) -> tuple[int, int, str, str | None]:
    """Width, height, Pillow's format name and, when the data stops before its own structure
    says the picture does, where (``ends_early``), all from the header and the container."""
    from PIL import Image, UnidentifiedImageError
    # Registers exactly the accepted formats' plugins (Pillow loads the rest only on demand).
    from PIL import (BmpImagePlugin, GifImagePlugin, JpegImagePlugin, PngImagePlugin,  # noqa: F401
                     TiffImagePlugin, WebPImagePlugin)

    try:
        img = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)  # the header only
    except Image.DecompressionBombError as err:
        # Pillow's own bomb check (over twice its MAX_IMAGE_PIXELS) fires inside open(), before
        # ours: a 100000x100000 PNG header is an image over the limit, not "not an image".
        declared = _BOMB_PIXELS.search(str(err))
        size = f"{declared.group(1)} pixels" if declared else "larger than Pillow opens"
        raise InputError(f"image is {size}, over the limit of {settings.MAX_IMAGE_PIXELS.value()} "
                         f"({settings.MAX_IMAGE_PIXELS.source()})") from None
    except (UnidentifiedImageError, OSError, ValueError):
        signed = signature(data)
        if signed:  # cut (or damaged) in the header: Pillow could not read what the signature promises
            cut = ends_early(data, signed)
            if cut:
                raise InputError(f"{ENDS_EARLY}: {cut}; send the whole file") from None
            raise InputError(f"{ENDS_EARLY} or its header is damaged: {len(data)} bytes that start "
                             f"as a {signed} file but hold no readable {signed} header") from None
        raise InputError(f"not an image ({len(data)} bytes in no format we can read; we accept "
                         f"{', '.join(ACCEPTED_FORMATS)})") from None
    with img:
        width, height, fmt = img.width, img.height, img.format or "unknown"
        if width < 1 or height < 1:
            raise InputError(f"{fmt} image has no pixels ({width}x{height})")
        return width, height, fmt, ends_early(data, fmt, img)


def _decode_with_pillow(data: bytes, fmt: str) -> np.ndarray:
    from PIL import Image, ImageOps

    try:
        with Image.open(io.BytesIO(data), formats=PILLOW_FORMATS) as img:  # the first frame
            rgb = ImageOps.exif_transpose(img).convert("RGB")
            return np.ascontiguousarray(np.asarray(rgb)[:, :, ::-1])
    except Exception as err:
        if "truncated" in str(err):  # Pillow's "image file is truncated (N bytes not processed)"
            raise InputError(f"{ENDS_EARLY}: the {fmt} decoder ran out of data ({err}); "
                             "send the whole file") from None
        raise InputError(f"corrupt or truncated {fmt} image: {err}") from None
