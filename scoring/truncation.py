"""Does an image's data reach the end its own structure promises? Part of the one decoder
(scoring/decode.py), asked before any pixel is decoded, and by the training data's validation.

Why: OpenCV's ``imdecode`` on a baseline JPEG cut short allocates the whole picture, decodes
the rows the data reaches and returns the rest as they were in memory ("Premature end of JPEG
file" is only a warning of libjpeg's, and its data source suspends instead of filling): the
same bytes gave a different array each time, and what an earlier request left in that memory
could shape this caller's masks. We refuse such data rather than complete it: a caller whose
upload stopped at 60 % is better served by a clear 400 than by a guess. The other formats are
refused by their decoders when they are cut short (libpng, libwebp, libtiff, OpenCV's BMP
reader, Pillow's GIF reader raise); checking their containers here too gives every format the
same message, and is cheap: no pixel is decoded, only markers, chunks and offsets are read.

Each check says where the data stops (a sentence for the error message) or None when the data
holds everything its structure points at. What decodes from complete but damaged data (a bit
flipped inside a JPEG's scan: libjpeg fills the damaged blocks with a fixed gray) is the same
every time and is left to the decoders.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

ENDS_EARLY = "the image data ends early"  # the start of every such error message

# Each accepted format's signature, by Pillow's name for it: a file that starts with one but
# whose header Pillow cannot read was cut (or damaged) inside its header.
SIGNATURES = {
    "JPEG": (b"\xff\xd8\xff",),
    "PNG": (b"\x89PNG\r\n\x1a\n",),
    "GIF": (b"GIF87a", b"GIF89a"),
    "BMP": (b"BM",),
    "TIFF": (b"II*\x00", b"MM\x00*"),
}


def signature(data: bytes) -> str | None:
    """The accepted format whose signature ``data`` starts with (None: none)."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if data[:4] == b"RIFF" and len(data) < 12:
        return None  # too little to tell a WEBP from another RIFF file
    for fmt, starts in SIGNATURES.items():
        if any(data.startswith(start) for start in starts):
            return fmt
    return None


def ends_early(data: bytes, fmt: str, image: Any = None) -> str | None:
    """Where ``data`` (an image Pillow identified as ``fmt``) stops before what its structure
    says it holds, or None. ``image``: Pillow's open image of it, when there is one (a TIFF's
    strip offsets are read from it)."""
    check = _CHECKS.get(fmt)
    return check(data, image) if check else None


# --- JPEG --------------------------------------------------------------------------------------

def _scan_ends(data: bytes) -> np.ndarray:
    """Where a scan's entropy-coded data can end: inside it, 0xFF is followed by 0x00 (a
    stuffed data byte), by a restart marker (0xD0-0xD7) or by more 0xFF fill bytes; any other
    byte after 0xFF makes it the start of the marker that ends the scan, as libjpeg reads it.
    One vectorized pass (a Python loop over every 0xFF of a photo took a fifth of its decode)."""
    view = np.frombuffer(data, np.uint8)
    ff = np.flatnonzero(view[:-1] == 0xFF)
    follow = view[ff + 1]
    return ff[(follow != 0x00) & (follow != 0xFF) & ((follow < 0xD0) | (follow > 0xD7))]
_STANDALONE = {0x01, *range(0xD0, 0xD8), 0xD8}  # TEM, RST0-7, SOI: no length field
_SOS, _EOI = 0xDA, 0xD9


