"""The one in-memory form every format is read into: images with their instances, in pixel
polygons (or the exact COCO RLE) for instance segmentation or boxes alone for object detection,
and the class order. A dataset is one task: every instance has a mask, or none has."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pycocotools import mask as mask_utils

from mmdet_mlflow.data.problems import DataError
from scoring.schema import INSTANCE_SEGMENTATION, OBJECT_DETECTION, TASKS  # noqa: F401  (the one place)


@dataclass
class Instance:
    label: str
    # Pixel coordinates, [x0, y0, x1, y1, ...] per segment; None for a box-only instance (object
    # detection), whose ``box`` is then all there is.
    polygons: list[list[float]] | None
    iscrowd: bool = False
    # The exact mask when read from a COCO RLE segmentation ({"size": [h, w], "counts": str});
    # ``polygons`` then holds its traced outline (for JSONL and drawing).
    rle: dict | None = None
    box: tuple[float, float, float, float] | None = None  # x, y, w, h in pixels, box-only instances

    def __post_init__(self):
        if self.polygons is None and self.rle is None and self.box is None:
            raise ValueError(f"instance {self.label!r} has neither a mask nor a box")

    @classmethod
    def boxed(cls, label: str, box, iscrowd: bool = False) -> "Instance":
        """A box-only instance; ``box`` is x, y, w, h in pixels."""
        return cls(label=label, polygons=None, iscrowd=iscrowd, box=tuple(float(v) for v in box))

    @property
    def has_mask(self) -> bool:
        return self.polygons is not None or self.rle is not None

    def box_only(self) -> "Instance":
        """The same object with its mask left out (its box kept): object-detection data."""
        return Instance.boxed(self.label, self.bbox(), self.iscrowd)

    def bbox(self) -> tuple[float, float, float, float]:
        """x, y, w, h in pixels."""
        if not self.has_mask:
            return self.box
        if self.rle is not None:
            return tuple(float(v) for v in mask_utils.toBbox(self.rle))
        points = np.concatenate([np.asarray(s, dtype=np.float64) for s in self.polygons]).reshape(-1, 2)
        x0, y0 = points.min(axis=0)
        x1, y1 = points.max(axis=0)
        return float(x0), float(y0), float(x1 - x0), float(y1 - y0)

    def coco_segmentation(self):
        """COCO ``segmentation``: the RLE as read, else the polygons; None for a box-only instance."""
        if not self.has_mask:
            return None
        return dict(self.rle) if self.rle is not None else [list(map(float, s)) for s in self.polygons]

    def area(self, height: int, width: int) -> float:
        """Mask area in pixels, as pycocotools computes it (what COCOeval uses); the box's area
        for a box-only instance (what COCO files without masks state)."""
        if not self.has_mask:
            return float(self.box[2] * self.box[3])
        if self.rle is not None:
            rle = dict(self.rle)
            rle["counts"] = rle["counts"].encode() if isinstance(rle["counts"], str) else rle["counts"]
            return float(mask_utils.area(rle))
        rles = mask_utils.frPyObjects([list(map(float, s)) for s in self.polygons], height, width)
        return float(mask_utils.area(mask_utils.merge(rles)))

    def outline(self) -> list[list[float]] | None:
        """Polygons for formats that only hold polygons (outer outlines: holes are not kept). An
        RLE mask too small to trace (a pixel or two) becomes its box. None for a box-only instance."""
        if not self.has_mask:
            return None
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
    # INSTANCE_SEGMENTATION (every instance has a mask) or OBJECT_DETECTION (boxes alone). None:
    # told by the instances, and instance segmentation where there are none to tell by.
    task: str | None = None

    def __post_init__(self):
        found = instances_task(self.images)
        if self.task is None:
            self.task = found or INSTANCE_SEGMENTATION
        elif self.task not in TASKS:
            raise ValueError(f"task must be one of {', '.join(TASKS)}, got {self.task!r}")
        elif found is not None and found != self.task:
            raise DataError(f"the dataset's task is {self.task} but its instances are for {found}")

    @property
    def has_masks(self) -> bool:
        return self.task == INSTANCE_SEGMENTATION

    def coco_category_ids(self) -> list[int]:
        return list(self.category_ids) if self.category_ids else list(range(1, len(self.classes) + 1))


def instance_task(instance: Instance) -> str:
    return INSTANCE_SEGMENTATION if instance.has_mask else OBJECT_DETECTION


def instances_task(records: list[ImageRecord]) -> str | None:
    """The task the instances are annotated for; None without instances. Instances of both
    kinds: a DataError naming the first that differs (the readers name its line or record first)."""
    first = None
    for record in records:
        for j, inst in enumerate(record.instances):
            if first is None:
                first = (instance_task(inst), f"{record.path} instance {j}")
            elif instance_task(inst) != first[0]:
                raise DataError(f"{record.path}: instance {j}: "
                                f"{mixing_problem(instance_task(inst), first[0], first[1])}")
    return first[0] if first else None


def mixing_problem(task: str, first_task: str, first_where: str) -> str:
    """Why an instance of ``task`` is refused after ``first_where``'s of ``first_task``."""
    this, first = (("box-only", "has a mask") if task == OBJECT_DETECTION else ("has a mask", "is box-only"))
    return (f"{this}, but {first_where} {first}: a dataset is one task, every instance with a "
            f"mask (instance segmentation) or every one box-only (object detection)")


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
        segments = None if inst.polygons is None else normalized_segments(
            [np.asarray(s, dtype=np.float64).reshape(-1, 2) for s in inst.polygons], size)
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
