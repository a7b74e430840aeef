"""What both runtimes share about making full-size masks from low-resolution logits.

mmdet upsamples each detection's mask logits to the padded input's shape scaled back to the
original image, then crops the image out of it. For a long, thin image (70000 x 700 pads to a
square) that intermediate is (long side)^2: 19.5 GiB for one mask, for an image of 49 M pixels.
So where the crop would drop most of it, both runtimes compute the second bilinear resize for
the kept window only (``windowed``), with the very index rule torch and OpenCV use for a
bilinear resize with half-pixel centres (``source_index``), a band of rows at a time.
"""
from __future__ import annotations

import numpy as np

# Upsampled float logits one chunk of masks may hold; a 12-megapixel image gets ~4 masks.
MASK_CHUNK_BYTES = 256 * 1024 * 1024


def windowed(big_h: int, big_w: int, ori_h: int, ori_w: int) -> bool:
    """Whether to resample only the kept window: when the crop would drop over half."""
    return big_h * big_w > 2 * ori_h * ori_w


def source_index(in_size: int, out_size: int, count: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For the first ``count`` of ``out_size`` output positions of a bilinear resize from
    ``in_size`` (align_corners=False): the two source indices and the second one's weight, as
    torch computes them (float32: scale = in/out, src = max(scale * (dst + 0.5) - 0.5, 0))."""
    scale = np.float32(in_size / out_size)
    dst = np.arange(count, dtype=np.float32)
    src = np.maximum(scale * (dst + np.float32(0.5)) - np.float32(0.5), np.float32(0))
    first = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    second = np.minimum(first + 1, in_size - 1)
    return first, second, (src - first).astype(np.float32)


def band_rows(width: int, masks: int = 1, temporaries: int = 8) -> int:
    """Rows of a ``width``-wide window whose float temporaries fit in MASK_CHUNK_BYTES."""
    return max(1, MASK_CHUNK_BYTES // (width * 4 * temporaries * max(1, masks)))


def windowed_resize(logits: np.ndarray, big_hw: tuple[int, int], window_hw: tuple[int, int],
                    threshold_logit: float) -> np.ndarray:
    """numpy: (k, h, w) float logits resized bilinearly to ``big_hw``, of which only the top-left
    ``window_hw`` is computed, compared with ``threshold_logit`` -> (k, *window_hw) booleans."""
    k, in_h, in_w = logits.shape
    out_h, out_w = window_hw
    h0, h1, hl = source_index(in_h, big_hw[0], out_h)
    w0, w1, wl = source_index(in_w, big_hw[1], out_w)
    out = np.empty((k, out_h, out_w), dtype=bool)
    band = band_rows(out_w, k)
    wl = wl[None, None, :]
    for top in range(0, out_h, band):
        rows = slice(top, top + band)
        upper, lower = logits[:, h0[rows], :], logits[:, h1[rows], :]
        weight = hl[rows][None, :, None]
        value = (1 - weight) * ((1 - wl) * upper[:, :, w0] + wl * upper[:, :, w1]) \
            + weight * ((1 - wl) * lower[:, :, w0] + wl * lower[:, :, w1])
        out[:, rows] = value > np.float32(threshold_logit)
    return out