def _jpeg(data: bytes, _image=None) -> str | None:
    """The first picture's markers walked as libjpeg reads them, from SOI to EOI: segment
    lengths followed, each scan's entropy-coded data skipped to the marker that ends it. libjpeg
    reads nothing after that EOI (a multi-picture file's next pictures, padding), so data that
    reaches it gives the decoder every byte it can ask for."""
    size = len(data)
    at = 2  # after SOI; Pillow identified the data by it
    scan_ends = None  # found once, for all the scans of a progressive JPEG
    while True:
        at = data.find(b"\xff", at)  # libjpeg skips any other bytes before a marker
        if at < 0:
            break
        while at < size and data[at] == 0xFF:
            at += 1
        if at >= size:
            break
        marker = data[at]
        at += 1
        if marker == _EOI:
            return None
        if marker == 0x00 or marker in _STANDALONE:  # 0xFF00 outside a scan: skipped as libjpeg does
            continue
        if at + 2 > size:
            break
        length = int.from_bytes(data[at:at + 2], "big")
        if at + length > size:
            return (f"the JPEG's {_jpeg_marker_name(marker)} segment needs {at + length} bytes, "
                    f"{size} arrived")
        at += max(length, 2)
        if marker == _SOS:
            scan_ends = _scan_ends(data) if scan_ends is None else scan_ends
            following = int(np.searchsorted(scan_ends, at))
            if following == len(scan_ends):
                return f"the JPEG stops inside its image data after {size} bytes, with no end-of-image marker"
            at = int(scan_ends[following])
    return f"the JPEG stops after {size} bytes, before its end-of-image marker"


def _jpeg_marker_name(marker: int) -> str:
    names = {0xC4: "DHT", 0xDB: "DQT", 0xDA: "SOS", 0xDD: "DRI", 0xFE: "COM"}
    if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
        return f"SOF{marker - 0xC0}"
    if 0xE0 <= marker <= 0xEF:
        return f"APP{marker - 0xE0}"
    return names.get(marker, f"0xFF{marker:02X}")


# --- PNG ---------------------------------------------------------------------------------------

def _png(data: bytes, _image=None) -> str | None:
    """Every chunk (length, type, data, CRC) whole, up to IEND."""
    size, at = len(data), 8
    while at + 8 <= size:
        length = int.from_bytes(data[at:at + 4], "big")
        kind = data[at + 4:at + 8].decode("latin-1")
        if at + 12 + length > size:
            return f"the PNG's {kind!r} chunk needs {at + 12 + length} bytes, {size} arrived"
        if kind == "IEND":
            return None
        at += 12 + length
    return f"the PNG stops after {size} bytes, before its IEND chunk"


# --- WEBP --------------------------------------------------------------------------------------

def _webp(data: bytes, _image=None) -> str | None:
    """The RIFF container's declared size present, and every chunk within it whole."""
    size = len(data)
    declared = 8 + int.from_bytes(data[4:8], "little")
    if declared > size:
        return f"the WEBP's RIFF header declares {declared} bytes, {size} arrived"
    at = 12
    while at + 8 <= declared:
        kind = data[at:at + 4].decode("latin-1")
        length = int.from_bytes(data[at + 4:at + 8], "little")
        if at + 8 + length > declared:
            return f"the WEBP's {kind!r} chunk needs {at + 8 + length} bytes, {declared} are declared"
        at += 8 + length + (length & 1)  # chunks are padded to an even length
    return None


# --- BMP ---------------------------------------------------------------------------------------

_BI_RGB, _BI_RLE8, _BI_RLE4, _BI_BITFIELDS, _BI_ALPHABITFIELDS = 0, 1, 2, 3, 6


def _bmp(data: bytes, _image=None) -> str | None:
    """The pixel rows (uncompressed: rows padded to 4 bytes; RLE: the size the header states)
    present after the pixel data offset."""
    if len(data) < 30:
        return f"the BMP stops after {len(data)} bytes, inside its header"
    offset = int.from_bytes(data[10:14], "little")
    header = int.from_bytes(data[14:18], "little")
    if header == 12:  # OS/2 1.x: 16-bit sizes, no compression
        width, height = int.from_bytes(data[18:20], "little"), int.from_bytes(data[20:22], "little")
        bits, compression, stated = int.from_bytes(data[24:26], "little"), _BI_RGB, 0
    else:
        if len(data) < 38:
            return f"the BMP stops after {len(data)} bytes, inside its header"
        width = int.from_bytes(data[18:22], "little", signed=True)
        height = int.from_bytes(data[22:26], "little", signed=True)
        bits = int.from_bytes(data[28:30], "little")
        compression = int.from_bytes(data[30:34], "little")
        stated = int.from_bytes(data[34:38], "little")
    if compression in (_BI_RGB, _BI_BITFIELDS, _BI_ALPHABITFIELDS):
        needed = offset + (abs(width) * bits + 31) // 32 * 4 * abs(height)
        what = "pixel rows"
    elif compression in (_BI_RLE8, _BI_RLE4) and stated:
        needed, what = offset + stated, "compressed pixels"
    else:
        return None  # another compression, or RLE of unstated size: its decoder checks
    if needed > len(data):
        return f"the BMP's {what} need {needed} bytes, {len(data)} arrived"
    return None


