"""Azure AutoML image JSON lines: one image per line, each label an instance-segmentation
polygon or an object-detection box (topX, topY, bottomX, bottomY), normalized by the image's
width and height."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from mmdet_mlflow.data.dataset import (INSTANCE_SEGMENTATION, OBJECT_DETECTION, Dataset, ImageRecord, Instance,
                                       mixing_problem)
from mmdet_mlflow.data.paths import OutsideDataFolder, image_path, path_text
from mmdet_mlflow.data.problems import DataError, Problems
from mmdet_mlflow.data.validation import (NORMALIZED_TOLERANCE, check_box, check_labels, check_polygons,
                                          checked_size, stated_size)
from mmdet_mlflow.files import atomic_write_text

# Normalized coordinates written to JSONL: 1e-7 is under 0.001 px on a 10,000-pixel side.
JSONL_DECIMALS = 7
BOX_FIELDS = ("topX", "topY", "bottomX", "bottomY")   # an object-detection label's box edges


def load_jsonl_files(files: list[Path], classes, validate: bool, source, confine_images: bool = False) -> Dataset:
    problems = Problems()
    located: list[tuple[str, ImageRecord]] = []   # ("file:line", record)
    kinds: list[tuple[str, str]] = []               # ("file:line: label[j]", task) of every label
    for file in files:
        located.extend(_read_jsonl(file, problems, validate, confine_images, kinds))
    _check_one_task(kinds, problems)
    problems.raise_if_any(source)
    if not located:
        raise DataError(f"{source}: no images (no JSON lines with an image_url)")
    images = [record for _, record in located]
    labels = sorted({inst.label for rec in images for inst in rec.instances})
    dataset = Dataset(images=images, classes=list(classes) if classes is not None else labels,
                      task=kinds[0][1] if kinds else None)
    check_labels(dataset, problems, lambda i, j: f"{located[i][0]}: label[{j}].label")
    problems.raise_if_any(source)
    return dataset


def _check_one_task(kinds: list[tuple[str, str]], problems: Problems) -> None:
    """The first label of the other task than the first label's is a problem (one, not one per
    label: which of the two kinds is the mistake is the user's to say)."""
    for where, task in kinds[1:]:
        if task != kinds[0][1]:
            others = sum(1 for _, t in kinds if t == task)
            problems.items.append(f"{where}: {mixing_problem(task, kinds[0][1], kinds[0][0])} "
                                  f"({others} of {len(kinds)} labels are like this one)")
            return


def _label_task(obj: dict) -> str | None:
    """An AutoML label's task by its keys: a polygon (instance segmentation, whatever box it
    also carries), else a box (object detection); None for neither."""
    if "polygon" in obj:
        return INSTANCE_SEGMENTATION
    if any(key in obj for key in BOX_FIELDS):
        return OBJECT_DETECTION
    return None


