"""What every runtime shares about making full-size masks from low-resolution logits.

mmdet (RTMDet-Ins, ``_bbox_mask_post_process``) makes each detection's mask in three steps: a
bilinear upsampling of the (h, w) logits by the stride, a second bilinear resize to the padded
input's shape scaled back to the original image (``MaskGeometry.upsampled_shape``), and a crop
to the original image; then sigmoid > threshold (here: logits > ``logit_cutoff(threshold)``,
or the runtime's own cut for its sigmoid's rounding).

Two costs of doing that literally, and what this module does about them:

- For a long, thin image (70000 x 700 pads to a square) the intermediate is (long side)^2:
  19.5 GiB for one mask. Where the crop would drop most of it (``MaskGeometry.windowed``), the
  second resize is computed for the kept window only (``windowed_resize``), with the very index
  rule torch and OpenCV use for a bilinear resize with half-pixel centres (``source_index``),
  a band of rows at a time.
- Every mask cost the whole picture, however small its object: on a large photo that is most of
  an answer's time (bench/results/masks.md). So each detection's mask is made only over the
  window where it can be True at all (``MaskGeometry.support_window``, read off the
  low-resolution logits: exact), and optionally cut to its box plus a margin
  (``MaskGeometry.box_window``: RTMDet-Ins's masks are not cut to their boxes and an untrained
  model's cover the picture), from the few low-resolution cells that window needs
  (``box_window_mask``), and handed on as a ``MaskWindow``: the pixels and where they sit.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np

# Upsampled float logits one chunk of masks may hold; a 12-megapixel image gets ~4 masks.
MASK_CHUNK_BYTES = 256 * 1024 * 1024

# Low-resolution cells (of the mask logits, stride pixels of the network input each) added on
# every side of a detection's box to make the window its mask is computed in.
BOX_MARGIN_CELLS = 4

# A window at least this fraction of the picture is made the whole-picture way and cut: there
# the window saves little, and the runtime's whole-picture resize (torch's, multi-threaded) is
# the faster code. OpenCV's whole-picture resize is faster a pixel than the window's numpy by
# more than torch's, so the ONNX runtime passes a quarter (bench/masks.py,
# bench/results/design-choices.md).
WHOLE_PICTURE_FRACTION = 0.5


def logit_cutoff(threshold: float) -> float:
    """The logit ``x`` with sigmoid(x) > threshold  <=>  x > logit_cutoff(threshold): the same
    masks without a sigmoid over every pixel (-inf for threshold <= 0, +inf for >= 1)."""
    if threshold <= 0:
        return -math.inf
    if threshold >= 1:
        return math.inf
    return math.log(threshold) - math.log1p(-threshold)


def windowed(big_h: int, big_w: int, ori_h: int, ori_w: int) -> bool:
    """Whether to resample only the kept window: when the crop would drop over half."""
    return big_h * big_w > 2 * ori_h * ori_w


@dataclass(frozen=True)
class MaskGeometry:
    """Where one image's masks come from and go to: the logits' stride, mmdet's inverse scale
    factor (``[1 / s for s in img_meta["scale_factor"]]``: width's, height's) and the original
    image's (height, width)."""

    stride: int
    inverse_scale_factor: tuple[float, float]
    ori_hw: tuple[int, int]

    @classmethod
    def from_scale_factor(cls, stride: int, scale_factor, ori_hw) -> "MaskGeometry":
        return cls(int(stride), (1 / scale_factor[0], 1 / scale_factor[1]),
                   (int(ori_hw[0]), int(ori_hw[1])))

    @property
    def ori_h(self) -> int:
        return self.ori_hw[0]

    @property
    def ori_w(self) -> int:
        return self.ori_hw[1]

    def upsampled_shape(self, low_h: int, low_w: int) -> tuple[int, int]:
        """(height, width) of the second resize for (low_h, low_w) logits. mmdet 3.3.0 scales
        the height with scale_factor[0] (the width's factor) too; kept, so our masks stay
        identical to mmdet's."""
        h, w = low_h * self.stride, low_w * self.stride
        return (math.ceil(h * self.inverse_scale_factor[0]),
                math.ceil(w * self.inverse_scale_factor[1]))

    def windowed(self, low_h: int, low_w: int) -> bool:
        """Whether whole-picture masks resample only the part that survives the crop."""
        return windowed(*self.upsampled_shape(low_h, low_w), self.ori_h, self.ori_w)

    def chunk_size(self, low_h: int, low_w: int, budget: int = MASK_CHUNK_BYTES) -> int:
        """Whole-picture masks made at once: their float logits at the upsampled size fit in
        ``budget`` bytes; one at a time (in bands of rows) where ``windowed``."""
        if self.windowed(low_h, low_w):
            return 1
        big_h, big_w = self.upsampled_shape(low_h, low_w)
        return max(1, budget // (big_h * big_w * 4))

    def cell_pixels(self) -> tuple[float, float]:
        """One low-resolution cell in original-image pixels (x, y)."""
        return self.stride * self.inverse_scale_factor[0], self.stride * self.inverse_scale_factor[1]

    def support_window(self, low: np.ndarray, threshold_logit: float) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1), exclusive ends: a window of the original image outside of which the
        mask made from ``low`` (h, w) logits is False, for certain. Every upsampled value is a
        convex blend of at most four logits (two bilinear steps), so it can exceed the cutoff
        only near a cell that does (less a rounding allowance); empty when no cell comes near."""
        low_h, low_w = low.shape
        finite = np.abs(low[np.isfinite(low)])  # a NaN cell is never True, nor may it hide others
        allowance = np.float32(1e-4) * (np.float32(1) + finite.max(initial=np.float32(0)))
        near = low > np.float32(threshold_logit) - allowance  # all for a cutoff of -inf, none for +inf
        rows, cols = np.flatnonzero(near.any(axis=1)), np.flatnonzero(near.any(axis=0))
        if not len(rows):
            return 0, 0, 0, 0
        big_h, big_w = self.upsampled_shape(low_h, low_w)
        y0, y1 = _support_span(int(rows[0]), int(rows[-1]), self.stride, low_h, big_h, self.ori_h)
        x0, x1 = _support_span(int(cols[0]), int(cols[-1]), self.stride, low_w, big_w, self.ori_w)
        return x0, y0, x1, y1

    def box_window(self, box, margin_cells: float = BOX_MARGIN_CELLS) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1), x1 and y1 exclusive: ``box`` (x1, y1, x2, y2 in original pixels)
        grown by ``margin_cells`` low-resolution cells on each side, in whole pixels, within the
        image (possibly empty for a box outside it)."""
        cell_x, cell_y = self.cell_pixels()
        x1, y1, x2, y2 = (float(v) for v in box[:4])
        if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
            return 0, 0, self.ori_w, self.ori_h
        x0 = min(max(0, math.floor(x1 - margin_cells * cell_x)), self.ori_w)
        y0 = min(max(0, math.floor(y1 - margin_cells * cell_y)), self.ori_h)
        x1_ = min(max(x0, math.ceil(x2 + margin_cells * cell_x)), self.ori_w)
        y1_ = min(max(y0, math.ceil(y2 + margin_cells * cell_y)), self.ori_h)
        return x0, y0, x1_, y1_


