"""COCO instances JSON: polygons or RLE in pixels (instance segmentation), or boxes alone,
without a ``segmentation`` (object detection); category and image ids kept as read."""
from __future__ import annotations

import json
from pathlib import Path

from pycocotools import mask as mask_utils

from mmdet_mlflow.data.dataset import Dataset, ImageRecord, Instance, instance_task, mixing_problem
from mmdet_mlflow.data.paths import OutsideDataFolder, image_path, path_text
from mmdet_mlflow.data.problems import DataError, Problems
from mmdet_mlflow.data.validation import PIXEL_TOLERANCE, check_box, check_polygons, checked_size, stated_size
from mmdet_mlflow.files import atomic_write_text


def load_coco(path: Path, classes, validate: bool, confine_images: bool = False) -> Dataset:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: not valid JSON: {err}") from None
    problems = Problems()
    where = str(path)
    for key in ("images", "annotations", "categories"):
        if not isinstance(doc.get(key), list):
            problems.add(where, key, "missing or not a list (expected COCO instances JSON)")
    problems.raise_if_any(path)

    name_of, broken_categories = _categories(doc, where, problems)
    records = _images(doc, where, path.parent, problems, validate, confine_images)
    task = _annotations(doc, where, records, name_of, broken_categories, problems)
    problems.raise_if_any(path)
    if not records:
        raise DataError(f"{path}: images: no images")

    dataset = Dataset(images=list(records.values()), classes=list(name_of.values()),
                      category_ids=list(name_of), task=task)
    if classes is not None:
        dataset = _with_classes(dataset, list(classes), path)
    return dataset


def _categories(doc: dict, where: str, problems: Problems) -> tuple[dict[int, str], set]:
    """Category id -> name, in the document's order, and the ids whose names are broken (their
    annotations are not reported again)."""
    name_of, broken = {}, set()
    for i, cat in enumerate(doc["categories"]):
        if not isinstance(cat, dict) or not isinstance(cat.get("id"), int):
            problems.add(f"{where}: categories[{i}]", "id", f"expected an integer id, got {cat!r}")
            continue
        if not isinstance(cat.get("name"), str) or not cat["name"].strip():
            problems.add(f"{where}: categories[{i}]", "name", f"missing or empty (id {cat['id']})")
            broken.add(cat["id"])
            continue
        if cat["id"] in name_of:
            problems.add(f"{where}: categories[{i}]", "id", f"duplicate category id {cat['id']}")
            continue
        name_of[cat["id"]] = cat["name"]
    return name_of, broken


def _images(doc: dict, where: str, folder: Path, problems: Problems, validate: bool,
            confine_images: bool) -> dict[int, ImageRecord]:
    records: dict[int, ImageRecord] = {}
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
        try:
            file = image_path(image["file_name"], folder, confine_images)
        except OutsideDataFolder as err:
            problems.add(iwhere, "file_name", str(err))
            continue
        stated = stated_size(image, iwhere, problems)
        size = checked_size(file, stated, iwhere, "file_name", "width/height", problems, validate)
        if size is None:
            continue
        records[image["id"]] = ImageRecord(path=file, width=size[0], height=size[1], instances=[],
                                           image_id=image["id"])
    return records


def _annotations(doc: dict, where: str, records: dict[int, ImageRecord], name_of: dict[int, str],
                 broken_categories: set, problems: Problems) -> str | None:
    """Each annotation added to its image's record; returns the task they are for (that of the
    first: an annotation of the other is a problem, the first such one reported)."""
    first = None      # (task, "annotations[i] (id N)")
    mixed = False
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
        instance = _instance(ann, name_of[ann["category_id"]], record, awhere, problems)
        if instance is None:
            continue
        task = instance_task(instance)
        if first is None:
            first = (task, awhere[len(where) + 2:])
        elif task != first[0] and not mixed:
            problems.add(awhere, "segmentation", mixing_problem(task, first[0], first[1]))
            mixed = True
        record.instances.append(instance)
    return first[0] if first else None


