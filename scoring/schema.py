"""The one place that knows the public contract: the request column, the predict params and the
response schema (see the model card: one ``{"boxes": [...]}`` per image, coordinates in 0..1)."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Mapping, Sequence

from scoring.errors import InputError
from scoring.tiles import check_overlap_ratio, format_tile_grid, parse_tile_grid

INPUT_COLUMN = "image"
OUTPUT_COLUMN = "boxes"
# The two tasks a model serves: boxes, labels and scores; or those and each detection's mask.
OBJECT_DETECTION = "object-detection"
INSTANCE_SEGMENTATION = "instance-segmentation"
TASKS = (OBJECT_DETECTION, INSTANCE_SEGMENTATION)
# The task names Azure ML's catalog and AutoML give them (the MLmodel's base_model_task).
AZURE_TASKS = {OBJECT_DETECTION: "image-object-detection",
               INSTANCE_SEGMENTATION: "image-instance-segmentation"}
# Params only a model that makes masks has: an object-detection model refuses them.
MASK_PARAMS = ("mask_threshold", "polygon_tolerance")
# How each detection's mask is answered: "polygon" (the model card's normalized outer polygons,
# holes lost), "rle" (COCO compressed RLE of the full-size mask, holes kept) or "none" (no mask
# at all, and no mask work).
MASK_FORMATS = ("polygon", "rle", "none")
MAX_CLASS_NAMES = 10_000  # more names than any model has classes: refused before any work


@dataclass(frozen=True)
class PredictParams:
    """Per-request settings. ``iou_threshold`` defaults to the model config's NMS IoU, so it is
    filled in when a model is saved (``scoring.families.ModelFamily.default_params``)."""

    score_threshold: float = 0.3
    iou_threshold: float = 0.6
    max_detections: int = 100
    mask_threshold: float = 0.5
    polygon_tolerance: float = 1.0  # pixels of Douglas-Peucker simplification; 0 = raw contours
    # NMS across classes too (Ultralytics' agnostic_nms): one object, one label. mmdet's default
    # is per class, which can report one bottle as both "milk_bottle" and "water_bottle".
    class_agnostic_nms: bool = False
    # Tiling, with Azure AutoML's names (scoring.tiling): "MxN" columns x rows, "" = none; the
    # share of a tile its neighbours overlap; the IoU above which detections of the tiles and
    # of the whole picture are one object.
    tile_grid_size: str = ""
    tile_overlap_ratio: float = 0.25
    tile_predictions_nms_thresh: float = 0.25
    mask_format: str = "polygon"  # one of MASK_FORMATS
    # The class names to keep (None: all). Applied to the class scores before the score top-k
    # and NMS, as Ultralytics' ``classes``, so max_detections counts kept classes only; which
    # names the model knows is checked against its classes (scoring.class_filter).
    classes: tuple[str, ...] | None = None

    # name -> (low, high, inclusive high) for validation
    _RANGES = {
        "score_threshold": (0.0, 1.0),
        "iou_threshold": (0.0, 1.0),
        "max_detections": (1, 10_000),
        "mask_threshold": (0.0, 1.0),
        "polygon_tolerance": (0.0, 1_000.0),
        "tile_predictions_nms_thresh": (0.0, 1.0),
    }

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "PredictParams":
        """Params stored by ``as_dict`` (model.json's default_params): ``classes`` None is all."""
        return cls().updated({k: v for k, v in values.items() if not (k == "classes" and v is None)})

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def updated(self, values: Mapping[str, Any] | None) -> "PredictParams":
        """These params with ``values`` applied; a bad name or value raises InputError."""
        if not values:
            return self
        known = {f.name: f.type for f in fields(self)}
        changes = {}
        for name, value in values.items():
            if name not in known:
                raise InputError(f"unknown param {name!r}; known params: {', '.join(known)}")
            changes[name] = self._checked(name, value)
        return replace(self, **changes)

    @property
    def tile_grid(self) -> tuple[int, int] | None:
        """(columns, rows) of ``tile_grid_size``, None for no tiling."""
        return parse_tile_grid(self.tile_grid_size)

    def _checked(self, name: str, value: Any) -> Any:
        if name == "class_agnostic_nms":
            return _boolean_param(name, value)
        if name == "tile_grid_size":
            return format_tile_grid(parse_tile_grid(value, name))
        if name == "tile_overlap_ratio":
            return check_overlap_ratio(value, name)
        if name == "mask_format":
            if not isinstance(value, str) or value not in MASK_FORMATS:
                raise InputError(f"param 'mask_format' must be one of {', '.join(map(repr, MASK_FORMATS))}, "
                                 f"got {_shown(value)}")
            return value
        if name == "classes":
            return class_names_param(value)
        want_int = name == "max_detections"
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            if isinstance(value, str):
                try:
                    value = float(value)
                except ValueError:
                    raise InputError(f"param {name!r} must be a number, got {value!r}") from None
            else:
                raise InputError(f"param {name!r} must be a number, got {value!r}")
        if not math.isfinite(value):
            raise InputError(f"param {name!r} must be finite, got {value!r}")
        if want_int:
            if value != int(value):
                raise InputError(f"param {name!r} must be a whole number, got {value!r}")
            value = int(value)
        low, high = self._RANGES[name]
        if not low <= value <= high:
            raise InputError(f"param {name!r} must be between {low} and {high}, got {value!r}")
        return value if want_int else float(value)


def check_task_params(task: str, values: Mapping[str, Any] | None) -> None:
    """Refuse, for an object-detection model, what only masks mean: ``mask_format`` other than
    "none", and the mask-only params, naming the model's task."""
    if task != OBJECT_DETECTION or not values:
        return
    asked = [name for name in MASK_PARAMS if name in values]
    mask_format = values.get("mask_format", "none")
    if mask_format != "none":
        asked.insert(0, f"mask_format {mask_format!r}")
    if asked:
        raise InputError(f"this model does {OBJECT_DETECTION} (boxes, labels and scores; no masks): "
                         f"{', '.join(asked)} {'is' if len(asked) == 1 else 'are'} for "
                         f"{INSTANCE_SEGMENTATION} models; leave {'it' if len(asked) == 1 else 'them'} out")


def task_param_names(task: str) -> list[str]:
    """The predict params a model of ``task`` takes (its signature's)."""
    names = [f.name for f in fields(PredictParams)]
    return [n for n in names if n not in MASK_PARAMS] if task == OBJECT_DETECTION else names


def class_names_param(value: Any) -> tuple[str, ...]:
    """The ``classes`` param as a tuple of names, in the order given, without repeats: a list of
    strings, or one comma-separated string (each name stripped of surrounding spaces; a name
    that holds a comma needs the list form). Whether the model knows them is checked where its
    classes are known (scoring.class_filter)."""
    usage = "a list of class names or a comma-separated string of them"
    if isinstance(value, str):
        names = [part.strip() for part in value.split(",")]
        if value.strip() and any(not name for name in names):
            raise InputError(f"param 'classes' has an empty name in {_shown(value)}; expected {usage}")
        names = [name for name in names if name]
    elif isinstance(value, (list, tuple)):
        if len(value) > MAX_CLASS_NAMES:
            raise InputError(f"param 'classes' names {len(value)} classes, over the limit of "
                             f"{MAX_CLASS_NAMES}")
        if not all(isinstance(name, str) for name in value):
            raise InputError(f"param 'classes' must be {usage}, got {_shown(value)}")
        if any(not name.strip() for name in value):
            raise InputError(f"param 'classes' has an empty name in {_shown(value)}")
        names = list(value)
    else:
        raise InputError(f"param 'classes' must be {usage}, got {_shown(value)}")
    if not names:
        raise InputError("param 'classes' is empty: name at least one class to keep, or leave the "
                         "param out to keep every class")
    return tuple(dict.fromkeys(names))


def _shown(value: Any, limit: int = 200) -> str:
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def mlflow_signature(defaults: PredictParams, class_names: Sequence[str] | None = None,
                     task: str = INSTANCE_SEGMENTATION):
    """The MLflow signature: a string ``image`` column in, one ``{"boxes": [...]}`` object out
    per image (the response record of the model card), and the predict params with their
    defaults (MLflow only passes params that the signature declares). An object-detection
    model's detections have no ``polygon`` or ``rle``, and it declares no mask-only params.

    ``classes`` is a string array (shape (-1,)) whose default is every class of the model
    (``class_names``), so a request without it keeps them all; under ``mlflow models serve`` its
    comma-separated form is made a list before MLflow checks it (scoring.serving_guards).
    Each detection carries ``polygon`` or ``rle`` (or neither) as ``mask_format`` asks.

    The output is declared as an object holding ``boxes``, not as a ``boxes`` column of arrays,
    for ``mlflow.pyfunc.spark_udf``: it turns a one-column output schema into that column's
    Spark type, and for an array type it takes each row's *columns* as the array's elements
    (``result.to_numpy().tolist()``), so a ``boxes`` column of lists reached Arrow as a list of
    one list and failed (``ArrowTypeError: Expected bytes, got a 'dict' object``); no frame of
    ragged lists can pass there. An object becomes a struct, which MLflow fills field by field
    from the frame's ``boxes`` column, in the struct's field order. What ``predict`` returns is
    unchanged (a frame with a ``boxes`` column), and so is the served JSON (``predictions`` is
    a list of these objects)."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema
    from mlflow.types.schema import Array, Object, Property

    coords = ("topX", "topY", "bottomX", "bottomY")
    box = Object([Property(c, "double") for c in coords])
    properties = [Property("box", box), Property("label", "string"), Property("score", "double")]
    if task == INSTANCE_SEGMENTATION:
        properties += [
            Property("polygon", Array(Array("double")), required=False),
            Property("rle", Object([Property("size", Array("long")), Property("counts", "string")]),
                     required=False),
        ]
    detection = Object(properties)
    param_types = {bool: "boolean", int: "long", float: "double", str: "string"}
    specs = []
    taken = task_param_names(task)
    for name, value in defaults.as_dict().items():
        if name not in taken:
            continue
        if name == "classes":
            if class_names is not None:
                specs.append(ParamSpec(name, "string", list(value or class_names), shape=(-1,)))
            continue
        specs.append(ParamSpec(name, param_types[type(value)], value))
    params = ParamSchema(specs)
    return ModelSignature(
        inputs=Schema([ColSpec("string", INPUT_COLUMN)]),
        outputs=Schema([ColSpec(Object([Property(OUTPUT_COLUMN, Array(detection))]))]),
        params=params,
    )


def _boolean_param(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise InputError(f"param {name!r} must be true or false, got {value!r}")


def detection_record(box_xyxy, image_size, label: str, score: float, polygons=None,
                     rle: dict | None = None) -> dict:
    """One entry of ``boxes``: the box normalized by the original image size and clipped to 0..1
    (mmdet boxes can poke past the border), the class name, the score, and the mask as asked:
    ``polygon`` segments, an ``rle`` (``{"size": [h, w], "counts": str}``), or neither."""
    width, height = image_size
    x1, y1, x2, y2 = (float(v) for v in box_xyxy)
    record = {
        "box": {
            "topX": _unit(x1 / width),
            "topY": _unit(y1 / height),
            "bottomX": _unit(x2 / width),
            "bottomY": _unit(y2 / height),
        },
        "label": label,
        "score": float(score),
    }
    if polygons is not None:
        record["polygon"] = polygons
    if rle is not None:
        record["rle"] = rle
    return record


def _unit(v: float) -> float:
    return min(1.0, max(0.0, v))
