"""Fine-tuning on tiles (AutoML's ``tile_grid_size`` in training): each training picture is cut
into the tiles tiled inference cuts it into (``scoring.tiles``, one geometry), and each object
into its part inside each tile. Objects cut by a tile border are clipped to the tile; a piece
showing less than ``min_visible_fraction`` of its object is dropped (a sliver of a bottle teaches
the model to see bottles in slivers). The whole pictures stay in the set too: tiled inference
also predicts the whole picture, so the model keeps seeing objects at that scale.

The tiles are written as image files next to the training data's COCO file (mmdet reads files),
once per fine-tune; a resumed run writes the same bytes again.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from pycocotools import mask as mask_utils

from mmdet_mlflow.data import Dataset, ImageRecord, Instance
from mmdet_mlflow.files import atomic_write_bytes
from mmdet_mlflow.training.settings import FinetuneError
from scoring import tiles as tile_geometry

# A piece of an object cut by a tile border is kept when it shows at least this much of it.
MIN_VISIBLE_FRACTION = 0.25
POLYGON_TOLERANCE = 0.5  # pixels: Douglas-Peucker on the traced outline of a clipped piece
JPEG_QUALITY = 95


@dataclass(frozen=True)
class TrainingTiles:
    grid: tuple[int, int]
    overlap: float = tile_geometry.DEFAULT_OVERLAP_RATIO
    min_visible_fraction: float = MIN_VISIBLE_FRACTION
    keep_whole: bool = True

    @classmethod
    def from_settings(cls, tile_grid_size, tile_overlap_ratio) -> "TrainingTiles | None":
        """From the fine-tune settings; None when there is no grid. Bad values: FinetuneError."""
        try:
            grid = tile_geometry.parse_tile_grid(tile_grid_size)
            overlap = tile_geometry.check_overlap_ratio(
                tile_geometry.DEFAULT_OVERLAP_RATIO if tile_overlap_ratio is None else tile_overlap_ratio)
        except tile_geometry.TileGridError as err:
            raise FinetuneError(str(err)) from None
        return None if grid is None else cls(grid, overlap)


def _rasterized(instance: Instance, rect, image_hw) -> np.ndarray:
    """The instance's mask within ``rect`` (x0, y0, x1, y1), booleans of the rect's size."""
    x0, y0, x1, y1 = rect
    if instance.rle is not None:
        rle = dict(instance.rle)
        if isinstance(rle["counts"], str):
            rle["counts"] = rle["counts"].encode()
        return mask_utils.decode(rle)[y0:y1, x0:x1].astype(bool)
    shifted = [(np.asarray(s, dtype=np.float64).reshape(-1, 2) - (x0, y0)).ravel().tolist()
               for s in instance.polygons if len(s) >= 6]
    if not shifted:
        return np.zeros((y1 - y0, x1 - x0), bool)
    rles = mask_utils.frPyObjects(shifted, y1 - y0, x1 - x0)
    return mask_utils.decode(mask_utils.merge(rles)).astype(bool)


def clip_instance(instance: Instance, rect, image_hw, min_visible_fraction: float) -> Instance | None:
    """``instance`` (pixel coordinates of the picture) as seen in tile ``rect``, in the tile's
    coordinates: whole objects keep their polygons (shifted), cut ones are clipped (their
    visible part traced again; a box-only one's box clipped); None for a piece under
    ``min_visible_fraction`` of the object."""
    from scoring.encode import mask_polygons

    x0, y0, x1, y1 = rect
    bx, by, bw, bh = instance.bbox()
    if bx >= x1 or by >= y1 or bx + bw <= x0 or by + bh <= y0:
        return None
    if not instance.has_mask:  # object detection: the box clipped to the tile, kept as a box
        cx0, cy0, cx1, cy1 = max(bx, x0), max(by, y0), min(bx + bw, x1), min(by + bh, y1)
        if (cx1 - cx0) * (cy1 - cy0) < min_visible_fraction * bw * bh:
            return None
        return Instance.boxed(instance.label, (cx0 - x0, cy0 - y0, cx1 - cx0, cy1 - cy0), instance.iscrowd)
    inside = bx >= x0 and by >= y0 and bx + bw <= x1 and by + bh <= y1
    if inside and instance.rle is None:
        polygons = [(np.asarray(s, dtype=np.float64).reshape(-1, 2) - (x0, y0)).ravel().tolist()
                    for s in instance.polygons]
        return Instance(instance.label, polygons, instance.iscrowd)
    piece = _rasterized(instance, rect, image_hw)
    visible = int(piece.sum())
    total = instance.area(*image_hw)
    if visible == 0 or visible < min_visible_fraction * total:
        return None
    polygons = [p.ravel().astype(float).tolist() for p in mask_polygons(piece, POLYGON_TOLERANCE)]
    rle = None
    if instance.rle is not None or not polygons:
        encoded = mask_utils.encode(np.asfortranarray(piece, dtype=np.uint8))
        rle = {"size": [int(v) for v in encoded["size"]], "counts": encoded["counts"].decode("ascii")}
    return Instance(instance.label, polygons, instance.iscrowd, rle)


def tile_record(record: ImageRecord, image: np.ndarray, tiling: TrainingTiles,
                folder: Path) -> list[ImageRecord]:
    """The tiles of one picture that show an object, written into ``folder`` (mmdet drops
    pictures without objects from training anyway)."""
    height, width = image.shape[:2]
    suffix = ".png" if record.path.suffix.lower() == ".png" else ".jpg"
    out = []
    rects = tile_geometry.tile_rectangles(width, height, tiling.grid, tiling.overlap)
    if len(rects) == 1:  # the grid clipped to one tile: the picture itself
        return []
    for number, rect in enumerate(rects):
        instances = [piece for piece in (clip_instance(inst, rect, (height, width),
                                                       tiling.min_visible_fraction)
                                         for inst in record.instances) if piece is not None]
        if not any(not inst.iscrowd for inst in instances):
            continue
        x0, y0, x1, y1 = rect
        params = [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY] if suffix == ".jpg" else []
        ok, encoded = cv2.imencode(suffix, image[y0:y1, x0:x1], params)
        if not ok:
            raise FinetuneError(f"could not encode tile {number} of {record.path}")
        path = folder / f"{record.path.stem}.tile{number:02d}{suffix}"
        atomic_write_bytes(path, encoded.tobytes())
        out.append(ImageRecord(path=path, width=x1 - x0, height=y1 - y0, instances=instances))
    return out


def tile_dataset(dataset: Dataset, tiling: TrainingTiles, folder: Path,
                 progress: bool = True) -> Dataset:
    """``dataset`` with every picture's tiles (and, with ``keep_whole``, the picture itself),
    the tile images written to ``folder``; image ids are renumbered (tiles are new pictures)."""
    from tqdm import tqdm

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    records: list[ImageRecord] = []
    seen: dict[str, int] = {}
    for record in tqdm(dataset.images, desc="tiles", unit="img", file=sys.stderr,
                       disable=None if progress else True):
        image = cv2.imread(str(record.path), cv2.IMREAD_COLOR)
        if image is None:
            raise FinetuneError(f"{record.path}: cannot read the picture to cut it into tiles")
        if tiling.keep_whole:
            records.append(ImageRecord(record.path, record.width, record.height, record.instances))
        # two pictures of one name in different folders get tiles of different names
        stem = record.path.stem
        seen[stem] = seen.get(stem, 0) + 1
        target = folder if seen[stem] == 1 else folder / f"{seen[stem]}"
        target.mkdir(parents=True, exist_ok=True)
        records.extend(tile_record(record, image, tiling, target))
    for number, record in enumerate(records, start=1):
        record.image_id = number
    return Dataset(images=records, classes=list(dataset.classes), category_ids=dataset.category_ids,
                   task=dataset.task)
