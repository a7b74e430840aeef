"""Instance-segmentation datasets: Azure AutoML JSONL, MLTable folders and COCO JSON, read into
one in-memory form (pixel polygons), validated before training and written back in any format.

Image paths:
- relative paths resolve against the folder of the annotation file that names them (for an
  MLTable, the folder of the JSONL file it points at);
- a datastore URI (``azureml://.../paths/fridge/images/1.jpg``, ``AmlDatastore://store/fridge/
  images/1.jpg``, any ``scheme://`` URL) is never fetched: its path is looked up locally under
  the annotation folder, longest suffix first (``fridge/images/1.jpg``, then ``images/1.jpg``,
  then ``1.jpg``); the first that exists wins, else the longest is reported missing.
"""
from __future__ import annotations

import json
import math
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np

MAX_REPORTED_PROBLEMS = 20
# JSONL values this far outside 0..1 (float noise from other tools) are clipped, not refused.
NORMALIZED_TOLERANCE = 1e-6
# COCO polygons may overshoot the image by up to a pixel (annotation tools round outward).
PIXEL_TOLERANCE = 1.0
# Normalized coordinates written to JSONL: 1e-7 is under 0.001 px on a 10,000-pixel side.
JSONL_DECIMALS = 7
MLTABLE_FILE = "MLTable"


class DataError(ValueError):
    """Bad training/evaluation data. The message lists every problem found (up to
    ``MAX_REPORTED_PROBLEMS``), each naming the file, the line (JSONL) or record (COCO) and the
    field; ``problems`` holds them all."""

    def __init__(self, problems: list[str] | str, source: str | Path | None = None):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        shown = self.problems[:MAX_REPORTED_PROBLEMS]
        if len(self.problems) == 1:
            message = shown[0]
        else:
            lines = [f"{len(self.problems)} problems" + (f" in {source}:" if source else ":")]
            lines += [f"  {p}" for p in shown]
            if len(self.problems) > len(shown):
                lines.append(f"  ... and {len(self.problems) - len(shown)} more")
            message = "\n".join(lines)
        super().__init__(message)


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
            from pycocotools import mask as mask_utils

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
        from pycocotools import mask as mask_utils

        if self.rle is not None:
            rle = dict(self.rle)
            rle["counts"] = rle["counts"].encode() if isinstance(rle["counts"], str) else rle["counts"]
            return float(mask_utils.area(rle))
        rles = mask_utils.frPyObjects([list(map(float, s)) for s in self.polygons], height, width)
        return float(mask_utils.area(mask_utils.merge(rles)))


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


# --------------------------------------------------------------------------------------------
# Reading


class _Problems:
    """Collects problems instead of stopping at the first, so one run shows them all."""

    def __init__(self):
        self.items: list[str] = []

    def add(self, where: str, fld: str, problem: str):
        self.items.append(f"{where}: {fld}: {problem}")

    def raise_if_any(self, source):
        if self.items:
            raise DataError(self.items, source)


def load_dataset(path, classes: list[str] | None = None, validate: bool = True) -> Dataset:
    """Read AutoML JSONL, an MLTable folder (or its ``MLTable`` file) or COCO instances JSON,
    told apart by content. ``classes`` fixes the class order (and refuses other labels); by
    default COCO's category order, or the sorted unique labels of JSONL. ``validate`` also opens
    every image (header only) to check it exists, decodes and has the stated size; the
    annotation checks (labels, polygons) always run. Raises ``DataError`` listing all problems."""
    path = Path(path).expanduser().absolute()
    if path.is_dir() or path.name == MLTABLE_FILE:
        return _load_jsonl_files(_mltable_jsonl_paths(path), classes, validate, source=path)
    if not path.is_file():
        raise DataError(f"{path}: no such file or folder")
    kind = _sniff(path)
    if kind == "coco":
        return _load_coco(path, classes, validate)
    return _load_jsonl_files([path], classes, validate, source=path)


