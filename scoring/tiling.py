"""Tiled inference, as Azure AutoML's tiling for images: a large picture is cut into overlapping
tiles (``scoring.tiles``: ``tile_grid_size`` "MxN", ``tile_overlap_ratio``), the tiles and the
whole picture go through the network (the predictor's batches: ``MMDET_MLFLOW_BATCH_SIZE``
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

from scoring.boxes import area, box_iou
from scoring.fetch import Deadline
from scoring.runtimes.base import ImageDetections, Predictor
from scoring.runtimes.masks import MaskWindow
from scoring.schema import PredictParams
from scoring.tiles import tile_rectangles
from scoring.work import check_deadline

# A cut piece is part of an object when its box and the object's box (or another piece's),
# clipped to where both are seen, have at least this IoU: the same view of one object, so
# "the same box". Lower, neighbours' pieces are merged into one object; above, the choice
# hardly matters (bench/tiling.py; bench/results/design-choices.md has the measurement).
PIECE_IOU = 0.7
# An object only the whole picture saw whole takes the union of its pieces' masks (finer) when
# their boxes' union has at least this IoU with the whole picture's box.
COVER_IOU = 0.5
# The merge looks up the groups near a candidate in a grid of cells about a typical candidate's
# size, at least this many pixels; a box reaching into more than BIG_BOX_CELLS cells is looked at
# with every candidate instead of being listed in each cell.
MIN_CELL_PIXELS = 16.0
BIG_BOX_CELLS = 64
# Candidates merged between two looks at the request's deadline.
DEADLINE_STRIDE = 256
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


def segment_tiled(predictor: Predictor, image: np.ndarray, params: PredictParams,
                  deadline: Deadline | None = None) -> ImageDetections:
    """One picture's detections with tiling: the whole picture and each tile through the
    predictor (its batches, ``deadline`` checked before each), merged. Without tiles (no grid,
    or one tile), the plain answer."""
    rects = tiles_for(image.shape[:2], params)
    if not rects:
        return predictor([image], params)[0]
    height, width = image.shape[:2]
    sources = [(0, 0, width, height)] + rects
    crops = [image[y0:y1, x0:x1] for x0, y0, x1, y1 in sources]  # views: no copies
    found: list[ImageDetections] = []
    for start in range(0, len(crops), predictor.batch_size):
        check_deadline(deadline, f"(after {start} of {len(crops)} tiled passes)")
        found.extend(predictor(crops[start:start + predictor.batch_size], params))
    return merge_tiles(found, sources, (height, width), params, deadline)


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


def merge_tiles(detections: Sequence[ImageDetections], sources: Sequence[tuple[int, int, int, int]],
                image_hw: tuple[int, int], params: PredictParams,
                deadline: Deadline | None = None) -> ImageDetections:
    """Detections of each source (the whole picture first, then tiles; each in its own pixels)
    -> one picture's detections (see the module docstring), at most ``max_detections``, best
    first. ``deadline``: checked every ``DEADLINE_STRIDE`` candidates (an InputError once it has
    passed), so a merge of many candidates cannot outlive its request."""
    height, width = image_hw
    candidates = []
    for source, (found, rect) in enumerate(zip(detections, sources)):
        x0, y0 = rect[0], rect[1]
        boxes = np.asarray(found.boxes, np.float64).reshape(-1, 4) + (x0, y0, x0, y0)
        cut = _touches(boxes, _inner_borders(rect, width, height))
        scores, labels, tile = np.asarray(found.scores).tolist(), np.asarray(found.labels).tolist(), tuple(rect)
        candidates.extend(_Candidate(source, i, boxes[i], float(scores[i]), int(labels[i]), bool(cut[i]), tile)
                          for i in range(len(boxes)))
    # Wholes first, a tile's before the whole picture's (finer: its masks are made at several
    # times the whole picture's scale), then cut pieces; each by score.
    candidates.sort(key=lambda c: (c.cut, c.source == 0, -c.score))
    groups = _group_candidates(candidates, image_hw, params, deadline)
    groups.sort(key=lambda g: -g.best.score)
    groups = groups[:params.max_detections]
    class_names = detections[0].class_names if detections else []
    with_masks = bool(detections) and all(found.masks is not None for found in detections)
    return ImageDetections(
        image_size=(width, height),
        boxes=np.asarray([g.box() for g in groups], np.float32).reshape(-1, 4),
        scores=np.asarray([g.best.score for g in groups], np.float32),
        labels=np.asarray([g.best.label for g in groups], np.int64),
        class_names=class_names,
        masks=TiledMasks([g.mask_members() for g in groups], detections, sources, image_hw)
        if with_masks else None,
    )


def _group_candidates(candidates: Sequence[_Candidate], image_hw: tuple[int, int],
                      params: PredictParams, deadline: Deadline | None) -> list[_Group]:
    """The groups (objects) of the sorted candidates: each candidate joins the first group (in
    the order groups were made) whose keeper or pieces take it (``_first_taker``), else starts
    one. Every way of joining needs an anchor (a keeper or a piece) whose box meets the
    candidate's, so only the anchors an ``_AnchorIndex`` finds near it are compared, all at once:
    the work grows with the candidates and their neighbours, not with every pair."""
    groups: list[_Group] = []
    index = _AnchorIndex(candidates, image_hw, by_label=not params.class_agnostic_nms)
    for n, candidate in enumerate(candidates):
        if n % DEADLINE_STRIDE == 0:
            check_deadline(deadline, f"(merging tiles: {n} of {len(candidates)} detections)")
        joined = _first_taker(candidate, index, groups, params)
        if joined is None:
            groups.append(_Group.start(candidate))
            index.add(candidate, len(groups) - 1, keeper_cut=candidate.cut, keeper=True)
            continue
        group = groups[joined]
        group.members.append(candidate)
        if candidate.cut and candidate.source not in group.pieces and (group.keeper.cut
                                                                        or group.keeper.source == 0):
            # a piece from a new tile: of an object seen only in pieces (its box and mask grow),
            # or of one only the shrunk whole picture saw whole (finer masks, when they cover it)
            group.pieces[candidate.source] = candidate
            index.add(candidate, joined, keeper_cut=group.keeper.cut, keeper=False)
    return groups


def _first_taker(candidate: _Candidate, index: "_AnchorIndex", groups: list[_Group],
                 params: PredictParams) -> int | None:
    """The first group (lowest index) that is the same object as ``candidate``, or None:

    - a whole candidate (wholes come first, so every keeper is whole): a keeper of another source
      (two of one source are two objects: the model's own NMS kept both) with IoU above
      ``tile_predictions_nms_thresh``;
    - a cut piece and a whole keeper: the keeper's box clipped to the piece's tile, IoU >=
      ``PIECE_IOU``;
    - a cut piece and an object seen only in pieces: a duplicate when the object has a piece from
      the same tile and their IoU is above ``tile_predictions_nms_thresh``, else a new piece when
      it agrees with any of the pieces where both tiles see it (``_same_cut_objects``);
    - with ``class_agnostic_nms`` off, only a group of the candidate's label (the index finds
      only those)."""
    near = index.meeting(candidate)
    if not len(near):
        return None
    group, boxes, source = index.group[near], index.boxes[near], index.source[near]
    if not candidate.cut:
        takes = (source != candidate.source) & (
            _ious(candidate.box, boxes, index.areas[near]) > params.tile_predictions_nms_thresh)
        return int(group[takes].min()) if takes.any() else None
    cut_group = index.group_cut[group]
    whole_keeper = ~cut_group & index.keeper[near]
    whole_takes = np.zeros(len(near), bool)
    if whole_keeper.any():
        clipped = _clip_all(boxes[whole_keeper], candidate.tile)
        whole_takes[whole_keeper] = _ious(candidate.box, clipped, _areas(clipped)) >= PIECE_IOU
    same_tile = source == candidate.source
    duplicate = cut_group & same_tile & (
        _ious(candidate.box, boxes, index.areas[near]) > params.tile_predictions_nms_thresh)
    agrees = cut_group & ~same_tile
    if agrees.any():
        agrees[agrees] = _same_cut_objects(candidate, boxes[agrees], index.tiles[near][agrees])
    # a group with a piece from this tile takes the candidate only as that piece's duplicate
    new_piece = [int(g) for g in np.unique(group[agrees]) if candidate.source not in groups[g].pieces]
    takers = np.concatenate([group[whole_takes], group[duplicate], np.asarray(new_piece, np.int64)])
    return int(takers.min()) if len(takers) else None


class _AnchorIndex:
    """The anchors merged so far (each group's keeper, and the pieces it took from new tiles),
    found by where they are: a uniform grid of cells about as large as a typical candidate, each
    listing the anchors whose boxes reach into it (a box over ``BIG_BOX_CELLS`` cells is listed
    once, among the few looked at every time), one grid per label unless the merge is
    class-agnostic (only a group of the candidate's label can take it)."""

    def __init__(self, candidates: Sequence[_Candidate], image_hw: tuple[int, int], by_label: bool):
        count = len(candidates)
        self.boxes = np.empty((count, 4), np.float64)
        self.areas = np.empty(count, np.float64)
        self.tiles = np.empty((count, 4), np.float64)
        self.source = np.empty(count, np.int64)
        self.group = np.empty(count, np.int64)
        self.keeper = np.empty(count, bool)  # the group's keeper (not a piece it took)
        self.group_cut = np.empty(count, bool)  # per group: its keeper is a cut piece
        self.size = 0
        self.by_label = by_label
        sides = [max(c.box[2] - c.box[0], c.box[3] - c.box[1]) for c in candidates]
        self.cell = max(MIN_CELL_PIXELS, float(np.median(sides)) if sides else 1.0)
        self.columns = int(image_hw[1] // self.cell) + 1
        self.rows = int(image_hw[0] // self.cell) + 1
        self.cells: dict[tuple[int, int], list[int]] = {}  # (label or 0, cell) -> anchors
        self.big: dict[int, list[int]] = {}  # label or 0 -> anchors over many cells

    def _cells(self, box: np.ndarray) -> list[int]:
        """The cells a box reaches into (a box past the picture's edge: the edge's cells)."""
        x0, y0, x1, y1 = box.tolist()
        cell, columns, rows = self.cell, self.columns, self.rows
        first_column = min(max(0, int(x0 // cell)), columns - 1)
        last_column = min(max(first_column, int(x1 // cell)), columns - 1)
        first_row = min(max(0, int(y0 // cell)), rows - 1)
        last_row = min(max(first_row, int(y1 // cell)), rows - 1)
        return [row * columns + column for row in range(first_row, last_row + 1)
                for column in range(first_column, last_column + 1)]

    def add(self, candidate: _Candidate, group: int, keeper_cut: bool, keeper: bool) -> None:
        n = self.size
        self.boxes[n], self.tiles[n] = candidate.box, candidate.tile
        self.areas[n] = area(candidate.box)
        self.source[n], self.group[n], self.keeper[n] = candidate.source, group, keeper
        if keeper:
            self.group_cut[group] = keeper_cut
        self.size += 1
        label = candidate.label if self.by_label else 0
        cells = self._cells(candidate.box)
        if len(cells) > BIG_BOX_CELLS:
            self.big.setdefault(label, []).append(n)
            return
        for cell in cells:
            self.cells.setdefault((label, cell), []).append(n)

    def meeting(self, candidate: _Candidate) -> np.ndarray:
        """The anchors (of the candidate's label) whose boxes overlap its box (a positive area
        in common); an anchor listed in two of its cells may come twice."""
        label = candidate.label if self.by_label else 0
        found = list(self.big.get(label, ()))
        for cell in self._cells(candidate.box):
            found.extend(self.cells.get((label, cell), ()))
        if not found:
            return np.empty(0, np.int64)
        near = np.asarray(found, np.int64)
        seen, box = self.boxes[near], candidate.box
        meets = ((np.minimum(seen[:, 2], box[2]) > np.maximum(seen[:, 0], box[0]))
                 & (np.minimum(seen[:, 3], box[3]) > np.maximum(seen[:, 1], box[1])))
        return near[meets]


def _ious(box: np.ndarray, boxes: np.ndarray, areas: np.ndarray) -> np.ndarray:
    """``box_iou`` of one box with each of ``boxes`` (whose ``_areas`` are given), with the same
    arithmetic, so the same values as comparing them one pair at a time."""
    width = np.minimum(boxes[:, 2], box[2]) - np.maximum(boxes[:, 0], box[0])
    height = np.minimum(boxes[:, 3], box[3]) - np.maximum(boxes[:, 1], box[1])
    inter = np.maximum(0.0, width) * np.maximum(0.0, height)
    return _ratio(inter, area(box) + areas - inter)


def _ratio(inter: np.ndarray, union: np.ndarray) -> np.ndarray:
    """inter / union, 0 where the union is empty (as ``box_iou``)."""
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def _areas(boxes: np.ndarray) -> np.ndarray:
    return np.maximum(0.0, boxes[:, 2] - boxes[:, 0]) * np.maximum(0.0, boxes[:, 3] - boxes[:, 1])


def _clip_all(boxes: np.ndarray, rects) -> np.ndarray:
    """Each box cut to a rectangle (x0, y0, x1, y1): one for all, or one each (rows of ``rects``)."""
    rects = np.asarray(rects, np.float64)
    lows, highs = rects[..., [0, 1, 0, 1]], rects[..., [2, 3, 2, 3]]
    return np.minimum(np.maximum(boxes, lows), highs)


def _same_cut_objects(piece: _Candidate, boxes: np.ndarray, tiles: np.ndarray) -> np.ndarray:
    """Whether ``piece`` and each of the pieces ``boxes`` (cut by ``tiles``) are one object: two
    pieces of one object agree where both tiles see it, so their boxes clipped to the two tiles'
    overlap match (IoU >= ``PIECE_IOU``)."""
    both = np.stack([np.maximum(tiles[:, 0], piece.tile[0]), np.maximum(tiles[:, 1], piece.tile[1]),
                     np.minimum(tiles[:, 2], piece.tile[2]), np.minimum(tiles[:, 3], piece.tile[3])],
                    axis=1)
    overlap = (both[:, 2] > both[:, 0]) & (both[:, 3] > both[:, 1])
    mine, theirs = _clip_all(piece.box[None], both), _clip_all(boxes, both)
    width = np.minimum(mine[:, 2], theirs[:, 2]) - np.maximum(mine[:, 0], theirs[:, 0])
    height = np.minimum(mine[:, 3], theirs[:, 3]) - np.maximum(mine[:, 1], theirs[:, 1])
    inter = np.maximum(0.0, width) * np.maximum(0.0, height)
    return overlap & (_ratio(inter, _areas(mine) + _areas(theirs) - inter) >= PIECE_IOU)


def _inner_borders(rect, width: int, height: int) -> tuple[float | None, ...]:
    """A tile's edges (left, top, right, bottom) that other tiles continue past: None for an
    edge on the picture's own border (nothing is cut there)."""
    x0, y0, x1, y1 = rect
    return (x0 if x0 > 0 else None, y0 if y0 > 0 else None,
            x1 if x1 < width else None, y1 if y1 < height else None)


def _touches(boxes: np.ndarray, inner: tuple[float | None, ...]) -> np.ndarray:
    """Whether each box (a row of ``boxes``, or one box) touches one of a tile's inner borders."""
    boxes = np.asarray(boxes)
    left, top, right, bottom = inner
    touching = np.zeros(boxes.shape[:-1], bool)
    if left is not None:
        touching |= boxes[..., 0] <= left + BORDER_PIXELS
    if top is not None:
        touching |= boxes[..., 1] <= top + BORDER_PIXELS
    if right is not None:
        touching |= boxes[..., 2] >= right - BORDER_PIXELS
    if bottom is not None:
        touching |= boxes[..., 3] >= bottom - BORDER_PIXELS
    return touching


def _union_box(members: Sequence[_Candidate]) -> np.ndarray:
    if len(members) == 1:
        return members[0].box
    boxes = np.stack([c.box for c in members])
    return np.concatenate([boxes[:, :2].min(axis=0), boxes[:, 2:].max(axis=0)])


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
