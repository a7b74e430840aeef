"""Tiled inference, as Azure AutoML's tiling for images: a large picture is cut into overlapping
tiles (``scoring.tiles``: ``tile_grid_size`` "MxN", ``tile_overlap_ratio``), the tiles and the
whole picture go through the network (the segmenter's batches: ``MMDET_MLFLOW_BATCH_SIZE``
tiles a pass at most, so memory stays bounded), and their detections are merged into one
answer in the picture's pixels, masks included.

Why the whole picture too: an object larger than a tile is cut by every tile that sees it, and
the whole picture (shrunk to the network's input) still sees it whole; small objects, which the
shrunk picture loses, are found whole in a tile.

The merge (``merge_tiles``), per class (across classes with ``class_agnostic_nms``), is a
non-maximum suppression that knows about cuts:

- a tile's detection whose box touches an inner tile border (one that is not the picture's own
  edge) may be a piece of an object the border cut: it is *cut*;
- candidates are taken whole ones first (a tile's before the whole picture's: finer), then cut
  ones, each by score; each either starts a
  group (an object) or joins the first group whose *keeper* (its first, best whole or best cut
  detection) it matches; it is never compared with the other members, so groups cannot chain
  (a low-score box joining neighbouring objects into one);
- whole with a whole keeper of another source: IoU > ``tile_predictions_nms_thresh`` (AutoML's
  NMS across tiles; two detections of one source are two objects, as the model's own NMS
  decided);
- a cut piece with a whole keeper: the keeper's box, clipped to the piece's tile, is what that
  tile would see of the object: IoU >= ``PIECE_IOU`` with the piece's box;
- a cut piece with a group of cut pieces (no source saw the object whole): pieces of one object
  from two tiles agree where both tiles see it, so their boxes clipped to the two tiles' overlap
  match (IoU >= ``PIECE_IOU``); each tile adds its best piece, a second piece of a tile that
  already has one is a duplicate when their IoU > ``tile_predictions_nms_thresh``;
- a group is one object: the score and label of its best member; the keeper's box and mask
  when it is whole, else the union of the pieces' boxes and masks (one per tile); also when
  only the shrunk whole picture saw it whole and its pieces in the tiles cover its box (IoU >=
  ``COVER_IOU``): their masks are made at the tiles' finer scale.

Masks stay lazy (the ``MaskSource`` contract): a group's mask is made when the encoder asks for
it, from its pieces' windows (``MaskWindow``) moved into the picture, never a full-size mask per
tile and never all masks at once.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np

from scoring.boxes import box_iou
from scoring.runtimes.base import ImageDetections, Segmenter
from scoring.runtimes.masks import MaskWindow
from scoring.schema import PredictParams
from scoring.tiles import tile_rectangles

# A cut piece is part of an object when its box and the object's box (or another piece's),
# clipped to where both are seen, have at least this IoU: the same view of one object, so
# "the same box" (bench/tiling.py, on two unseen mosaic sets: 0.5 merged neighbours' pieces
# and lost 0.015-0.017 segm mAP against 0.7; 0.7-0.9 were within 0.004 of each other).
PIECE_IOU = 0.7
# An object only the whole picture saw whole takes the union of its pieces' masks (finer) when
# their boxes' union has at least this IoU with the whole picture's box.
COVER_IOU = 0.5
# Pixels from an inner tile border within which a box counts as touching it (boxes are floats,
# and a cut object's box ends at the tile's last pixel or a little short of it).
BORDER_PIXELS = 2.0


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
    tile: tuple[int, int, int, int]  # its source's rectangle in the picture


@dataclass
class _Group:
    keeper: _Candidate
    members: list[_Candidate] = field(default_factory=list)
    pieces: dict[int, _Candidate] = field(default_factory=dict)  # source -> its piece (cut keeper)

    @classmethod
    def start(cls, candidate: _Candidate) -> "_Group":
        group = cls(candidate, [candidate])
        if candidate.cut:
            group.pieces[candidate.source] = candidate
        return group

    @property
    def best(self) -> _Candidate:
        return max(self.members, key=lambda c: c.score)

    def anchors(self) -> list[_Candidate]:
        """The members a candidate is compared with: the keeper, and each tile's piece."""
        return list(self.pieces.values()) if self.keeper.cut else [self.keeper]

    def shape_members(self) -> list[_Candidate]:
        """Whose box and mask the object gets: a whole keeper's; the union of the tiles' pieces
        when no source saw it whole, or when only the shrunk whole picture did and the pieces
        (made at the tiles' finer scale) cover about its box."""
        if self.keeper.cut:
            return list(self.pieces.values())
        if self.keeper.source == 0 and self.pieces:
            pieces = list(self.pieces.values())
            if box_iou(_union_box(pieces), self.keeper.box) >= COVER_IOU:
                return pieces
        return [self.keeper]

    def box(self) -> np.ndarray:
        return _union_box(self.shape_members())

    def mask_members(self) -> list[_Candidate]:
        return self.shape_members()

    def take(self, candidate: _Candidate, params: PredictParams) -> bool:
        """Whether ``candidate`` is this object (then it joins: a piece from a new tile of an
        object seen only in pieces adds its box and mask)."""
        if not params.class_agnostic_nms and candidate.label != self.keeper.label:
            return False
        keeper = self.keeper
        if not candidate.cut:  # wholes come first: the keeper is whole too
            # two of one source are two objects: the model's own NMS kept both
            joins = (candidate.source != keeper.source
                     and box_iou(candidate.box, keeper.box) > params.tile_predictions_nms_thresh)
        elif not keeper.cut:
            joins = box_iou(candidate.box, _clip(keeper.box, candidate.tile)) >= PIECE_IOU
            if joins and keeper.source == 0 and candidate.source not in self.pieces:
                self.pieces[candidate.source] = candidate  # its best piece in this tile
        elif candidate.source in self.pieces:
            joins = (box_iou(candidate.box, self.pieces[candidate.source].box)
                     > params.tile_predictions_nms_thresh)
        else:
            joins = any(_same_cut_object(candidate, piece) for piece in self.pieces.values())
            if joins:
                self.pieces[candidate.source] = candidate
        if joins:
            self.members.append(candidate)
        return joins


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
                                         cut=_touches(box, inner), tile=tuple(rect)))
    # Wholes first, a tile's before the whole picture's (finer: its masks are made at several
    # times the whole picture's scale), then cut pieces; each by score.
    candidates.sort(key=lambda c: (c.cut, c.source == 0, -c.score))
    groups: list[_Group] = []
    # Every way of joining a group needs an anchor (keeper or piece) whose box intersects the
    # candidate's, so only those groups are tried, in the order they were made: at a low score
    # threshold 26 sources give thousands of candidates.
    anchor_boxes = np.empty((2 * len(candidates), 4), np.float64)
    anchor_group = np.empty(2 * len(candidates), np.int64)
    anchors = 0
    for candidate in candidates:
        box, seen = candidate.box, anchor_boxes[:anchors]
        meets = ((np.minimum(seen[:, 2], box[2]) > np.maximum(seen[:, 0], box[0]))
                 & (np.minimum(seen[:, 3], box[3]) > np.maximum(seen[:, 1], box[1])))
        joined = next((int(g) for g in np.unique(anchor_group[:anchors][meets])
                       if groups[g].take(candidate, params)), None)
        if joined is None:
            joined = len(groups)
            groups.append(_Group.start(candidate))
        elif groups[joined].pieces.get(candidate.source) is not candidate:
            continue  # a duplicate: no new anchor
        if anchors == len(anchor_boxes):
            anchor_boxes = np.concatenate([anchor_boxes, anchor_boxes])
            anchor_group = np.concatenate([anchor_group, anchor_group])
        anchor_boxes[anchors], anchor_group[anchors] = box, joined
        anchors += 1
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


def _union_box(members: Sequence[_Candidate]) -> np.ndarray:
    boxes = np.stack([c.box for c in members])
    return np.concatenate([boxes[:, :2].min(axis=0), boxes[:, 2:].max(axis=0)])


def _clip(box: np.ndarray, rect) -> np.ndarray:
    x0, y0, x1, y1 = rect
    return np.array([min(max(box[0], x0), x1), min(max(box[1], y0), y1),
                     min(max(box[2], x0), x1), min(max(box[3], y0), y1)])


def _same_cut_object(a: _Candidate, b: _Candidate) -> bool:
    """Two pieces from two tiles are one object when they agree where both tiles see it: their
    boxes clipped to the tiles' overlap match."""
    both = (max(a.tile[0], b.tile[0]), max(a.tile[1], b.tile[1]),
            min(a.tile[2], b.tile[2]), min(a.tile[3], b.tile[3]))
    if both[2] <= both[0] or both[3] <= both[1]:
        return False
    return box_iou(_clip(a.box, both), _clip(b.box, both)) >= PIECE_IOU


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
