"""The checks every reader applies: image files (present, decodable, the stated size, not a
decompression bomb), sizes, polygons, boxes and labels. Each problem is recorded, none stops the read."""
from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np

from mmdet_mlflow.data.dataset import Dataset
from mmdet_mlflow.data.problems import Problems

# JSONL values (polygons, boxes) this far outside 0..1 (float noise from other tools) are clipped, not refused.
NORMALIZED_TOLERANCE = 1e-6
# COCO polygons and boxes may overshoot the image by up to a pixel (annotation tools round outward).
PIXEL_TOLERANCE = 1.0


def stated_size(details: dict, where: str, problems: Problems):
    width, height = details.get("width"), details.get("height")
    if width is None and height is None:
        return None
    ok = all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 and float(v).is_integer()
             for v in (width, height))
    if not ok:
        problems.add(where, "image_details.width/height", f"expected positive integers, got {width!r}, {height!r}")
        return None
    return int(width), int(height)


def image_size(path: Path, where: str, fld: str, problems: Problems):
    """(width, height) from the image header, or None after recording why not. A file cut
    short is a problem too (scoring.truncation, the decoder's own check): mmdet's loading would
    decode a cut baseline JPEG's missing rows as whatever memory held, and train on them."""
    from PIL import Image, UnidentifiedImageError

    from scoring.truncation import ENDS_EARLY, ends_early, signature

    if not path.is_file():
        problems.add(where, fld, f"image file not found: {path}")
        return None
    data = path.read_bytes()
    try:
        with Image.open(io.BytesIO(data)) as image:
            size = image.size
            cut = ends_early(data, image.format, image)
            image.verify()  # structural check (PNG CRCs etc.) without decoding pixels
        if not cut:
            return size
    except Image.DecompressionBombError as err:
        # A header claiming billions of pixels: refused before any decoding (PIL's guard).
        problems.add(where, fld, f"image {path} is too large to decode safely: {err}")
        return None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        cut = ends_early(data, signature(data) or "")  # cut in its header: say so, as the decoder does
        if not cut:
            problems.add(where, fld, f"cannot decode image {path}: {err}")
            return None
    problems.add(where, fld, f"cannot decode image {path}: {ENDS_EARLY}: {cut}")
    return None


def checked_size(path: Path, stated, where: str, fld: str, size_fld: str, problems: Problems,
                 validate: bool):
    """The image's size: from its header when ``validate`` (or when the annotation states none),
    compared with the stated one; else the stated one. None after recording why not."""
    actual = image_size(path, where, fld, problems) if (validate or stated is None) else None
    if validate and stated is not None and actual is not None and stated != actual:
        problems.add(where, size_fld, f"say {stated[0]}x{stated[1]} but {path} is {actual[0]}x{actual[1]}")
    return actual or stated


def check_polygons(value, where: str, fld: str, problems: Problems, low, high, tolerance):
    """Validated segments (clipped within ``tolerance``), or None after recording problems."""
    if not isinstance(value, list) or not value:
        problems.add(where, fld, "missing or empty (expected [[x0, y0, x1, y1, ...], ...])")
        return None
    segments, ok = [], True
    for k, seg in enumerate(value):
        sfld = f"{fld}[{k}]"
        if not isinstance(seg, list) or not all(_is_number(v) for v in seg):
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


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_box(edges, where: str, problems: Problems, high, tolerance):
    """A validated box (x0, y0, x1, y1), clipped into 0..``high`` within ``tolerance``, or None
    after recording problems. ``edges``: (field, value) for the left, top, right and bottom edge,
    in that order; each problem names the edge's field."""
    (left_fld, _), (top_fld, _), (right_fld, _), (bottom_fld, _) = edges
    ok = True
    for fld, value in edges:
        if not _is_number(value):
            problems.add(where, fld, f"expected a number, got {value!r}")
            ok = False
    if not ok:
        return None
    limits = (high[0], high[1], high[0], high[1])
    for (fld, value), limit in zip(edges, limits):
        if not -tolerance <= value <= limit + tolerance:
            problems.add(where, fld, f"{value:g} is outside {_range_text((0.0, 0.0), high)}")
            ok = False
    if not ok:
        return None
    x0, y0, x1, y1 = (min(max(float(value), 0.0), limit) for (_, value), limit in zip(edges, limits))
    for low_fld, low, high_fld, high_value, side in ((left_fld, x0, right_fld, x1, "right of"),
                                                     (top_fld, y0, bottom_fld, y1, "below")):
        if high_value <= low:
            problems.add(where, high_fld, f"{high_value:g} is not {side} {low_fld} {low:g} (an empty box)")
            ok = False
    return (x0, y0, x1, y1) if ok else None


def _range_text(low, high) -> str:
    if tuple(high) == (1.0, 1.0):
        return "0..1 (AutoML polygons and boxes are normalized by the image width and height)"
    return f"the image (0..{high[0]:g} x 0..{high[1]:g} pixels)"


def check_labels(dataset: Dataset, problems: Problems, where_field):
    known = set(dataset.classes)
    if len(known) != len(dataset.classes):
        problems.add("classes", "classes", f"duplicate class names in {dataset.classes}")
    for i, record in enumerate(dataset.images):
        for j, inst in enumerate(record.instances):
            if inst.label not in known:
                problems.items.append(f"{where_field(i, j)}: unknown label {inst.label!r} "
                                      f"(classes: {', '.join(dataset.classes)})")