def _sniff(path: Path) -> str:
    """'coco' for a JSON document with ``images``, else 'jsonl'."""
    if path.suffix.lower() == ".jsonl":
        return "jsonl"
    with open(path, "rb") as f:
        head = f.read(1 << 16)
    text = head.decode("utf-8", errors="replace").lstrip()
    if not text.startswith("{"):
        raise DataError(f"{path}: line 1: not JSON (expected a COCO JSON object or JSON lines)")
    first_line = text.split("\n", 1)[0]
    try:
        first = json.loads(first_line)
        # A one-line JSON document is JSONL if it looks like an AutoML record.
        return "jsonl" if isinstance(first, dict) and "image_url" in first else "coco"
    except json.JSONDecodeError:
        return "coco"  # a multi-line (pretty-printed) JSON document


def _mltable_jsonl_paths(path: Path) -> list[Path]:
    """The JSONL files an MLTable reads (``paths``: file / folder / pattern entries)."""
    import yaml

    table = path / MLTABLE_FILE if path.is_dir() else path
    folder = table.parent
    if not table.is_file():
        raise DataError(f"{folder}: folder has no {MLTABLE_FILE} file (expected an MLTable folder)")
    try:
        spec = yaml.safe_load(table.read_text())
    except yaml.YAMLError as err:
        raise DataError(f"{table}: not valid YAML: {err}") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("paths"), list) or not spec["paths"]:
        raise DataError(f"{table}: paths: missing or empty (expected '- file: ./train.jsonl')")
    transformations = spec.get("transformations") or []
    kinds = [next(iter(t)) if isinstance(t, dict) else t for t in transformations]
    if "read_json_lines" not in kinds:
        raise DataError(f"{table}: transformations: no read_json_lines (only JSON lines MLTables "
                        f"hold image annotations), found {kinds or 'none'}")
    files: list[Path] = []
    for i, entry in enumerate(spec["paths"]):
        if not isinstance(entry, dict) or len(entry) != 1:
            raise DataError(f"{table}: paths[{i}]: expected one of file/folder/pattern, got {entry!r}")
        kind, value = next(iter(entry.items()))
        local = _local_path(str(value), folder)
        if kind == "file":
            files.append(local)
        elif kind == "folder":
            files.extend(sorted(local.glob("*.jsonl")))
        elif kind == "pattern":
            files.extend(sorted(folder.glob(str(value))) if not Path(str(value)).is_absolute()
                         else sorted(Path("/").glob(str(value).lstrip("/"))))
        else:
            raise DataError(f"{table}: paths[{i}]: unknown kind {kind!r} (file, folder or pattern)")
    missing = [str(f) for f in files if not f.is_file()]
    if missing or not files:
        raise DataError(f"{table}: paths: " + (f"file not found: {', '.join(missing)}" if missing
                                                 else "matches no JSONL file"))
    return files


_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+://")


def resolve_image_path(value: str, folder: Path) -> Path:
    """An annotation's image reference -> an absolute local path (see the module docstring)."""
    return _local_path(value, folder)


def _local_path(value: str, folder: Path) -> Path:
    if value.startswith("file://"):
        return Path(unquote(urlparse(value).path))
    if _URI.match(value):
        parsed = urlparse(value)
        remote = unquote(parsed.path)
        if "/paths/" in remote:               # azureml://[...]/datastores/<store>/paths/<path>
            remote = remote.split("/paths/", 1)[1]
        parts = [p for p in remote.split("/") if p]
        candidates = [folder.joinpath(*parts[i:]) for i in range(len(parts))]
        candidates = [Path(os.path.normpath(c)) for c in candidates]
        for candidate in candidates:
            if candidate.exists():
                return candidate
        return candidates[0] if candidates else folder
    path = Path(value).expanduser()
    # normpath, not resolve: "train/../images/1.jpg" -> "images/1.jpg", symlinks left alone
    return Path(os.path.normpath(path if path.is_absolute() else folder / path))


def _load_jsonl_files(files: list[Path], classes, validate: bool, source) -> Dataset:
    problems = _Problems()
    located: list[tuple[str, ImageRecord]] = []   # ("file:line", record)
    for file in files:
        located.extend(_read_jsonl(file, problems, validate))
    problems.raise_if_any(source)
    if not located:
        raise DataError(f"{source}: no images (no JSON lines with an image_url)")
    images = [record for _, record in located]
    labels = sorted({inst.label for rec in images for inst in rec.instances})
    dataset = Dataset(images=images, classes=list(classes) if classes is not None else labels)
    _check_labels(dataset, problems, lambda i, j: f"{located[i][0]}: label[{j}].label")
    problems.raise_if_any(source)
    return dataset


