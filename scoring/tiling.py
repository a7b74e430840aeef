"""Tiled inference, as Azure AutoML's tiling for images: a large picture is cut into overlapping
tiles (``scoring.tiles``: ``tile_grid_size`` "MxN", ``tile_overlap_ratio``), the tiles and the
whole picture go through the network (the segmenter's batches: ``MMDET_MLFLOW_BATCH_SIZE``
tiles a pass at most, so memory stays bounded), and their detections are merged into one
answer in the picture's pixels, masks included.

Why the whole picture too: an object larger than a tile is cut by every tile that sees it, and
the whole picture (shrunk to the network's input) still sees it whole; small objects, which the
shrunk picture loses, are found whole in a tile.

The merge (``merge_tiles``), per class (across classes with ``class_agnostic_nms``):

- a tile's detection whose box touches an inner tile border (one that is not the picture's own
  edge) may be a piece of an object the border cut: it is *cut*;
- candidates are taken whole ones first, then cut ones, each by score; a candidate joins the
  first group it overlaps: whole with whole at IoU > ``tile_predictions_nms_thresh`` (AutoML's
  NMS), a cut piece with anything when most of the smaller box lies in the other
  (intersection over the smaller area >= ``PIECE_OVERLAP``), or two cut pieces of one object
  across a border (their boxes intersect and span the same rows or columns);
- a group is one object: the score and label of its best piece; the box and mask of its best
  whole detection, or, when every piece is cut (the whole picture missed it too), the union of
  the pieces' boxes and masks.

Masks stay lazy (the ``MaskSource`` contract): a group's mask is made when the encoder asks for
it, from its pieces' windows (``MaskWindow``) moved into the picture, never a full-size mask per
tile and never all masks at once.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np

from scoring.boxes import box_iou, intersection, overlap_of_smaller, span_iou
from scoring.runtimes.base import ImageDetections, Segmenter
from scoring.runtimes.masks import MaskWindow
from scoring.schema import PredictParams
from scoring.tiles import tile_rectangles

# A cut piece belongs to an object when at least this share of the smaller of the two boxes
# lies in both.
PIECE_OVERLAP = 0.6
# Pixels from an inner tile border within which a box counts as touching it (boxes are floats,
# and a cut object's box ends at the tile's last pixel or a little short of it).
BORDER_PIXELS = 2.0
# Two cut pieces across a border span the same rows (columns) when the 1-D IoU of those spans
# is at least this.
SPAN_OVERLAP = 0.5


def tiles_for(image_hw: tuple[int, int], params: PredictParams) -> list[tuple[int, int, int, int]]:
    """The tiles of a picture under ``params`` (x0, y0, x1, y1), without the whole picture; an
    empty list when the grid, clipped to the picture, is a single tile (nothing to tile)."""
    grid = params.tile_grid
    if grid is None:
        return []
    height, width = image_hw
    rects = tile_rectangles(width, height, grid, params.tile_overlap_ratio)
    return rects if len(rects) > 1 else []


def segment_tiled(segmenter: Segmenter, image: np.ndarray, params: PredictParams) -> ImageDetections:
    """One picture's detections with tiling: the whole picture and each tile through the
    segmenter (its batches), merged. Without tiles (no grid, or one tile), the plain answer."""
    rects = tiles_for(image.shape[:2], params)
    if not rects:
        return segmenter([image], params)[0]
    height, width = image.shape[:2]
    sources = [(0, 0, width, height)] + rects
    crops = [image[y0:y1, x0:x1] for x0, y0, x1, y1 in sources]  # views: no copies
    return merge_tiles(segmenter(crops, params), sources, (height, width), params)


@dataclass
class _Candidate:
    source: int  # index into the sources (0: the whole picture)
    index: int  # the detection's index in its source
    box: np.ndarray  # x1, y1, x2, y2 in picture pixels
    score: float
    label: int
    cut: bool


@dataclass
class _Group:
    members: list[_Candidate] = field(default_factory=list)

    @property
    def best(self) -> _Candidate:
        return max(self.members, key=lambda c: c.score)

    @property
    def whole(self) -> _Candidate | None:
        return next((c for c in self.members if not c.cut), None)

    def box(self) -> np.ndarray:
        if self.whole is not None:
            return self.whole.box
        boxes = np.stack([c.box for c in self.members])
        return np.concatenate([boxes[:, :2].min(axis=0), boxes[:, 2:].max(axis=0)])

    def mask_members(self) -> list[_Candidate]:
        return [self.whole] if self.whole is not None else list(self.members)


def merge_tiles(detections: Sequence[ImageDetections], sources: Sequence[tuple[int, int, int, int]],
                image_hw: tuple[int, int], params: PredictParams) -> ImageDetections:
    """Detections of each source (the whole picture first, then tiles; each in its own pixels)
    -> one picture's detections (see the module docstring), at most ``max_detections``, best
    first."""
    height, width = image_hw
    candidates = []
    for source, (found, rect) in enumerate(zip(detections, sources)):
        x0, y0 = rect[0], rect[1]
        inner = _inner_borders(rect, width, height)
        for i in range(len(found)):
            box = np.asarray(found.boxes[i], np.float64) + (x0, y0, x0, y0)
            candidates.append(_Candidate(source, i, box, float(found.scores[i]), int(found.labels[i]),
                                         cut=_touches(box, inner)))
    candidates.sort(key=lambda c: (c.cut, -c.score))
    groups: list[_Group] = []
    # Every way of joining a group needs a member whose box intersects the candidate's, so only
    # those groups are tried (in the order they were made, as before): at a low score threshold
    # 17 sources give ~1700 candidates, and trying every group took seconds a picture.
    member_boxes = np.empty((len(candidates), 4), np.float64)
    member_group = np.empty(len(candidates), np.int64)
    for count, candidate in enumerate(candidates):
        box, seen = candidate.box, member_boxes[:count]
        meets = ((np.minimum(seen[:, 2], box[2]) > np.maximum(seen[:, 0], box[0]))
                 & (np.minimum(seen[:, 3], box[3]) > np.maximum(seen[:, 1], box[1])))
        index = next((int(g) for g in np.unique(member_group[:count][meets])
                      if _same_object(candidate, groups[g], params)), None)
        if index is None:
            index = len(groups)
            groups.append(_Group([candidate]))
        else:
            groups[index].members.append(candidate)
        member_boxes[count], member_group[count] = box, index
    groups.sort(key=lambda g: -g.best.score)
    groups = groups[:params.max_detections]
    class_names = detections[0].class_names if detections else []
    return ImageDetections(
        image_size=(width, height),
        boxes=np.asarray([g.box() for g in groups], np.float32).reshape(-1, 4),
        scores=np.asarray([g.best.score for g in groups], np.float32),
        labels=np.asarray([g.best.label for g in groups], np.int64),
        class_names=class_names,
        masks=TiledMasks([g.mask_members() for g in groups], detections, sources, image_hw),
    )


def _inner_borders(rect, width: int, height: int) -> tuple[float | None, ...]:
    """A tile's edges (left, top, right, bottom) that other tiles continue past: None for an
    edge on the picture's own border (nothing is cut there)."""
    x0, y0, x1, y1 = rect
    return (x0 if x0 > 0 else None, y0 if y0 > 0 else None,
            x1 if x1 < width else None, y1 if y1 < height else None)