# --- TIFF --------------------------------------------------------------------------------------

_STRIP_OFFSETS, _STRIP_BYTE_COUNTS, _TILE_OFFSETS, _TILE_BYTE_COUNTS = 273, 279, 324, 325


def _tiff(data: bytes, image=None) -> str | None:
    """Every strip (or tile) of the first page, at its offset and of its byte count, present.
    The first page is the one OpenCV decodes; Pillow has read its tags."""
    tags = getattr(image, "tag_v2", None)
    if tags is None:  # Pillow could not read the header: is the first directory there?
        return _tiff_directory(data)
    for offsets_tag, counts_tag, what in ((_STRIP_OFFSETS, _STRIP_BYTE_COUNTS, "strip"),
                                          (_TILE_OFFSETS, _TILE_BYTE_COUNTS, "tile")):
        offsets, counts = _ints(tags.get(offsets_tag)), _ints(tags.get(counts_tag))
        for index, (offset, count) in enumerate(zip(offsets, counts)):
            if offset + count > len(data):
                return (f"the TIFF's {what} {index} lies at bytes {offset}..{offset + count}, "
                        f"{len(data)} arrived")
    return None


def _tiff_directory(data: bytes) -> str | None:
    """Whether the first image file directory (its entry count, 12-byte entries and the next
    directory's offset) lies within the data."""
    size = len(data)
    if size < 8:
        return f"the TIFF stops after {size} bytes, inside its header"
    order = "little" if data[:2] == b"II" else "big"
    directory = int.from_bytes(data[4:8], order)
    if directory + 2 > size:
        return f"the TIFF's first directory lies at byte {directory}, {size} arrived"
    end = directory + 2 + 12 * int.from_bytes(data[directory:directory + 2], order) + 4
    if end > size:
        return f"the TIFF's first directory needs {end} bytes, {size} arrived"
    return None


def _ints(value) -> list[int]:
    if value is None:
        return []
    values = value if isinstance(value, (tuple, list)) else (value,)
    return [int(v) for v in values if isinstance(v, int) and v >= 0]


# --- GIF ---------------------------------------------------------------------------------------

def _gif(data: bytes, _image=None) -> str | None:
    """The blocks walked up to the end of the first frame's image data (the frame we decode):
    extensions and the frame's data are sequences of sub-blocks ended by an empty one."""
    size = len(data)
    if size < 13:
        return f"the GIF stops after {size} bytes, inside its header"
    flags = data[10]
    at = 13 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)  # after the global color table
    while at < size:
        block = data[at]
        if block == 0x3B:  # the trailer, before any frame: its decoder says so
            return None
        if block == 0x21:  # an extension: its label, then sub-blocks
            at = _gif_sub_blocks(data, at + 2)
        elif block == 0x2C:  # the first frame: descriptor, local color table, LZW code size, data
            if at + 10 > size:
                break
            local = data[at + 9]
            at += 10 + (3 << ((local & 7) + 1) if local & 0x80 else 0) + 1
            at = _gif_sub_blocks(data, at)
            if at is not None:
                return None
        else:
            return None  # not a block at all: corrupt, which its decoder says
        if at is None:
            break
    return f"the GIF stops after {size} bytes, before its first frame's data ends"


def _gif_sub_blocks(data: bytes, at: int) -> int | None:
    """The position after a sequence of sub-blocks starting at ``at`` (None: it runs past the
    end of the data)."""
    size = len(data)
    while at < size:
        length = data[at]
        at += 1 + length
        if length == 0:
            return at
    return None


_CHECKS: dict[str, Callable[[bytes, Any], str | None]] = {
    "JPEG": _jpeg, "MPO": _jpeg, "PNG": _png, "WEBP": _webp, "BMP": _bmp, "TIFF": _tiff, "GIF": _gif,
}