def _read_jsonl(file: Path, problems: _Problems, validate: bool) -> list[tuple[str, ImageRecord]]:
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
            record = _jsonl_record(row, where, file.parent, problems, validate)
            if record is not None:
                located.append((where, record))
    return located


def _jsonl_record(row, where: str, folder: Path, problems: _Problems, validate: bool):
    if not isinstance(row, dict):
        problems.add(where, "line", "expected a JSON object")
        return None
    url = row.get("image_url")
    if not isinstance(url, str) or not url.strip():
        problems.add(where, "image_url", "missing or empty")
        return None
    path = _local_path(url, folder)
    details = row.get("image_details") or {}
    if not isinstance(details, dict):
        problems.add(where, "image_details", "expected an object with format, width, height")
        details = {}
    stated = _stated_size(details, where, problems)
    actual = _image_size(path, where, "image_url", problems) if (validate or stated is None) else None
    if validate and stated is not None and actual is not None and stated != actual:
        problems.add(where, "image_details.width/height",
                     f"say {stated[0]}x{stated[1]} but {path} is {actual[0]}x{actual[1]}")
    size = actual or stated
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
        polygons = _check_polygons(obj.get("polygon"), where, f"{fld}.polygon", problems,
                                   low=(0.0, 0.0), high=(1.0, 1.0), tolerance=NORMALIZED_TOLERANCE)
        if polygons is None or not named:
            continue
        scale = np.array([width, height], dtype=np.float64)
        pixel = [(np.asarray(s).reshape(-1, 2) * scale).ravel().tolist() for s in polygons]
        instances.append(Instance(label=name, polygons=pixel, iscrowd=bool(obj.get("isCrowd", 0))))
    return ImageRecord(path=path, width=width, height=height, instances=instances)


def _stated_size(details: dict, where: str, problems: _Problems):
    width, height = details.get("width"), details.get("height")
    if width is None and height is None:
        return None
    ok = all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 and float(v).is_integer()
             for v in (width, height))
    if not ok:
        problems.add(where, "image_details.width/height", f"expected positive integers, got {width!r}, {height!r}")
        return None
    return int(width), int(height)


def _image_size(path: Path, where: str, fld: str, problems: _Problems):
    """(width, height) from the image header, or None after recording why not."""
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        problems.add(where, fld, f"image file not found: {path}")
        return None
    try:
        with Image.open(path) as image:
            size = image.size
            image.verify()  # structural check (PNG CRCs etc.) without decoding pixels
        return size
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        problems.add(where, fld, f"cannot decode image {path}: {err}")
        return None


def _check_polygons(value, where: str, fld: str, problems: _Problems, low, high, tolerance):
    """Validated segments (clipped within ``tolerance``), or None after recording problems."""
    if not isinstance(value, list) or not value:
        problems.add(where, fld, "missing or empty (expected [[x0, y0, x1, y1, ...], ...])")
        return None
    segments, ok = [], True
    for k, seg in enumerate(value):
        sfld = f"{fld}[{k}]"
        if not isinstance(seg, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                and math.isfinite(v) for v in seg):
            problems.add(where, sfld, "expected a list of numbers")
            ok = False
            continue
        if len(seg) % 2:
            problems.add(where, sfld, f"odd number of values ({len(seg)}): expected x, y pairs")
            ok = False
            continue
        if len(seg) < 6:
            problems.add(where, sfld, f"{len(seg) // 2} point(s): a polygon needs at least 3")
            ok = False
            continue
        points = np.asarray(seg, dtype=np.float64).reshape(-1, 2)
        lo, hi = np.asarray(low) - tolerance, np.asarray(high) + tolerance
        if (points < lo).any() or (points > hi).any():
            bad = points[((points < lo) | (points > hi)).any(axis=1)][0]
            problems.add(where, sfld, f"point ({bad[0]:g}, {bad[1]:g}) is outside "
                                      f"{_range_text(low, high)}")
            ok = False
            continue
        segments.append(np.clip(points, low, high).ravel().tolist())
    return segments if ok else None


