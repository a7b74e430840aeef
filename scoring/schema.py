"""The one place that knows the public contract: the request column, the predict params and the
response schema (see the model card: one ``{"boxes": [...]}`` per image, coordinates in 0..1)."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Mapping

from scoring.errors import InputError

INPUT_COLUMN = "image"
OUTPUT_COLUMN = "boxes"
TASK = "image-instance-segmentation"


@dataclass(frozen=True)
class PredictParams:
    """Per-request settings. ``iou_threshold`` defaults to the model config's NMS IoU, so it is
    filled in when a model is saved (see ``PredictParams.for_config``)."""

    score_threshold: float = 0.3
    iou_threshold: float = 0.6
    max_detections: int = 100
    mask_threshold: float = 0.5
    polygon_tolerance: float = 1.0  # pixels of Douglas-Peucker simplification; 0 = raw contours
    # NMS across classes too (Ultralytics' agnostic_nms): one object, one label. mmdet's default
    # is per class, which can report one bottle as both "milk_bottle" and "water_bottle".
    class_agnostic_nms: bool = False

    # name -> (low, high, inclusive high) for validation
    _RANGES = {
        "score_threshold": (0.0, 1.0),
        "iou_threshold": (0.0, 1.0),
        "max_detections": (1, 10_000),
        "mask_threshold": (0.0, 1.0),
        "polygon_tolerance": (0.0, 1_000.0),
    }

    @classmethod
    def for_config(cls, test_cfg: Mapping[str, Any]) -> "PredictParams":
        """Defaults that follow a model's own test settings where they exist."""
        nms = test_cfg.get("nms") or {}
        return cls(
            iou_threshold=float(nms.get("iou_threshold", cls.iou_threshold)),
            max_detections=int(test_cfg.get("max_per_img", cls.max_detections)),
            mask_threshold=float(test_cfg.get("mask_thr_binary", cls.mask_threshold)),
        )

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "PredictParams":
        return cls().updated(values)

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

    def _checked(self, name: str, value: Any) -> float | int | bool:
        if name == "class_agnostic_nms":
            return _boolean_param(name, value)
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


def mlflow_signature(defaults: PredictParams):
    """The MLflow signature: a string ``image`` column in, one ``{"boxes": [...]}`` object out
    per image (the response record of the model card), and the predict params with their
    defaults (MLflow only passes params that the signature declares).

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
    detection = Object(
        [
            Property("box", box),
            Property("label", "string"),
            Property("score", "double"),
            Property("polygon", Array(Array("double"))),
        ]
    )
    param_types = {bool: "boolean", int: "long", float: "double"}
    params = ParamSchema(
        [
            ParamSpec(name, param_types[type(value)], value)
            for name, value in defaults.as_dict().items()
        ]
    )
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


def detection_record(box_xyxy, image_size, label: str, score: float, polygons) -> dict:
    """One entry of ``boxes``: the box normalized by the original image size and clipped to 0..1
    (mmdet boxes can poke past the border), the class name, the score, the polygon segments."""
    width, height = image_size
    x1, y1, x2, y2 = (float(v) for v in box_xyxy)
    return {
        "box": {
            "topX": _unit(x1 / width),
            "topY": _unit(y1 / height),
            "bottomX": _unit(x2 / width),
            "bottomY": _unit(y2 / height),
        },
        "label": label,
        "score": float(score),
        "polygon": polygons,
    }


def _unit(v: float) -> float:
    return min(1.0, max(0.0, v))