def _support_span(first_cell: int, last_cell: int, stride: int, low_size: int, big_size: int,
                  ori_size: int) -> tuple[int, int]:
    """The original-image positions [p0, p1) whose two bilinear steps (x stride, then to
    ``big_size``) can reach cells first_cell..last_cell; a position's sources lie within one
    unit below and above its source coordinate (scale * (dst + 0.5) - 0.5), so the span is
    solved for that, with two positions of slack for float rounding."""
    up_size = low_size * stride
    # upsampled positions d with source in [first - 1, last + 1): first step, scale 1 / stride
    u0 = max(0, math.floor(stride * (first_cell - 0.5) - 0.5) - 2)
    u1 = min(up_size, math.ceil(stride * (last_cell + 1.5) - 0.5) + 2)
    scale = up_size / big_size
    p0 = max(0, math.floor((u0 - 0.5) / scale - 0.5) - 2)
    p1 = min(ori_size, math.ceil((u1 + 0.5) / scale - 0.5) + 2)
    return min(p0, ori_size), max(min(p0, ori_size), p1)


@dataclass
class MaskWindow:
    """One detection's mask as made: ``pixels`` (h, w) booleans at ``offset`` (x0, y0) of an
    image of ``image_hw``; every pixel outside the window is False. ``full()`` pastes it into
    the whole picture for callers that need that (COCO RLE, drawing)."""

    pixels: np.ndarray
    offset: tuple[int, int]
    image_hw: tuple[int, int]

    @classmethod
    def whole(cls, mask: np.ndarray) -> "MaskWindow":
        return cls(mask, (0, 0), (int(mask.shape[0]), int(mask.shape[1])))

    def full(self) -> np.ndarray:
        x0, y0 = self.offset
        if (x0, y0) == (0, 0) and self.pixels.shape == tuple(self.image_hw):
            return self.pixels
        out = np.zeros(self.image_hw, dtype=bool)
        h, w = self.pixels.shape
        out[y0:y0 + h, x0:x0 + w] = self.pixels
        return out