def _touches(box: np.ndarray, inner: tuple[float | None, ...]) -> bool:
    left, top, right, bottom = inner
    return ((left is not None and box[0] <= left + BORDER_PIXELS)
            or (top is not None and box[1] <= top + BORDER_PIXELS)
            or (right is not None and box[2] >= right - BORDER_PIXELS)
            or (bottom is not None and box[3] >= bottom - BORDER_PIXELS))


def _same_object(candidate: _Candidate, group: _Group, params: PredictParams) -> bool:
    if not params.class_agnostic_nms and candidate.label != group.members[0].label:
        return False
    for member in group.members:
        if not (candidate.cut or member.cut):
            if box_iou(candidate.box, member.box) > params.tile_predictions_nms_thresh:
                return True
        elif overlap_of_smaller(candidate.box, member.box) >= PIECE_OVERLAP:
            return True
        elif candidate.cut and member.cut and _pieces_across_a_border(candidate.box, member.box):
            return True
    return False


def _pieces_across_a_border(a: np.ndarray, b: np.ndarray) -> bool:
    """Two pieces of one object a border cut: they meet (their boxes intersect, in the tiles'
    overlap) and span about the same rows (a vertical cut) or columns (a horizontal one)."""
    if intersection(a, b) <= 0:
        return False
    return (span_iou(a[1], a[3], b[1], b[3]) >= SPAN_OVERLAP
            or span_iou(a[0], a[2], b[0], b[2]) >= SPAN_OVERLAP)


class TiledMasks:
    """The ``MaskSource`` of a tiled answer: each merged detection's mask made when asked for,
    from its pieces' windows in their sources, moved into the picture (and joined, for an
    object only seen in pieces)."""

    def __init__(self, members: list[list[_Candidate]], detections: Sequence[ImageDetections],
                 sources: Sequence[tuple[int, int, int, int]], image_hw: tuple[int, int]):
        self.members = members
        self.detections = detections
        self.sources = sources
        self.image_hw = (int(image_hw[0]), int(image_hw[1]))

    def __len__(self) -> int:
        return len(self.members)

    def iter_masks(self, threshold: float) -> Iterator[np.ndarray]:
        return (window.full() for window in self.iter_windows(threshold))

    def iter_windows(self, threshold: float) -> Iterator[MaskWindow]:
        for pieces in self.members:
            yield join_windows([self._piece_window(piece, threshold) for piece in pieces], self.image_hw)

    def _piece_window(self, piece: _Candidate, threshold: float) -> MaskWindow:
        x0, y0 = self.sources[piece.source][:2]
        masks = self.detections[piece.source].masks.select([piece.index])
        window = next(iter(_windows_of(masks, threshold)))
        return MaskWindow(window.pixels, (window.offset[0] + x0, window.offset[1] + y0), self.image_hw)


def _windows_of(masks, threshold: float) -> Iterator[MaskWindow]:
    windows = getattr(masks, "iter_windows", None)
    if windows is not None:
        return windows(threshold)
    return (MaskWindow.whole(mask) for mask in masks.iter_masks(threshold))


def join_windows(windows: Sequence[MaskWindow], image_hw: tuple[int, int]) -> MaskWindow:
    """The union of masks given as windows of one picture, as one window over their extent."""
    if len(windows) == 1:
        return windows[0]
    x0 = min(w.offset[0] for w in windows)
    y0 = min(w.offset[1] for w in windows)
    x1 = max(w.offset[0] + w.pixels.shape[1] for w in windows)
    y1 = max(w.offset[1] + w.pixels.shape[0] for w in windows)
    pixels = np.zeros((y1 - y0, x1 - x0), dtype=bool)
    for w in windows:
        top, left = w.offset[1] - y0, w.offset[0] - x0
        pixels[top:top + w.pixels.shape[0], left:left + w.pixels.shape[1]] |= w.pixels
    return MaskWindow(pixels, (x0, y0), image_hw)