def _range_text(low, high) -> str:
    if tuple(high) == (1.0, 1.0):
        return "0..1 (AutoML polygons are normalized by the image width and height)"
    return f"the image (0..{high[0]:g} x 0..{high[1]:g} pixels)"


def _check_labels(dataset: Dataset, problems: _Problems, where_field):
    known = set(dataset.classes)
    if len(known) != len(dataset.classes):
        problems.add("classes", "classes", f"duplicate class names in {dataset.classes}")
    for i, record in enumerate(dataset.images):
        for j, inst in enumerate(record.instances):
            if inst.label not in known:
                problems.items.append(f"{where_field(i, j)}: unknown label {inst.label!r} "
                                      f"(classes: {', '.join(dataset.classes)})")


def _load_coco(path: Path, classes, validate: bool) -> Dataset:
    from pycocotools import mask as mask_utils

    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: not valid JSON: {err}") from None
    problems = _Problems()
    where = str(path)
    for key in ("images", "annotations", "categories"):
        if not isinstance(doc.get(key), list):
            problems.add(where, key, "missing or not a list (expected COCO instances JSON)")
    problems.raise_if_any(path)

    category_ids, names, broken_categories = [], [], set()
    for i, cat in enumerate(doc["categories"]):
        if not isinstance(cat, dict) or not isinstance(cat.get("id"), int):
            problems.add(f"{where}: categories[{i}]", "id", f"expected an integer id, got {cat!r}")
            continue
        if not isinstance(cat.get("name"), str) or not cat["name"].strip():
            problems.add(f"{where}: categories[{i}]", "name", f"missing or empty (id {cat['id']})")
            broken_categories.add(cat["id"])   # its annotations are not reported again
            continue
        if cat["id"] in category_ids:
            problems.add(f"{where}: categories[{i}]", "id", f"duplicate category id {cat['id']}")
            continue
        category_ids.append(cat["id"])
        names.append(cat["name"])
    name_of = dict(zip(category_ids, names))

    records: dict[int, ImageRecord] = {}
    folder = path.parent
    for i, image in enumerate(doc["images"]):
        fld = f"images[{i}]"
        if not isinstance(image, dict) or not isinstance(image.get("id"), int) \
                or not isinstance(image.get("file_name"), str) or not image["file_name"]:
            problems.add(f"{where}: {fld}", "id/file_name", "expected an integer id and a file_name")
            continue
        iwhere = f"{where}: {fld} (id {image['id']})"
        if image["id"] in records:
            problems.add(iwhere, "id", "duplicate image id")
            continue
        file = _local_path(image["file_name"], folder)
        stated = _stated_size(image, iwhere, problems)
        actual = _image_size(file, iwhere, "file_name", problems) if (validate or stated is None) else None
        if validate and stated is not None and actual is not None and stated != actual:
            problems.add(iwhere, "width/height", f"say {stated[0]}x{stated[1]} but {file} is "
                                                 f"{actual[0]}x{actual[1]}")
        size = actual or stated
        if size is None:
            continue
        records[image["id"]] = ImageRecord(path=file, width=size[0], height=size[1], instances=[],
                                           image_id=image["id"])

    from scoring.encode import mask_polygons

    for i, ann in enumerate(doc["annotations"]):
        fld = f"annotations[{i}]"
        if not isinstance(ann, dict):
            problems.add(where, fld, "expected an object")
            continue
        awhere = f"{where}: {fld}" + (f" (id {ann['id']})" if "id" in ann else "")
        record = records.get(ann.get("image_id"))
        if record is None:
            if not any(isinstance(im, dict) and im.get("id") == ann.get("image_id") for im in doc["images"]):
                problems.add(awhere, "image_id", f"no image with id {ann.get('image_id')!r}")
            continue
        if ann.get("category_id") in broken_categories:
            continue
        if ann.get("category_id") not in name_of:
            problems.add(awhere, "category_id", f"no category with id {ann.get('category_id')!r}")
            continue
        seg = ann.get("segmentation")
        iscrowd = bool(ann.get("iscrowd", 0))
        if isinstance(seg, dict):
            try:
                rle = _compressed_rle(seg, record.height, record.width)
            except (KeyError, TypeError, ValueError) as err:
                problems.add(awhere, "segmentation", f"invalid RLE: {err}")
                continue
            mask = mask_utils.decode(rle).astype(bool)
            if not mask.any():
                problems.add(awhere, "segmentation", "RLE mask is empty")
                continue
            polygons = [p.ravel().astype(float).tolist() for p in mask_polygons(mask, 0)]
            instance = Instance(label=name_of[ann["category_id"]], polygons=polygons, iscrowd=iscrowd,
                                rle={"size": list(rle["size"]), "counts": rle["counts"].decode()})
        else:
            segments = _check_polygons(seg, awhere, "segmentation", problems, low=(0.0, 0.0),
                                       high=(float(record.width), float(record.height)),
                                       tolerance=PIXEL_TOLERANCE)
            if segments is None:
                continue
            instance = Instance(label=name_of[ann["category_id"]], polygons=segments, iscrowd=iscrowd)
        record.instances.append(instance)
    problems.raise_if_any(path)
    if not records:
        raise DataError(f"{path}: images: no images")

    dataset = Dataset(images=list(records.values()), classes=names, category_ids=category_ids)
    if classes is not None:
        dataset = _with_classes(dataset, list(classes), path)
    return dataset


