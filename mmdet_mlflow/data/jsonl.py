"""Azure AutoML image instance-segmentation JSON lines: one image per line, polygons normalized
by the image's width and height."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from mmdet_mlflow.data.dataset import Dataset, ImageRecord, Instance
from mmdet_mlflow.data.paths import OutsideDataFolder, image_path, path_text
from mmdet_mlflow.data.problems import DataError, Problems
from mmdet_mlflow.data.validation import (NORMALIZED_TOLERANCE, check_labels, check_polygons,
                                          checked_size, stated_size)
from mmdet_mlflow.files import atomic_write_text

# Normalized coordinates written to JSONL: 1e-7 is under 0.001 px on a 10,000-pixel side.
JSONL_DECIMALS = 7


def load_jsonl_files(files: list[Path], classes, validate: bool, source, confine_images: bool = False) -> Dataset:
    problems = Problems()
    located: list[tuple[str, ImageRecord]] = []   # ("file:line", record)
    for file in files:
        located.extend(_read_jsonl(file, problems, validate, confine_images))
    problems.raise_if_any(source)
    if not located:
        raise DataError(f"{source}: no images (no JSON lines with an image_url)")
    images = [record for _, record in located]
    labels = sorted({inst.label for rec in images for inst in rec.instances})
    dataset = Dataset(images=images, classes=list(classes) if classes is not None else labels)
    check_labels(dataset, problems, lambda i, j: f"{located[i][0]}: label[{j}].label")
    problems.raise_if_any(source)
    return dataset


def _read_jsonl(file: Path, problems: Problems, validate: bool, confine_images: bool):
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
            record = _jsonl_record(row, where, file.parent, problems, validate, confine_images)
            if record is not None:
                located.append((where, record))
    return located


def _jsonl_record(row, where: str, folder: Path, problems: Problems, validate: bool, confine_images: bool):
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
            problems.add(where, fld, "expected an object with label, isCrowd, polygon")
            continue
        name = obj.get("label")
        named = isinstance(name, str) and bool(name.strip())
        if not named:
            problems.add(where, f"{fld}.label", "missing or empty")
        polygons = check_polygons(obj.get("polygon"), where, f"{fld}.polygon", problems,
                                  low=(0.0, 0.0), high=(1.0, 1.0), tolerance=NORMALIZED_TOLERANCE)
        if polygons is None or not named:
            continue
        scale = np.array([width, height], dtype=np.float64)
        pixel = [(np.asarray(s).reshape(-1, 2) * scale).ravel().tolist() for s in polygons]
        instances.append(Instance(label=name, polygons=pixel, iscrowd=bool(obj.get("isCrowd", 0))))
    return ImageRecord(path=path, width=width, height=height, instances=instances)


def to_jsonl_rows(dataset: Dataset, relative_to: Path | None = None) -> list[dict]:
    """AutoML JSONL records (polygons normalized; an RLE instance gets its traced outline)."""
    rows = []
    for record in dataset.images:
        scale = np.array([record.width, record.height], dtype=np.float64)
        labels = [{"label": inst.label, "isCrowd": int(inst.iscrowd),
                   "polygon": [np.round(np.clip(np.asarray(s, dtype=np.float64).reshape(-1, 2) / scale, 0, 1),
                                        JSONL_DECIMALS).ravel().tolist() for s in inst.outline()]}
                  for inst in record.instances]
        suffix = record.path.suffix.lower().lstrip(".")
        rows.append({"image_url": path_text(record.path, relative_to),
                     "image_details": {"format": "jpg" if suffix == "jpeg" else suffix,
                                       "width": record.width, "height": record.height},
                     "label": labels})
    return rows


def write_jsonl(dataset: Dataset, path) -> Path:
    """AutoML JSONL; image_url relative to its folder when the images are below it."""
    path = Path(path).absolute()
    rows = to_jsonl_rows(dataset, relative_to=path.parent)
    atomic_write_text(path, "".join(json.dumps(row) + "\n" for row in rows))
    return path
