"""COCO compressed RLE in numpy: what ``pycocotools.mask.encode`` / ``decode`` do, byte for
byte, without pycocotools (the lean ONNX serving environment does not carry it).

COCO's run-length encoding of an HxW binary mask (pycocotools' maskApi.c):

- the mask is read in column-major order (down the first column, then the next, ...);
- ``counts`` alternates the lengths of runs of 0s and 1s, starting with 0s (a mask whose first
  pixel is set starts with a 0-length run), ending with the last run (no empty tail);
- the compressed form writes each count, from the fourth on (maskApi.c's ``i > 2``) as the
  difference with the count two before it (runs of similar length cost little), as a LEB128-like string: 5 bits per
  character, lowest first, bit 0x20 set while more follow, the last character's bit 0x10 the
  sign, every character offset by 48 (so ``0``..``o``).

The run lengths are found without a loop over pixels in Python: only the mask's bounding box is
transposed (by OpenCV, which the serving core has anyway) and differenced, and the string is made
for all counts at once (``bench/answer_formats.py`` compares the speed with pycocotools').
"""
from __future__ import annotations

import cv2
import numpy as np

_OFFSET = 48  # '0': the first character of the alphabet
_MORE = 0x20  # another character follows
_MAX_CHARS = 13  # 64-bit counts need at most ceil(64 / 5) characters


def encode(mask: np.ndarray) -> dict:
    """``{"size": [height, width], "counts": "..."}`` of a 2-D mask (bool, or 0/1 integers):
    exactly ``pycocotools.mask.encode(np.asfortranarray(mask, np.uint8))`` with ``counts``
    as ``str`` (JSON-ready)."""
    if mask.ndim != 2:
        raise ValueError(f"expected a 2-D mask, got shape {mask.shape}")
    height, width = mask.shape
    return {"size": [int(height), int(width)], "counts": counts_string(run_lengths(mask))}


def encode_window(pixels: np.ndarray, offset: tuple[int, int], image_hw: tuple[int, int]) -> dict:
    """``encode`` of the picture-size mask that is all 0 but for ``pixels`` placed with its
    top-left corner at ``offset`` (x, y): the same dict, without making the picture-size mask
    (a detection's mask window, scoring.runtimes.masks.MaskWindow)."""
    height, width = image_hw
    return {"size": [int(height), int(width)],
            "counts": counts_string(run_lengths(pixels, offset, image_hw))}


def run_lengths(mask: np.ndarray, offset: tuple[int, int] = (0, 0),
                image_hw: tuple[int, int] | None = None) -> np.ndarray:
    """The uncompressed COCO counts (int64) of a 2-D mask, column-major, 0-runs first; with
    ``offset`` and ``image_hw``, of ``mask`` placed at ``offset`` (x, y) in an otherwise empty
    mask of that size."""
    height, width = mask.shape if image_hw is None else image_hw
    x0, y0 = offset
    if x0 < 0 or y0 < 0 or x0 + mask.shape[1] > width or y0 + mask.shape[0] > height:
        raise ValueError(f"a {mask.shape[1]}x{mask.shape[0]} window at {offset} does not fit a "
                         f"{width}x{height} mask")
    total = height * width
    pixels = (mask if mask.dtype == bool else mask != 0).view(np.uint8)
    rows = np.flatnonzero(pixels.any(axis=1))
    if not len(rows):
        return np.array([total], dtype=np.int64)
    top, bottom = int(rows[0]), int(rows[-1]) + 1
    columns = np.flatnonzero(pixels[top:bottom].any(axis=0))
    left, right = int(columns[0]), int(columns[-1]) + 1
    # The bounding box's columns as rows (OpenCV's transpose: many times faster than numpy's
    # strided copy of a large mask), each with a 0 before and after: along the flattened result
    # the changes alternate between a start (0 -> 1) and an end (1 -> 0) of a run of 1s.
    box = np.ascontiguousarray(pixels[top:bottom, left:right])
    stride = bottom - top + 2
    padded = cv2.copyMakeBorder(cv2.transpose(box), 0, 0, 1, 1, cv2.BORDER_CONSTANT, value=0).ravel()
    changes = np.flatnonzero(padded[1:] != padded[:-1]) + 1
    column, row = np.divmod(changes, stride)
    at = (column + left + x0) * height + (row - 1 + top + y0)  # column-major index in the full mask
    starts, ends = at[0::2], at[1::2]
    # A run that ends at the bottom of one column and one that starts at the top of the next
    # are one run in column-major order (only when the box spans every row).
    joined = starts[1:] == ends[:-1]
    if joined.any():
        starts = starts[np.concatenate(([True], ~joined))]
        ends = ends[np.concatenate((~joined, [True]))]
    counts = np.empty(2 * len(starts) + 1, dtype=np.int64)
    counts[0] = starts[0]
    counts[1::2] = ends - starts
    counts[2:-1:2] = starts[1:] - ends[:-1]
    counts[-1] = total - ends[-1]
    return counts if counts[-1] else counts[:-1]