def _with_classes(dataset: Dataset, classes: list[str], source) -> Dataset:
    """The same COCO data in the given class order; labels outside ``classes`` are refused.
    Category ids follow the names they belonged to (new names get ids after the largest)."""
    problems = _Problems()
    id_of = dict(zip(dataset.classes, dataset.coco_category_ids()))
    for i, record in enumerate(dataset.images):
        for j, inst in enumerate(record.instances):
            if inst.label not in classes:
                problems.items.append(f"{source}: image id {record.image_id} ({record.path.name}), "
                                      f"annotation {j}: category: unknown label {inst.label!r} "
                                      f"(classes: {', '.join(classes)})")
    problems.raise_if_any(source)
    next_id = max(id_of.values(), default=0) + 1
    ids = []
    for name in classes:
        if name not in id_of:
            id_of[name], next_id = next_id, next_id + 1
        ids.append(id_of[name])
    return Dataset(images=dataset.images, classes=classes, category_ids=ids)


def _compressed_rle(seg: dict, height: int, width: int) -> dict:
    from pycocotools import mask as mask_utils

    size = list(seg["size"])
    if size != [height, width]:
        raise ValueError(f"size {size} differs from the image's [height, width] [{height}, {width}]")
    if isinstance(seg["counts"], list):       # uncompressed RLE
        return mask_utils.frPyObjects(seg, height, width)
    counts = seg["counts"].encode() if isinstance(seg["counts"], str) else seg["counts"]
    return {"size": size, "counts": counts}


# --------------------------------------------------------------------------------------------
# Writing


def to_coco(dataset: Dataset, relative_to: Path | None = None) -> dict:
    """COCO instances dict. Image ids are kept when every image has one, else 1..N; category ids
    are kept when read from COCO, else 1..K; annotation ids are 1..M. ``file_name`` is the
    absolute path, or relative to ``relative_to`` for images under that folder."""
    keep_ids = all(r.image_id is not None for r in dataset.images) and \
        len({r.image_id for r in dataset.images}) == len(dataset.images)
    category_of = dict(zip(dataset.classes, dataset.coco_category_ids()))
    images, annotations = [], []
    for n, record in enumerate(dataset.images, 1):
        image_id = record.image_id if keep_ids else n
        images.append({"id": image_id, "file_name": _path_text(record.path, relative_to),
                       "width": record.width, "height": record.height})
        for inst in record.instances:
            if inst.label not in category_of:
                raise DataError(f"image {record.path}: label {inst.label!r} is not one of the "
                                f"dataset's classes {dataset.classes}")
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id,
                "category_id": category_of[inst.label],
                "segmentation": inst.coco_segmentation(),
                "area": inst.area(record.height, record.width),
                "bbox": list(inst.bbox()), "iscrowd": int(inst.iscrowd)})
    categories = [{"id": cid, "name": name} for name, cid in category_of.items()]
    # "info" is optional in COCO, but pycocotools 2.0.10's loadRes (mmdet's CocoMetric, our
    # evaluation) fails without it.
    return {"info": {"description": "written by mmdet-mlflow"}, "images": images,
            "annotations": annotations, "categories": categories}