def _instance(ann: dict, label: str, record: ImageRecord, awhere: str, problems: Problems) -> Instance | None:
    """An annotation in pixels: its mask (RLE or polygons) where it has a segmentation, else its
    box alone (a missing, null or empty segmentation); None after recording its problems."""
    from scoring.encode import mask_polygons

    seg = ann.get("segmentation")
    iscrowd = bool(ann.get("iscrowd", 0))
    if seg is None or seg == []:
        bbox = ann.get("bbox")
        if not isinstance(bbox, list) or len(bbox) != 4:
            problems.add(awhere, "bbox", f"expected [x, y, width, height] (an annotation without a "
                                         f"segmentation is its box alone), got {bbox!r}")
            return None
        x, y, w, h = bbox
        numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (x, y, w, h))
        edges = [("bbox x", x), ("bbox y", y), ("bbox x + width", x + w if numbers else w),
                 ("bbox y + height", y + h if numbers else h)]
        box = check_box(edges, awhere, problems, high=(float(record.width), float(record.height)),
                        tolerance=PIXEL_TOLERANCE)
        if box is None:
            return None
        return Instance.boxed(label, (box[0], box[1], box[2] - box[0], box[3] - box[1]), iscrowd)
    if isinstance(seg, dict):
        try:
            rle = _compressed_rle(seg, record.height, record.width)
        except (KeyError, TypeError, ValueError) as err:
            problems.add(awhere, "segmentation", f"invalid RLE: {err}")
            return None
        mask = mask_utils.decode(rle).astype(bool)
        if not mask.any():
            problems.add(awhere, "segmentation", "RLE mask is empty")
            return None
        polygons = [p.ravel().astype(float).tolist() for p in mask_polygons(mask, 0)]
        return Instance(label=label, polygons=polygons, iscrowd=iscrowd,
                        rle={"size": list(rle["size"]), "counts": rle["counts"].decode()})
    segments = check_polygons(seg, awhere, "segmentation", problems, low=(0.0, 0.0),
                              high=(float(record.width), float(record.height)), tolerance=PIXEL_TOLERANCE)
    if segments is None:
        return None
    return Instance(label=label, polygons=segments, iscrowd=iscrowd)


def _with_classes(dataset: Dataset, classes: list[str], source) -> Dataset:
    """The same COCO data in the given class order; labels outside ``classes`` are refused.
    Category ids follow the names they belonged to (new names get ids after the largest)."""
    problems = Problems()
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
    return Dataset(images=dataset.images, classes=classes, category_ids=ids, task=dataset.task)


def _compressed_rle(seg: dict, height: int, width: int) -> dict:
    size = list(seg["size"])
    if size != [height, width]:
        raise ValueError(f"size {size} differs from the image's [height, width] [{height}, {width}]")
    if isinstance(seg["counts"], list):       # uncompressed RLE
        return mask_utils.frPyObjects(seg, height, width)
    counts = seg["counts"].encode() if isinstance(seg["counts"], str) else seg["counts"]
    return {"size": size, "counts": counts}


def to_coco(dataset: Dataset, relative_to: Path | None = None) -> dict:
    """COCO instances dict (box-only instances without a ``segmentation``, their ``area`` the
    box's). Image ids are kept when every image has one, else 1..N; category ids
    are kept when read from COCO, else 1..K; annotation ids are 1..M. ``file_name`` is the
    absolute path, or relative to ``relative_to`` for images under that folder."""
    keep_ids = all(r.image_id is not None for r in dataset.images) and \
        len({r.image_id for r in dataset.images}) == len(dataset.images)
    category_of = dict(zip(dataset.classes, dataset.coco_category_ids()))
    images, annotations = [], []
    for n, record in enumerate(dataset.images, 1):
        image_id = record.image_id if keep_ids else n
        images.append({"id": image_id, "file_name": path_text(record.path, relative_to),
                       "width": record.width, "height": record.height})
        for inst in record.instances:
            if inst.label not in category_of:
                raise DataError(f"image {record.path}: label {inst.label!r} is not one of the "
                                f"dataset's classes {dataset.classes}")
            annotation = {"id": len(annotations) + 1, "image_id": image_id,
                          "category_id": category_of[inst.label]}
            if inst.has_mask:       # box-only (object detection): no segmentation at all
                annotation["segmentation"] = inst.coco_segmentation()
            annotations.append({**annotation, "area": inst.area(record.height, record.width),
                                "bbox": list(inst.bbox()), "iscrowd": int(inst.iscrowd)})
    categories = [{"id": cid, "name": name} for name, cid in category_of.items()]
    # "info" is optional in COCO, but pycocotools 2.0.10's loadRes (mmdet's CocoMetric, our
    # evaluation) fails without it.
    return {"info": {"description": "written by mmdet-mlflow"}, "images": images,
            "annotations": annotations, "categories": categories}


def write_coco(dataset: Dataset, path, relative: bool = True) -> Path:
    """COCO JSON; image file names relative to its folder when the images are below it (or,
    ``relative=False``, always absolute: for readers that take paths as they are, mmdet's)."""
    path = Path(path).absolute()
    atomic_write_text(path, json.dumps(to_coco(dataset, relative_to=path.parent if relative else None)))
    return path
