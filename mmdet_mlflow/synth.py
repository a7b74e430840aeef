"""A deterministic synthetic look-alike of Azure's fridgeObjects instance-segmentation sample:
fridge-shelf scenes with cans, cartons, milk bottles and water bottles, annotated with the
polygons of each object's VISIBLE part (after occlusion by objects in front of it), or, for
object detection, with those polygons' boxes alone.

Every image depends only on (seed, index), so the same seed gives byte-identical files.
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from mmdet_mlflow.data import (INSTANCE_SEGMENTATION, OBJECT_DETECTION, TASKS, Dataset, ImageRecord, Instance,
                               response_boxes, write_coco, write_jsonl, write_mltable)
from mmdet_mlflow.files import atomic_write_bytes
from mmdet_mlflow.plots import write_image
from scoring.errors import MmdetMlflowError
from mmdet_mlflow.visualize import draw_detections

CLASSES = ["can", "carton", "milk_bottle", "water_bottle"]
IMAGE_SIZES = [(480, 360), (512, 384), (560, 420), (640, 480)]
# The default difficulty (the demo's set): close-ups as in Azure's fridgeObjects photos, where an
# item fills a quarter to a half of the frame's height and is rarely hidden by more than a third.
# bench/recipe_search.py's second grid measured the harder set it replaced (objects 60-250 px,
# 35 % visible enough): segm mAP 0.55 against 0.68 with the same recipe and time.
OBJECT_HEIGHT = (110, 260)            # the object's larger side in pixels
OBJECTS_PER_IMAGE = (1, 5)
MIN_VISIBLE_FRACTION = 0.6            # objects hidden more than 40 % are not drawn at all
MIN_VISIBLE_PIXELS = 300
POLYGON_TOLERANCE = 0.5               # pixels, Douglas-Peucker on the traced visible mask
JPEG_QUALITY = 92
PREVIEW_FILE = "preview.png"          # a few training images with their annotations drawn

# Aspect ratios (height / width) per class, and label / cap colours (BGR).
ASPECT = {"can": (1.35, 1.95), "carton": (1.5, 2.2), "milk_bottle": (2.1, 2.8), "water_bottle": (2.5, 3.4)}
VIVID = [(40, 40, 200), (200, 90, 30), (40, 150, 40), (30, 140, 230), (150, 40, 140), (30, 200, 220),
         (60, 60, 60), (190, 190, 195)]


class SynthError(MmdetMlflowError, ValueError):
    """Settings no synthetic set can be made with (the CLI prints it without a traceback)."""


@dataclass(frozen=True)
class SceneStyle:
    """How hard the scenes are: the range of the objects' larger side in pixels, and how much
    of an object must stay visible behind nearer ones for it to be drawn."""

    object_size: tuple[int, int] = OBJECT_HEIGHT
    min_visible_fraction: float = MIN_VISIBLE_FRACTION

    def __post_init__(self):
        low, high = self.object_size
        if not 12 <= low <= high <= 400:
            raise SynthError(f"object size must be MIN <= MAX within 12..400 pixels (got {low}, {high})")
        if not 0 < self.min_visible_fraction <= 1:
            raise SynthError(f"min visible fraction must be in (0, 1] (got {self.min_visible_fraction})")


@dataclass
class SynthObject:
    label: str
    mask: np.ndarray          # bool (H, W): the visible part in the final image
    hidden_pixels: int = 0    # pixels of its silhouette hidden by nearer objects


@dataclass
class Scene:
    image: np.ndarray         # BGR uint8
    objects: list[SynthObject]


# --------------------------------------------------------------------------------------------
# Object sprites: colour (h, w, 3) float32, opacity (h, w) float32, silhouette (h, w) bool.


def _profile_mask(halfwidths: np.ndarray, width: int):
    """Silhouette of a body that is symmetric about the vertical axis; also t = signed
    horizontal position in -1..1 across each row (for cylinder shading)."""
    xs = np.arange(width, dtype=np.float32) + 0.5 - width / 2
    hw = np.maximum(halfwidths.astype(np.float32), 1e-3)[:, None]
    mask = np.abs(xs[None, :]) <= hw
    t = np.clip(xs[None, :] / hw, -1, 1)
    return mask, t


def _cylinder_shade(t: np.ndarray, highlight: float = 0.35) -> np.ndarray:
    """Round-body lighting: darker at the sides, a soft specular stripe left of centre."""
    shade = 0.62 + 0.38 * np.sqrt(1 - t ** 2)
    return shade + highlight * np.exp(-((t + 0.45) / 0.12) ** 2)


def _smoothstep(a: float, b: float, y: np.ndarray) -> np.ndarray:
    s = np.clip((y - a) / max(b - a, 1e-6), 0, 1)
    return s * s * (3 - 2 * s)


def _bottle_halfwidths(h: int, w: int, cap: float, neck_end: float, shoulder_end: float,
                       neck: float, cap_w: float, corner: float) -> np.ndarray:
    y = np.arange(h, dtype=np.float32) + 0.5
    half = w / 2
    hw = np.where(y < cap * h, cap_w * half,
                  neck * half + (half - neck * half) * _smoothstep(neck_end * h, shoulder_end * h, y))
    radius = corner * w                       # rounded bottom corners
    bottom = np.clip((y - (h - radius)) / radius, 0, 1)
    return hw - radius * (1 - np.sqrt(1 - bottom ** 2))


def _can(rng, h, w):
    e = max(3.0, 0.13 * w)                    # ellipse half-height of rims seen from slightly above
    y = np.arange(h, dtype=np.float32) + 0.5
    top = np.clip((e - y) / e, 0, 1)
    bot = np.clip((y - (h - e)) / e, 0, 1)
    hw = (w / 2) * np.sqrt(1 - np.maximum(top, bot) ** 2)
    mask, t = _profile_mask(hw, w)
    base = np.array(VIVID[rng.integers(len(VIVID))], np.float32)
    color = np.empty((h, w, 3), np.float32)
    color[:] = base
    band_y0, band_y1 = sorted(rng.uniform(0.3, 0.75, 2) * h)
    if band_y1 - band_y0 > 4:                 # a printed stripe
        color[int(band_y0):int(band_y1)] = np.array(VIVID[rng.integers(len(VIVID))], np.float32) * 0.9 + 25
    metal = np.array([185, 185, 190], np.float32)
    rim = (y < 2 * e + 2) | (y > h - 0.9 * e - 3)
    color[rim] = metal
    color *= _cylinder_shade(t)[..., None]
    # the lid: a lighter ellipse with a darker rim ring
    lid = np.zeros((h, w), np.uint8)
    cv2.ellipse(lid, (int(w / 2), int(e)), (max(1, int(w / 2 - 1)), max(1, int(e - 1))), 0, 0, 360, 1, -1)
    color[lid.astype(bool)] = metal * 1.1
    cv2.ellipse(lid, (int(w / 2), int(e)), (max(1, int(w / 2 - 3)), max(1, int(e - 3))), 0, 0, 360, 2, 1)
    color[lid == 2] = metal * 0.7
    return color, np.ones((h, w), np.float32), mask


def _carton(rng, h, w):
    g = 0.2 * h                               # gable height
    front = 0.68 * w
    color = np.zeros((h, w, 3), np.float32)
    mask = np.zeros((h, w), np.uint8)
    paper = np.array([rng.uniform(215, 250), rng.uniform(215, 250), rng.uniform(215, 250)], np.float32)
    band = np.array(VIVID[rng.integers(len(VIVID) - 2)], np.float32)
    faces = [  # (polygon, colour)
        ([(0, h), (0, g), (front, g), (front, h)], paper),
        ([(0, g), (0, 0.32 * g), (front, 0.32 * g), (front, g)], paper * 0.88),          # sloped front
        ([(front, h), (front, g), (w - 1, 0.88 * g), (w - 1, h - 0.03 * h)], paper * 0.72),  # side
        ([(front, g), (w - 1, 0.88 * g), (front + 0.5 * (w - front), 0.3 * g)], paper * 0.62),  # gable
        ([(0, 0.32 * g), (0, 0), (front + 0.5 * (w - front), 0), (front + 0.5 * (w - front), 0.32 * g)],
         paper * 0.95),                                                               # top fin
    ]
    for polygon, fill in faces:
        pts = np.round(np.array(polygon, np.float32)).astype(np.int32)
        cv2.fillPoly(mask, [pts], 1)
        cv2.fillPoly(color, [pts], fill.tolist())
    y0, y1 = int(rng.uniform(0.42, 0.55) * h), int(rng.uniform(0.68, 0.82) * h)
    color[y0:y1, :int(front)] = band
    color[y0:y1, int(front):] = band * 0.72
    cx, cy, r = int(front * rng.uniform(0.3, 0.7)), (y0 + y1) // 2, max(2, (y1 - y0) // 3)
    cv2.circle(color, (cx, cy), r, (paper * 0.97).tolist(), -1)   # a logo on the band
    return color, np.ones((h, w), np.float32), mask.astype(bool)


def _milk_bottle(rng, h, w):
    hw = _bottle_halfwidths(h, w, cap=0.09, neck_end=0.18, shoulder_end=0.4, neck=0.5,
                            cap_w=0.56, corner=0.12)
    mask, t = _profile_mask(hw, w)
    milk = np.array([rng.uniform(235, 252), rng.uniform(238, 252), rng.uniform(240, 255)], np.float32)
    color = np.empty((h, w, 3), np.float32)
    color[:] = milk
    color *= _cylinder_shade(t, highlight=0.12)[..., None]
    cap_rows = int(0.09 * h) + 1
    color[:cap_rows] = np.array(VIVID[rng.integers(6)], np.float32) * _cylinder_shade(t[:cap_rows])[..., None]
    if rng.random() < 0.7:                    # a printed label
        y0, y1 = int(0.52 * h), int(rng.uniform(0.7, 0.82) * h)
        color[y0:y1] = np.array(VIVID[rng.integers(6)], np.float32) * _cylinder_shade(t[y0:y1], 0.1)[..., None]
    opacity = np.full((h, w), 0.9, np.float32)  # milk is nearly opaque, the plastic translucent
    opacity[:cap_rows] = 1.0
    return color, opacity, mask


def _water_bottle(rng, h, w):
    hw = _bottle_halfwidths(h, w, cap=0.07, neck_end=0.14, shoulder_end=0.32, neck=0.42,
                            cap_w=0.48, corner=0.1)
    y = np.arange(h, dtype=np.float32)
    ridges = rng.integers(3, 7)
    period = 0.6 * h / ridges
    in_ridge = (y > 0.36 * h) & (y < 0.96 * h) & (((y - 0.36 * h) % period) < 0.18 * period)
    hw = np.where(in_ridge, hw * 0.93, hw)    # pinched ridges change the silhouette too
    mask, t = _profile_mask(hw, w)
    tint = np.array([rng.uniform(215, 250), rng.uniform(185, 220), rng.uniform(140, 185)], np.float32)
    color = np.empty((h, w, 3), np.float32)
    color[:] = tint
    color *= _cylinder_shade(t, highlight=0.5)[..., None]
    color[in_ridge] *= 0.8
    opacity = np.full((h, w), rng.uniform(0.5, 0.68), np.float32)
    opacity[in_ridge] = 0.85
    cap_rows = int(0.07 * h) + 1
    cap = np.array([(190, 100, 20), (235, 235, 235), (160, 60, 10)][rng.integers(3)], np.float32)
    color[:cap_rows] = cap * _cylinder_shade(t[:cap_rows])[..., None]
    opacity[:cap_rows] = 1.0
    return color, opacity, mask


DRAW = {"can": _can, "carton": _carton, "milk_bottle": _milk_bottle, "water_bottle": _water_bottle}


def _sprite(rng, label: str, size: tuple[int, int]):
    """One object at a random size, mirrored and tilted a little."""
    height = int(rng.integers(size[0], size[1] + 1))
    width = max(12, int(round(height / rng.uniform(*ASPECT[label]))))
    color, opacity, mask = DRAW[label](rng, height, width)
    if rng.random() < 0.5:
        color, opacity, mask = color[:, ::-1], opacity[:, ::-1], mask[:, ::-1]
    angle = float(rng.normal(0, 4)) if rng.random() < 0.6 else 0.0
    if abs(angle) > 0.5:
        center = (width / 2, height / 2)
        matrix = cv2.getRotationMatrix2D(center, angle, 1.0)
        cos, sin = abs(matrix[0, 0]), abs(matrix[0, 1])
        new_w, new_h = int(math.ceil(height * sin + width * cos)), int(math.ceil(height * cos + width * sin))
        matrix[0, 2] += new_w / 2 - center[0]
        matrix[1, 2] += new_h / 2 - center[1]
        warp = lambda a, interp: cv2.warpAffine(np.ascontiguousarray(a), matrix, (new_w, new_h), flags=interp,
                                                borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        color = warp(color, cv2.INTER_LINEAR)
        opacity = warp(opacity, cv2.INTER_LINEAR)
        mask = warp(mask.astype(np.float32), cv2.INTER_LINEAR) > 0.5
    return np.ascontiguousarray(color), np.ascontiguousarray(opacity), np.ascontiguousarray(mask)


# --------------------------------------------------------------------------------------------
# Scenes


def _background(rng, width: int, height: int):
    """Fridge interior: lit from the top, darker side walls, glass shelves, smooth blotches.
    Returns the image (float32) and the y of the surfaces objects can stand on."""
    base = np.array([rng.uniform(200, 245), rng.uniform(195, 240), rng.uniform(185, 235)], np.float32)
    y = np.linspace(0, 1, height, dtype=np.float32)[:, None]
    x = np.linspace(-1, 1, width, dtype=np.float32)[None, :]
    light = (1.05 - rng.uniform(0.25, 0.45) * y) * (1 - rng.uniform(0.15, 0.35) * x ** 4)
    image = base[None, None, :] * light[..., None]
    blotches = cv2.resize(rng.normal(0, 7, (height // 16 + 1, width // 16 + 1)).astype(np.float32),
                          (width, height), interpolation=cv2.INTER_CUBIC)
    image += blotches[..., None]
    surfaces = [height - int(rng.integers(4, 30))]
    if rng.random() < 0.6:
        surfaces.insert(0, int(height * rng.uniform(0.45, 0.58)))
    for shelf in surfaces[:-1]:                # a glass shelf: bright edge, shadow line below
        thick = int(rng.integers(5, 10))
        image[shelf - thick:shelf] = image[shelf - thick:shelf] * 0.75 + np.float32(245) * 0.25
        image[shelf:shelf + 3] *= 0.7
    return image, surfaces


def _place(rng, image_size, sprite_shape, surfaces):
    """Top-left corner: standing on a shelf or the floor (a little in front of it), inside the image."""
    width, height = image_size
    h, w = sprite_shape
    fitting = [s for s in surfaces if s - h >= 0] or [height - 1]
    bottom = min(height - 1, int(rng.choice(fitting)) + int(rng.integers(-4, 22)))
    top = max(0, bottom - h)
    left = int(rng.integers(0, max(1, width - w)))
    return top, left


def synth_scene(seed: int, index: int, style: SceneStyle = SceneStyle()) -> Scene:
    """Image ``index`` of the set made with ``seed`` and ``style``: it depends on nothing else."""
    rng = np.random.default_rng([seed, index])
    width, height = IMAGE_SIZES[rng.integers(len(IMAGE_SIZES))]
    image, surfaces = _background(rng, width, height)
    count = int(rng.integers(OBJECTS_PER_IMAGE[0], OBJECTS_PER_IMAGE[1] + 1))
    placed = []                                # (label, top, left, colour, opacity, silhouette)
    for _ in range(count):
        label = CLASSES[rng.integers(len(CLASSES))]
        color, opacity, mask = _sprite(rng, label, style.object_size)
        mask = mask[:height, :width]
        top, left = _place(rng, (width, height), mask.shape, surfaces)
        placed.append((label, top, left, color, opacity, mask))
    placed.sort(key=lambda p: p[1] + p[5].shape[0])   # lower on the picture = nearer = drawn later

    full_masks = []
    for _, top, left, _, _, mask in placed:
        m = np.zeros((height, width), bool)
        h, w = min(mask.shape[0], height - top), min(mask.shape[1], width - left)
        m[top:top + h, left:left + w] = mask[:h, :w]
        full_masks.append(m)
    # Drop the objects that nearer ones hide almost entirely (until none is left to drop).
    keep = list(range(len(placed)))
    while True:
        visible = _visible_masks([full_masks[i] for i in keep])
        hidden = [i for i, v in zip(keep, visible)
                  if v.sum() < max(MIN_VISIBLE_PIXELS, style.min_visible_fraction * full_masks[i].sum())]
        if not hidden:
            break
        keep.remove(hidden[0])

    for i in keep:
        label, top, left, color, opacity, mask = placed[i]
        h, w = min(mask.shape[0], height - top), min(mask.shape[1], width - left)
        _shadow(image, left, top + h, w, height)
        region = image[top:top + h, left:left + w]
        alpha = (opacity[:h, :w] * mask[:h, :w])[..., None]
        region[:] = region * (1 - alpha) + color[:h, :w] * alpha

    image += rng.normal(0, 3.0, (height, width, 1)).astype(np.float32)   # sensor noise
    image = np.clip(image, 0, 255).astype(np.uint8)
    return Scene(image=image, objects=[SynthObject(placed[i][0], v, int(full_masks[i].sum() - v.sum()))
                                      for i, v in zip(keep, visible)])


def _visible_masks(masks: list[np.ndarray]) -> list[np.ndarray]:
    """Each mask minus everything drawn after (in front of) it."""
    out, covered = [None] * len(masks), np.zeros_like(masks[0]) if masks else None
    for i in range(len(masks) - 1, -1, -1):
        out[i] = masks[i] & ~covered
        covered |= masks[i]
    return out


def _shadow(image, left, bottom, width, height):
    """A soft contact shadow under an object's base."""
    cy, cx = min(bottom, height - 1), left + width // 2
    ry, rx = max(2, width // 8), max(3, int(width * 0.6))
    y0, y1 = max(0, cy - ry), min(height, cy + ry + 1)
    x0, x1 = max(0, cx - rx), min(image.shape[1], cx + rx + 1)
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    d = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2
    image[y0:y1, x0:x1] *= (1 - 0.35 * np.clip(1 - d, 0, 1))[..., None]


def scene_instances(scene: Scene) -> list[Instance]:
    """Annotations: each visible mask traced to pixel polygons (one per connected part)."""
    from scoring.encode import mask_polygons

    instances = []
    for obj in scene.objects:
        polygons = [p.ravel().astype(float).tolist() for p in mask_polygons(obj.mask, POLYGON_TOLERANCE)]
        if polygons:
            instances.append(Instance(label=obj.label, polygons=polygons))
    return instances


# --------------------------------------------------------------------------------------------
# Large pictures with small objects: mosaics of ordinary scenes

MAX_MOSAIC = 8                        # 8x8 scenes: 5120x3840 pixels
MOSAIC_CELL = (max(w for w, _ in IMAGE_SIZES), max(h for _, h in IMAGE_SIZES))  # (width, height)


def check_mosaic(grid: int) -> int:
    if not isinstance(grid, int) or not 1 <= grid <= MAX_MOSAIC:
        raise SynthError(f"mosaic must be a whole number from 1 to {MAX_MOSAIC} (got {grid!r})")
    return grid


def mosaic_scene(seed: int, index: int, grid: int,
                 style: SceneStyle = SceneStyle()) -> tuple[np.ndarray, list[Instance]]:
    """Picture ``index`` of a mosaic set: ``grid`` x ``grid`` scenes of the ordinary set made with
    ``seed`` (scenes index * grid^2 ...), row by row, side by side in cells of the largest scene
    size (MOSAIC_CELL), a smaller scene's last row and column repeated to fill its cell; each
    object's polygons shifted with its scene. The objects keep their size and the picture grows:
    what small objects in a large picture are to a model with a fixed input size."""
    check_mosaic(grid)
    cell_w, cell_h = MOSAIC_CELL
    image = np.empty((grid * cell_h, grid * cell_w, 3), np.uint8)
    instances = []
    for k in range(grid * grid):
        scene = synth_scene(seed, index * grid * grid + k, style)
        row, column = divmod(k, grid)
        height, width = scene.image.shape[:2]
        left, top = column * cell_w, row * cell_h
        image[top:top + cell_h, left:left + cell_w] = cv2.copyMakeBorder(
            scene.image, 0, cell_h - height, 0, cell_w - width, cv2.BORDER_REPLICATE)
        for inst in scene_instances(scene):
            shifted = [(np.asarray(p, dtype=np.float64).reshape(-1, 2) + (left, top)).ravel().tolist()
                       for p in inst.polygons]
            instances.append(Instance(label=inst.label, polygons=shifted))
    return image, instances


# --------------------------------------------------------------------------------------------
# The data set on disk


def split_indices(num_images: int, seed: int, validation_fraction: float) -> dict[str, list[int]]:
    order = np.random.default_rng([seed, 1 << 20]).permutation(num_images)
    n_val = int(round(num_images * validation_fraction)) if num_images > 1 else 0
    if num_images > 1:
        n_val = min(max(n_val, 1), num_images - 1)
    return {"train": sorted(order[n_val:].tolist()), "validation": sorted(order[:n_val].tolist())}


def generate(output, num_images: int = 200, seed: int = 0, validation_fraction: float = 0.2,
             progress: bool = True, style: SceneStyle = SceneStyle(),
             mosaic: int = 1, task: str = INSTANCE_SEGMENTATION) -> dict[str, Dataset]:
    """Write ``output``/images/*.jpg, {train,validation}.jsonl (AutoML), {train,validation}.coco.json,
    MLTable folders train/ and validation/, and preview.png. Returns the two datasets.
    ``mosaic`` N > 1: each picture is N x N scenes side by side (``mosaic_scene``). ``task``
    OBJECT_DETECTION: the same pictures and objects, each annotated with its polygons' box alone."""
    from tqdm import tqdm

    if num_images < 1:
        raise ValueError("num_images must be at least 1")
    if task not in TASKS:
        raise SynthError(f"task must be one of {', '.join(TASKS)} (got {task!r})")
    check_mosaic(mosaic)
    output = Path(output).absolute()
    images_dir = output / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    digits = max(4, len(str(num_images)))
    records = []
    for index in tqdm(range(num_images), desc="synth", unit="img", file=sys.stderr,
                      disable=None if progress else True):
        if mosaic > 1:
            image, instances = mosaic_scene(seed, index, mosaic, style)
        else:
            scene = synth_scene(seed, index, style)
            image, instances = scene.image, scene_instances(scene)
        if task == OBJECT_DETECTION:
            instances = [inst.box_only() for inst in instances]
        path = images_dir / f"{index + 1:0{digits}d}.jpg"
        ok, encoded = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
        assert ok
        atomic_write_bytes(path, encoded.tobytes())
        height, width = image.shape[:2]
        records.append(ImageRecord(path=path, width=width, height=height,
                                   instances=instances, image_id=index + 1))
    datasets = {}
    for split, indices in split_indices(num_images, seed, validation_fraction).items():
        dataset = Dataset(images=[records[i] for i in indices], classes=list(CLASSES),
                          category_ids=list(range(1, len(CLASSES) + 1)), task=task)
        write_jsonl(dataset, output / f"{split}.jsonl")
        write_coco(dataset, output / f"{split}.coco.json")
        write_mltable(output / split, output / f"{split}.jsonl")
        datasets[split] = dataset
    write_preview(datasets["train"], output / PREVIEW_FILE)
    return datasets


def write_preview(dataset: Dataset, path: Path, count: int = 6, columns: int = 3, tile_width: int = 400):
    """A PNG grid of the first images with their ground truth drawn (what the set looks like)."""
    tiles = []
    for record in dataset.images[:count]:
        drawn = draw_detections(cv2.imread(str(record.path)), response_boxes(record))
        tile_height = round(tile_width * 3 / 4)
        tiles.append(cv2.resize(drawn, (tile_width, tile_height), interpolation=cv2.INTER_AREA))
    if not tiles:
        return
    while len(tiles) % columns:
        tiles.append(np.full_like(tiles[0], 255))
    rows = [np.hstack(tiles[i:i + columns]) for i in range(0, len(tiles), columns)]
    write_image(path, np.vstack(rows))