def _read_jsonl(file: Path, problems: Problems, validate: bool, confine_images: bool,
                kinds: list[tuple[str, str]]):
    located = []
    with open(file, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{file}:{line_no}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                problems.add(where, "line", f"not valid JSON ({err.msg} at column {err.colno})")
                continue
            record = _jsonl_record(row, where, file.parent, problems, validate, confine_images, kinds)
            if record is not None:
                located.append((where, record))
    return located


def _jsonl_record(row, where: str, folder: Path, problems: Problems, validate: bool, confine_images: bool,
                  kinds: list[tuple[str, str]]):
    if not isinstance(row, dict):
        problems.add(where, "line", "expected a JSON object")
        return None
    url = row.get("image_url")
    if not isinstance(url, str) or not url.strip():
        problems.add(where, "image_url", "missing or empty")
        return None
    try:
        path = image_path(url, folder, confine_images)
    except OutsideDataFolder as err:
        problems.add(where, "image_url", str(err))
        return None
    details = row.get("image_details") or {}
    if not isinstance(details, dict):
        problems.add(where, "image_details", "expected an object with format, width, height")
        details = {}
    stated = stated_size(details, where, problems)
    size = checked_size(path, stated, where, "image_url", "image_details.width/height", problems, validate)
    labels = row.get("label", [])
    if labels is None:
        labels = []
    if not isinstance(labels, list):
        problems.add(where, "label", "expected a list of objects")
        return None
    if size is None:
        return None
    width, height = size
    instances = []
    for j, obj in enumerate(labels):
        fld = f"label[{j}]"
        if not isinstance(obj, dict):
            problems.add(where, fld, "expected an object with label, isCrowd and polygon (instance "
                                     "segmentation) or topX, topY, bottomX, bottomY (object detection)")
            continue
        name = obj.get("label")
        named = isinstance(name, str) and bool(name.strip())
        if not named:
            problems.add(where, f"{fld}.label", "missing or empty")
        task = _label_task(obj)
        if task is None:
            problems.add(where, fld, "no polygon (instance segmentation) and no topX, topY, bottomX, "
                                     "bottomY (object detection)")
            continue
        kinds.append((f"{where}: {fld}", task))
        instance = _instance(obj, task, where, fld, (width, height), problems)
        if instance is not None and named:
            instances.append(instance)
    return ImageRecord(path=path, width=width, height=height, instances=instances)


def _instance(obj: dict, task: str, where: str, fld: str, size, problems: Problems) -> Instance | None:
    """One label in pixels, or None after recording its problems (its name is checked apart)."""
    scale = np.array(size, dtype=np.float64)
    iscrowd = bool(obj.get("isCrowd", 0))
    if task == OBJECT_DETECTION:
        box = check_box([(f"{fld}.{key}", obj.get(key)) for key in BOX_FIELDS], where, problems,
                        high=(1.0, 1.0), tolerance=NORMALIZED_TOLERANCE)
        if box is None:
            return None
        x0, y0, x1, y1 = (np.asarray(box).reshape(2, 2) * scale).ravel().tolist()
        return Instance.boxed(obj.get("label"), (x0, y0, x1 - x0, y1 - y0), iscrowd)
    polygons = check_polygons(obj.get("polygon"), where, f"{fld}.polygon", problems,
                              low=(0.0, 0.0), high=(1.0, 1.0), tolerance=NORMALIZED_TOLERANCE)
    if polygons is None:
        return None
    pixel = [(np.asarray(s).reshape(-1, 2) * scale).ravel().tolist() for s in polygons]
    return Instance(label=obj.get("label"), polygons=pixel, iscrowd=iscrowd)


def to_jsonl_rows(dataset: Dataset, relative_to: Path | None = None) -> list[dict]:
    """AutoML JSONL records, normalized: instance segmentation's polygons (an RLE instance gets
    its traced outline), object detection's boxes."""
    rows = []
    for record in dataset.images:
        scale = np.array([record.width, record.height], dtype=np.float64)
        labels = [_label(inst, scale) for inst in record.instances]
        suffix = record.path.suffix.lower().lstrip(".")
        rows.append({"image_url": path_text(record.path, relative_to),
                     "image_details": {"format": "jpg" if suffix == "jpeg" else suffix,
                                       "width": record.width, "height": record.height},
                     "label": labels})
    return rows


def _label(inst: Instance, scale: np.ndarray) -> dict:
    def normalized(points) -> list[float]:
        points = np.asarray(points, dtype=np.float64).reshape(-1, 2) / scale
        return np.round(np.clip(points, 0, 1), JSONL_DECIMALS).ravel().tolist()

    if not inst.has_mask:
        x, y, w, h = inst.bbox()
        return {"label": inst.label, **dict(zip(BOX_FIELDS, normalized([x, y, x + w, y + h]))),
                "isCrowd": int(inst.iscrowd)}
    return {"label": inst.label, "isCrowd": int(inst.iscrowd),
            "polygon": [normalized(s) for s in inst.outline()]}


def write_jsonl(dataset: Dataset, path) -> Path:
    """AutoML JSONL; image_url relative to its folder when the images are below it."""
    path = Path(path).absolute()
    rows = to_jsonl_rows(dataset, relative_to=path.parent)
    atomic_write_text(path, "".join(json.dumps(row) + "\n" for row in rows))
    return path
