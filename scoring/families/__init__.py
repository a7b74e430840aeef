"""Model families: the registry. Each family is one module of this package (an adapter that owns
every family-specific decision, ``scoring.families.base.Family``); adding one is that module and
its line below. A config no named family recognises is served through the generic families
(mmdet's own ``predict``), when mmdet builds it as a detector.

This package imports no runtime: a family's loaders are imported when a model needs them, so a
model's code loads without the other runtimes' packages.
"""
from __future__ import annotations

from typing import Any, Mapping

from scoring.families import deformable_detr, generic, mask_rcnn, rtmdet, rtmdet_ins, sparse_rcnn, vfnet, yolof
from scoring.families.base import ClassLayer, Family, TrainingRecipe, UnknownModel

NAMED = (
    rtmdet_ins.FAMILY,
    rtmdet.FAMILY,
    mask_rcnn.FAMILY,
    yolof.FAMILY,
    vfnet.FAMILY,
    deformable_detr.FAMILY,
    sparse_rcnn.FAMILY,
)
GENERIC = (generic.DETECTION, generic.SEGMENTATION)
FAMILIES = {family.name: family for family in NAMED + GENERIC}
DEFAULT_FAMILY = rtmdet_ins.FAMILY.name  # models saved before model.json named one
RTMDET_INS = rtmdet_ins.FAMILY

__all__ = ["ClassLayer", "DEFAULT_FAMILY", "FAMILIES", "Family", "GENERIC", "NAMED", "RTMDET_INS",
           "TrainingRecipe", "UnknownModel", "family_named", "family_of", "family_of_config", "supported_text"]


def family_named(name: str) -> Family:
    if name not in FAMILIES:
        raise UnknownModel(f"the model's family {name!r} is not one of {', '.join(FAMILIES)}")
    return FAMILIES[name]


def family_of(info: Mapping[str, Any]) -> Family:
    """The family a saved model's model.json records (RTMDet-Ins when it records none)."""
    return family_named(info.get("family", DEFAULT_FAMILY))


def family_of_config(model_cfg: Mapping[str, Any]) -> Family | None:
    """The family of a config's ``model``: a named family's, else a generic one when mmdet
    builds it as a detector (None: not a detector of ours)."""
    for family in NAMED + GENERIC:
        if family.recognises(model_cfg):
            return family
    return None


def supported_text() -> str:
    """What can be packaged, for messages."""
    named = "; ".join(f"{f.title} ({f.task})" for f in NAMED)
    return (f"mmdet 3.x image detectors: the named families {named}; any other config that mmdet "
            f"builds as an object detector or instance segmenter, on torch")
