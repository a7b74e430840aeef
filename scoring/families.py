"""Model families: the one place that says what a family of mmdet models is, and the registry of
the runtimes each family's saved models can run on.

A family is recognised by its config's head type; it knows its shipped configs (mmdet's
``configs/<folder>``), its classification layer (to count classes in a checkpoint), its default
predict params (from the config's ``test_cfg``, whose shape differs between families), the input
sizes its training pipeline is written for, and, per runtime, the function that loads a saved
model's ``model/`` folder as a ``Segmenter``. ``model.json`` records the family
(``"family"``; models saved before the field existed are RTMDet-Ins).

RTMDet-Ins is the one family today. docs/architecture.md says, file by file, where a second one
(for example Mask R-CNN on the torch runtime) goes. This module imports no runtime: each loader is
imported when a model needs it, so a model's code loads without the other runtimes' packages.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from scoring.errors import MmdetMlflowError
from scoring.schema import PredictParams

class UnknownModel(MmdetMlflowError, ValueError):
    """A model of a family we do not know, or on a runtime its family lacks."""


@dataclass(frozen=True)
class ModelFamily:
    name: str  # what model.json's "family" records
    title: str  # for messages
    head_types: tuple[str, ...]  # the config's head types (model.bbox_head / model.roi_head)
    config_folder: str  # mmdet's configs/<folder> holding its shipped configs and metafile.yml
    shipped_configs: tuple[str, ...]  # the shipped configs we support by name
    class_layer: str  # state-dict key part of the classification layer (its rows = classes)
    # runtime -> "module:function" that loads a weights folder: (WeightsDir, info, device,
    # batch_size) -> Segmenter. Imported only when a model on that runtime is loaded.
    segmenters: Mapping[str, str] = field(default_factory=dict)
    # The square input size the config's pipelines are written for; training rescales every
    # size in them that is this or twice this (RTMDet: 640 and its 1280 mosaic canvas).
    pipeline_size: int = 640

    def recognises(self, model_cfg: Mapping[str, Any]) -> bool:
        """Whether a config's ``model`` is of this family: its head's type (``bbox_head`` of a
        one-stage model, ``roi_head`` of a two-stage one) is one of ``head_types``."""
        heads = (model_cfg.get("bbox_head") or {}, model_cfg.get("roi_head") or {})
        return any(str(head.get("type", "")).split(".")[-1] in self.head_types for head in heads)

    def default_params(self, test_cfg: Mapping[str, Any]) -> PredictParams:
        """Predict params that follow the config's own test settings where they exist
        (RTMDet-Ins: a flat test_cfg with nms.iou_threshold, max_per_img, mask_thr_binary)."""
        nms = test_cfg.get("nms") or {}
        return PredictParams(
            iou_threshold=float(nms.get("iou_threshold", PredictParams.iou_threshold)),
            max_detections=int(test_cfg.get("max_per_img", PredictParams.max_detections)),
            mask_threshold=float(test_cfg.get("mask_thr_binary", PredictParams.mask_threshold)),
        )

    def class_count(self, state_dict: Mapping[str, Any]) -> int | None:
        """Classes of a checkpoint: the rows of its classification layer's weight (None when it
        has no such layer)."""
        key = next((k for k in state_dict if f".{self.class_layer}." in f".{k}" and k.endswith(".weight")),
                   None)
        return None if key is None else int(state_dict[key].shape[0])

    def segmenter_loader(self, runtime: str) -> Callable:
        if runtime not in self.segmenters:
            raise UnknownModel(f"{self.title} models have no {runtime!r} runtime here (runtimes: "
                               f"{', '.join(self.segmenters)})")
        module, function = self.segmenters[runtime].split(":")
        return getattr(importlib.import_module(module), function)


RTMDET_INS = ModelFamily(
    name="rtmdet-ins",
    title="RTMDet-Ins",
    head_types=("RTMDetInsHead", "RTMDetInsSepBNHead"),
    config_folder="rtmdet",
    shipped_configs=(
        "rtmdet-ins_tiny_8xb32-300e_coco",
        "rtmdet-ins_s_8xb32-300e_coco",
        "rtmdet-ins_m_8xb32-300e_coco",
        "rtmdet-ins_l_8xb32-300e_coco",
        "rtmdet-ins_x_8xb16-300e_coco",
    ),
    class_layer="rtm_cls",
    segmenters={
        "torch": "scoring.runtimes.torch_rtmdet:load_torch_segmenter",
        "onnx": "scoring.runtimes.onnx_rtmdet:load_onnx_segmenter",
        "openvino": "scoring.runtimes.openvino_rtmdet:load_openvino_segmenter",
    },
)

FAMILIES = {family.name: family for family in (RTMDET_INS,)}
DEFAULT_FAMILY = RTMDET_INS.name


def family_named(name: str) -> ModelFamily:
    if name not in FAMILIES:
        raise UnknownModel(f"the model's family {name!r} is not one of {', '.join(FAMILIES)}")
    return FAMILIES[name]


def family_of(info: Mapping[str, Any]) -> ModelFamily:
    """The family a saved model's model.json records (RTMDet-Ins when it records none)."""
    return family_named(info.get("family", DEFAULT_FAMILY))


def family_of_config(model_cfg: Mapping[str, Any]) -> ModelFamily | None:
    """The family whose head type a config's ``model`` section has (None: no family of ours)."""
    return next((f for f in FAMILIES.values() if f.recognises(model_cfg)), None)
