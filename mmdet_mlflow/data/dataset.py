"""The one in-memory form every format is read into: images with their instances, in pixel
polygons (or the exact COCO RLE), and the class order."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pycocotools import mask as mask_utils


@dataclass
class Instance:
    label: str
    polygons: list[list[float]]      # pixel coordinates, [x0, y0, x1, y1, ...] per segment
    iscrowd: bool = False
    # The exact mask when read from a COCO RLE segmentation ({"size": [h, w], "counts": str});
    # ``polygons`` then holds its traced outline (for JSONL and drawing).
    rle: dict | None = None

    def bbox(self) -> tuple[float, float, float, float]:
        """x, y, w, h in pixels."""
        if self.rle is not None:
            return tuple(float(v) for v in mask_utils.toBbox(self.rle))
        points = np.concatenate([np.asarray(s, dtype=np.float64) for s in self.polygons]).reshape(-1, 2)
        x0, y0 = points.min(axis=0)
        x1, y1 = points.max(axis=0)
        return float(x0), float(y0), float(x1 - x0), float(y1 - y0)

    def coco_segmentation(self):
        """COCO ``segmentation``: the RLE as read, else the polygons."""
        return dict(self.rle) if self.rle is not None else [list(map(float, s)) for s in self.polygons]

    def area(self, height: int, width: int) -> float:
        """Mask area in pixels, as pycocotools computes it (what COCOeval uses)."""
        if self.rle is not None:
            rle = dict(self.rle)
            rle["counts"] = rle["counts"].encode() if isinstance(rle["counts"], str) else rle["counts"]
            return float(mask_utils.area(rle))
        rles = mask_utils.frPyObjects([list(map(float, s)) for s in self.polygons], height, width)
        return float(mask_utils.area(mask_utils.merge(rles)))

    def outline(self) -> list[list[float]]:
        """Polygons for formats that only hold polygons (outer outlines: holes are not kept). An
        RLE mask too small to trace (a pixel or two) becomes its box."""
        if self.polygons:
            return self.polygons
        x, y, w, h = self.bbox()
        return [[x, y, x + w, y, x + w, y + h, x, y + h]]


@dataclass
class ImageRecord:
    path: Path                       # absolute
    width: int
    height: int
    instances: list[Instance]
    image_id: int | None = None      # the COCO image id when read from COCO, else None


@dataclass
class Dataset:
    images: list[ImageRecord]
    classes: list[str]               # class names in category order
    category_ids: list[int] | None = None  # COCO category ids as read, else None (-> 1..K)

    def coco_category_ids(self) -> list[int]:
        return list(self.category_ids) if self.category_ids else list(range(1, len(self.classes) + 1))


def response_boxes(record: ImageRecord) -> list[dict]:
    """An image's ground truth in the public response format (normalized box and polygons), so
    it is drawn by the same ``visualize.draw_detections`` as predictions. Ground truth has no
    score, so its records carry none (and are drawn with the label alone)."""
    from scoring.encode import normalized_segments
    from scoring.schema import detection_record

    size = (record.width, record.height)
    boxes = []
    for inst in record.instances:
        x, y, w, h = inst.bbox()
        segments = normalized_segments([np.asarray(s, dtype=np.float64).reshape(-1, 2) for s in inst.polygons], size)
        box = detection_record((x, y, x + w, y + h), size, inst.label, 0.0, segments)
        del box["score"]
        boxes.append(box)
    return boxes


def spread_indices(count: int, wanted: int, offset: float = 0.0) -> list[int]:
    """Up to ``wanted`` indices spread evenly over ``range(count)`` (all of them where there are
    no more); ``offset`` (0..1) shifts them within their stride, so that 0.5 picks the images
    between the ones 0 picks: calibration and checking images, sample pictures."""
    if count <= 0 or wanted <= 0:
        return []
    step = max(1.0, count / wanted)
    return sorted({min(count - 1, int((i + offset) * step)) for i in range(min(wanted, count))})
