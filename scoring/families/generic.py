"""Any other mmdet 3.x detector: mmdet's own ``predict`` on torch, answers from its
``pred_instances`` (masks when the model makes them). Two families, one per task, told apart
by whether the config has a mask head. What is not a detector (a panoptic or tracking model, a
3D one, a config of another library) is none of ours."""
from __future__ import annotations

from typing import Any, Mapping

from scoring.families.base import Family
from scoring.schema import INSTANCE_SEGMENTATION, OBJECT_DETECTION

# Where an unknown detector's config counts its candidates: a DETR's queries, a sparse head's
# learned proposals, a two-stage model's proposals (``Family.candidate_counts``).
GENERIC_CANDIDATE_COUNTS = ("num_queries", "rpn_head.num_proposals", "test_cfg.rpn.max_per_img")

# Parts of a config's model that make it something other than an instance detector.
NOT_DETECTOR_PARTS = ("panoptic_head", "panoptic_fusion_head", "track_head", "tracker", "detector")


class GenericFamily(Family):
    def recognises(self, model_cfg: Mapping[str, Any]) -> bool:
        return is_detector_config(model_cfg) and has_mask_head(model_cfg) == self.makes_masks

    def class_count(self, state_dict) -> None:
        return None  # no class layer known by name: the checkpoint's classes are read by shape


def has_mask_head(model_cfg: Mapping[str, Any]) -> bool:
    roi_head = model_cfg.get("roi_head") or {}
    bbox_head = model_cfg.get("bbox_head") or {}
    mask_types = ("Mask", "Ins", "SOLO", "CondInst", "BoxInst")
    return bool(roi_head.get("mask_head")) or bool(model_cfg.get("mask_head")) or any(
        part in str(bbox_head.get("type", "")) for part in mask_types)


def is_detector_config(model_cfg: Mapping[str, Any]) -> bool:
    """Whether mmdet builds this ``model`` as an image detector (a ``BaseDetector``)."""
    if any(part in model_cfg for part in NOT_DETECTOR_PARTS):
        return False
    try:
        from mmdet.models.detectors.base import BaseDetector
        from mmdet.registry import MODELS
        from mmengine.registry import init_default_scope

        init_default_scope("mmdet")
        built = MODELS.get(str(model_cfg.get("type", "")))
    except (ImportError, KeyError):
        return False
    return isinstance(built, type) and issubclass(built, BaseDetector)


DETECTION = GenericFamily(
    name="mmdet-detection",
    title="mmdet object detector",
    task=OBJECT_DETECTION,
    model_types=(),
    candidate_counts=GENERIC_CANDIDATE_COUNTS,
    loaders={"torch": "scoring.runtimes.torch_mmdet:load_whole_detector"},
    fold_batchnorms=True,
    channels_last=True,
    verify_serving_form=True,
)
SEGMENTATION = GenericFamily(
    name="mmdet-instance-segmentation",
    title="mmdet instance segmenter",
    task=INSTANCE_SEGMENTATION,
    model_types=(),
    candidate_counts=GENERIC_CANDIDATE_COUNTS,
    loaders={"torch": "scoring.runtimes.torch_mmdet:load_whole_detector"},
    fold_batchnorms=True,
    channels_last=True,
    verify_serving_form=True,
)