def to_jsonl_rows(dataset: Dataset, relative_to: Path | None = None) -> list[dict]:
    """AutoML JSONL records (polygons normalized; an RLE instance gets its traced outline)."""
    rows = []
    for record in dataset.images:
        scale = np.array([record.width, record.height], dtype=np.float64)
        labels = [{"label": inst.label, "isCrowd": int(inst.iscrowd),
                   "polygon": [np.round(np.clip(np.asarray(s, dtype=np.float64).reshape(-1, 2) / scale, 0, 1),
                                        JSONL_DECIMALS).ravel().tolist() for s in _outline(inst)]}
                  for inst in record.instances]
        suffix = record.path.suffix.lower().lstrip(".")
        rows.append({"image_url": _path_text(record.path, relative_to),
                     "image_details": {"format": "jpg" if suffix == "jpeg" else suffix,
                                       "width": record.width, "height": record.height},
                     "label": labels})
    return rows


def _outline(inst: Instance) -> list[list[float]]:
    """Polygons for formats that only hold polygons (outer outlines: holes are not kept). An RLE
    mask too small to trace (a pixel or two) becomes its box."""
    if inst.polygons:
        return inst.polygons
    x, y, w, h = inst.bbox()
    return [[x, y, x + w, y, x + w, y + h, x, y + h]]


def _path_text(path: Path, relative_to: Path | None) -> str:
    if relative_to is not None:
        try:
            return Path(os.path.relpath(path, relative_to)).as_posix() \
                if Path(path).resolve().is_relative_to(Path(relative_to).resolve()) else str(path)
        except ValueError:
            return str(path)
    return str(path)


def _atomic_write(path: Path, text: str):
    """Write via a temporary file + rename: a crash never leaves a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_coco(dataset: Dataset, path) -> Path:
    """COCO JSON; image file names relative to its folder when the images are below it."""
    path = Path(path).absolute()
    _atomic_write(path, json.dumps(to_coco(dataset, relative_to=path.parent)))
    return path


def write_jsonl(dataset: Dataset, path) -> Path:
    """AutoML JSONL; image_url relative to its folder when the images are below it."""
    path = Path(path).absolute()
    rows = to_jsonl_rows(dataset, relative_to=path.parent)
    _atomic_write(path, "".join(json.dumps(row) + "\n" for row in rows))
    return path


def write_mltable(folder, jsonl_path) -> Path:
    """An MLTable folder reading ``jsonl_path`` (referenced relative to the folder) the way
    Azure AutoML expects: read_json_lines, image_url as a stream column."""
    folder = Path(folder).absolute()
    folder.mkdir(parents=True, exist_ok=True)
    relative = Path(os.path.relpath(Path(jsonl_path).absolute(), folder)).as_posix()
    if not relative.startswith("."):
        relative = "./" + relative
    text = ("type: mltable\n"
            "paths:\n"
            f"  - file: {relative}\n"
            "transformations:\n"
            "  - read_json_lines:\n"
            "      encoding: utf8\n"
            "      invalid_lines: error\n"
            "      include_path_column: false\n"
            "  - convert_column_types:\n"
            "      - columns: image_url\n"
            "        column_type: stream_info\n")
    _atomic_write(folder / MLTABLE_FILE, text)
    return folder


def convert(input_path, output_path, classes: list[str] | None = None, validate: bool = True) -> Dataset:
    """Read any supported format and write ``output_path``: ``.jsonl`` -> AutoML JSONL,
    ``.json`` -> COCO, anything else -> an MLTable folder holding ``data.jsonl``."""
    dataset = load_dataset(input_path, classes=classes, validate=validate)
    output = Path(output_path).absolute()
    suffix = output.suffix.lower()
    if suffix == ".jsonl":
        write_jsonl(dataset, output)
    elif suffix == ".json":
        write_coco(dataset, output)
    else:
        jsonl = output / "data.jsonl"
        write_jsonl(dataset, jsonl)
        write_mltable(output, jsonl)
    return dataset


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