def source_index(in_size: int, out_size: int, count: int,
                 start: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For output positions ``start .. start + count - 1`` of ``out_size`` of a bilinear resize
    from ``in_size`` (align_corners=False): the two source indices and the second one's weight,
    as torch computes them (float32: scale = in/out, src = max(scale * (dst + 0.5) - 0.5, 0))."""
    scale = np.float32(in_size / out_size)
    dst = np.arange(start, start + count, dtype=np.float32)
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


# The fewest low-resolution cells (per side) handed to a runtime's upsampling at once. torch's
# bilinear kernel gave other last bits on crops under ~10 cells a side than on the whole (a
# different loop for small outputs); from 12 up, every crop matched the whole (tests/test_masks.py).
MIN_UPSAMPLE_CELLS = 16


def _stride_cells(first: np.ndarray, second: np.ndarray, stride: int,
                  low_size: int) -> tuple[int, int]:
    """The low-resolution cells [c0, c1) whose upsampling by ``stride`` covers the upsampled
    positions first.min() .. second.max(): one more cell on each side, so that no position we
    keep sees the crop's own border (its index clamp), and the cut is exact; grown to
    MIN_UPSAMPLE_CELLS where the logits have that many."""
    lo, hi = int(first.min()), int(second.max())
    c0, c1 = max(0, lo // stride - 1), min(low_size, hi // stride + 2)
    missing = MIN_UPSAMPLE_CELLS - (c1 - c0)
    if missing > 0:
        c0 = max(0, c0 - (missing + 1) // 2)
        c1 = min(low_size, max(c1, c0 + MIN_UPSAMPLE_CELLS))
        c0 = max(0, min(c0, c1 - MIN_UPSAMPLE_CELLS))
    return c0, c1


UpsampleByStride = Callable[[np.ndarray], np.ndarray]


def box_window_mask(low: np.ndarray, geometry: MaskGeometry, window: tuple[int, int, int, int],
                    threshold_logit: float, upsample: UpsampleByStride) -> np.ndarray:
    """The (y1 - y0, x1 - x0) booleans of ``window`` = (x0, y0, x1, y1) of one detection's
    whole-picture mask, from its (h, w) low-resolution logits ``low``, equal to cutting them out
    of the whole-picture mask. Only the cells the window needs are upsampled (by ``upsample``,
    the runtime's own bilinear x stride: torch's or OpenCV's, whose values on a crop are the
    values on the whole, as the scale 1/stride and every weight are exact), and the second
    resize (``windowed_resize``'s rule and arithmetic) runs on that, a band of rows at a time."""
    x0, y0, x1, y1 = window
    out_h, out_w = y1 - y0, x1 - x0
    out = np.zeros((max(0, out_h), max(0, out_w)), dtype=bool)
    if out_h <= 0 or out_w <= 0:
        return out
    low_h, low_w = low.shape
    stride = geometry.stride
    big_h, big_w = geometry.upsampled_shape(low_h, low_w)
    up_h, up_w = low_h * stride, low_w * stride
    # The second resize's sources for the window's rows and columns (in the upsampled logits).
    h0, h1, hl = source_index(up_h, big_h, out_h, start=y0)
    w0, w1, wl = source_index(up_w, big_w, out_w, start=x0)
    # The cells those need, upsampled by the runtime; then the window's part of it.
    r0, r1 = _stride_cells(h0, h1, stride, low_h)
    c0, c1 = _stride_cells(w0, w1, stride, low_w)
    up = upsample(np.ascontiguousarray(low[r0:r1, c0:c1], dtype=np.float32))
    top, left = r0 * stride, c0 * stride
    cut = np.float32(threshold_logit)
    if (big_h, big_w) == (up_h, up_w):  # the second resize is the identity (weights 0 and 1)
        np.greater(up[y0 - top:y1 - top, x0 - left:x1 - left], cut, out=out)
        return out
    h0, h1, w0, w1 = h0 - top, h1 - top, w0 - left, w1 - left
    # Separable, in the order windowed_resize computes each value: each source row across the
    # window's columns first, then the two rows' blend (the same float operations, each once),
    # where several output rows blend the same two source rows, those rows together (broadcast,
    # no gathered copies), else all rows of a band at once.
    band = band_rows(out_w, temporaries=6)
    for start in range(0, out_h, band):
        stop = min(out_h, start + band)
        first, last = int(h0[start:stop].min()), int(h1[start:stop].max()) + 1
        source = up[first:last]
        across = (1 - wl) * source[:, w0] + wl * source[:, w1]
        pairs = np.flatnonzero(np.diff(h0[start:stop], prepend=-1)) + start
        if stop - start < 4 * len(pairs):
            weight = hl[start:stop, None]
            value = across[h0[start:stop] - first]
            value *= 1 - weight
            lower = across[h1[start:stop] - first]
            lower *= weight
            value += lower
            np.greater(value, cut, out=out[start:stop])
            continue
        for group_start, group_stop in zip(pairs, [*pairs[1:], stop]):
            weight = hl[group_start:group_stop, None]
            value = (1 - weight) * across[h0[group_start] - first]
            value += weight * across[h1[group_start] - first]
            np.greater(value, cut, out=out[group_start:group_stop])
    return out


def intersect(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
    x0, y0 = max(a[0], b[0]), max(a[1], b[1])
    return x0, y0, max(x0, min(a[2], b[2])), max(y0, min(a[3], b[3]))


def iter_box_windows(geometry: MaskGeometry, low_logits: np.ndarray, boxes: np.ndarray | None,
                     threshold: float, upsample: UpsampleByStride,
                     whole_masks: Callable[[int, int], np.ndarray],
                     box_margin_cells: float | None = None,
                     whole_fraction: float = WHOLE_PICTURE_FRACTION,
                     chunk_size: int = 1, threshold_logit: float | None = None) -> Iterator[MaskWindow]:
    """Each detection's ``MaskWindow``, in order, over the window where its mask can be True at
    all (``MaskGeometry.support_window``: the same mask as the whole picture's, made at the
    cost of its extent), cut to its box grown by ``box_margin_cells`` where that is given (None:
    not cut; the mask beyond box and margin is then dropped). Made from the cells the window
    needs (``box_window_mask``), or, for a window covering ``whole_fraction`` of the picture or
    more, cut from the runtime's whole-picture masks (``whole_masks(start, stop)``: (k, H, W)
    booleans of detections start..stop-1, up to ``chunk_size`` at once), which is faster there.
    ``threshold_logit``: the runtime's own cut for ``threshold`` where it has one (default
    ``logit_cutoff``)."""
    cut = logit_cutoff(threshold) if threshold_logit is None else threshold_logit
    low_h, low_w = low_logits.shape[-2:]
    whole_way = whole_fraction * geometry.ori_h * geometry.ori_w
    exact_windows = not geometry.windowed(low_h, low_w)
    windows = []
    for i in range(len(low_logits)):
        window = geometry.support_window(low_logits[i], cut)
        if box_margin_cells is not None and boxes is not None:
            window = intersect(window, geometry.box_window(boxes[i], box_margin_cells))
        windows.append(window)
    whole = [exact_windows and (x1 - x0) * (y1 - y0) >= whole_way for x0, y0, x1, y1 in windows]
    i = 0
    while i < len(windows):
        if not whole[i]:
            x0, y0, x1, y1 = windows[i]
            pixels = box_window_mask(low_logits[i], geometry, windows[i], cut, upsample)
            yield MaskWindow(pixels, (x0, y0), geometry.ori_hw)
            i += 1
            continue
        stop = i + 1  # a run of whole-picture ones, made a chunk at a time as before windows
        while stop < len(windows) and whole[stop] and stop - i < max(1, chunk_size):
            stop += 1
        for j, mask in enumerate(whole_masks(i, stop), start=i):
            x0, y0, x1, y1 = windows[j]
            if (x0, y0, x1, y1) == (0, 0, geometry.ori_w, geometry.ori_h):
                yield MaskWindow(mask, (0, 0), geometry.ori_hw)
            else:  # a copy, not a view that would hold the whole picture's mask
                yield MaskWindow(mask[y0:y1, x0:x1].copy(), (x0, y0), geometry.ori_hw)
        i = stop