def counts_string(counts: np.ndarray) -> str:
    """pycocotools' ``rleToString``: counts -> the compressed string."""
    values = np.asarray(counts, dtype=np.int64).copy()
    if len(values) > 3:  # maskApi.c differences from the fourth count on (``if (i > 2)``)
        values[3:] -= np.asarray(counts, dtype=np.int64)[1:-2]
    # characters per value: the fewest 5-bit groups holding it as a two's-complement number
    chars = np.ones(len(values), dtype=np.int64)
    largest = int(np.abs(values).max()) if len(values) else 0
    for n in range(1, _MAX_CHARS):
        limit = np.int64(1) << (5 * n - 1)
        if largest < limit:
            break
        chars += (values >= limit) | (values < -limit)
    width = int(chars.max()) if len(chars) else 1
    shifts = 5 * np.arange(width, dtype=np.int64)
    groups = (values[:, None] >> shifts[None, :]) & 0x1F
    position = np.arange(width)[None, :]
    groups |= np.where(position < chars[:, None] - 1, _MORE, 0)
    groups += _OFFSET
    return groups[position < chars[:, None]].astype(np.uint8).tobytes().decode("ascii")


def string_counts(text: str | bytes) -> np.ndarray:
    """pycocotools' ``rleFrString``: the compressed string -> counts (int64)."""
    data = np.frombuffer(text.encode("ascii") if isinstance(text, str) else bytes(text), np.uint8)
    if len(data) and (data.min() < _OFFSET or data.max() >= _OFFSET + 64):
        raise ValueError("not a COCO compressed RLE string (characters outside '0'..'o')")
    groups = data.astype(np.int64) - _OFFSET
    last = (groups & _MORE) == 0  # the last character of each value
    if len(groups) and not last[-1]:
        raise ValueError("a COCO compressed RLE string must not end inside a value")
    ends = np.flatnonzero(last)
    starts = np.concatenate(([0], ends[:-1] + 1))
    position = np.arange(len(groups)) - np.repeat(starts, ends - starts + 1)
    values = np.zeros(len(ends), dtype=np.int64)
    owner = np.repeat(np.arange(len(ends)), ends - starts + 1)
    np.add.at(values, owner, (groups & 0x1F) << (5 * position))
    # the last character's bit 0x10 is the sign: extend it
    sign = (groups[ends] & 0x10) != 0
    values[sign] -= np.int64(1) << (5 * (ends[sign] - starts[sign] + 1))
    # undo the differences with the count two before, from the fourth count on: a running sum
    # over the odd counts from the second, and over the even ones from the third
    values[1::2] = np.cumsum(values[1::2])
    values[2::2] = np.cumsum(values[2::2])
    return values


def decode(rle: dict) -> np.ndarray:
    """A ``{"size": [h, w], "counts": str}`` RLE -> the (h, w) boolean mask, as
    ``pycocotools.mask.decode`` gives it."""
    height, width = (int(v) for v in rle["size"])
    counts = rle["counts"]
    counts = string_counts(counts) if isinstance(counts, (str, bytes)) else np.asarray(counts, np.int64)
    if counts.sum() != height * width or (counts < 0).any():
        raise ValueError(f"RLE counts cover {int(counts.sum())} pixels, the size {width}x{height} "
                         f"has {height * width}")
    values = np.zeros(len(counts), dtype=bool)
    values[1::2] = True
    flat = np.repeat(values, counts)
    return flat.reshape(width, height).T
