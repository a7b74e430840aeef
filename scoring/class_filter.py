"""The ``classes`` predict param, applied the same way by every runtime.

Ultralytics' ``classes=[...]`` keeps only some labels *before* its top-k and NMS, so
``max_detections`` counts kept classes only and a dropped class never suppresses a kept one.
Here the excluded classes' logits are set to -inf in the head's raw class outputs, before the
post-processing reads them: their sigmoid scores are 0, never above ``score_threshold`` (>= 0),
so mmdet's ``filter_scores_and_topk`` (torch) and its numpy copy (ONNX) never pick them. Both
runtimes call ``drop_excluded_classes`` on outputs laid out (batch, classes, height, width), so
their answers stay identical.
"""
from __future__ import annotations

from typing import Any, Sequence

from scoring.errors import InputError
from scoring.schema import PredictParams

EXCLUDED_LOGIT = float("-inf")  # sigmoid(-inf) == 0 in float32, in torch and numpy alike


def excluded_classes(class_names: Sequence[str], params: PredictParams) -> list[int]:
    """Indices of the model's classes that ``params.classes`` leaves out (empty: keep all).
    A name the model does not know is an InputError that lists the model's classes."""
    if params.classes is None:
        return []
    known = set(class_names)
    unknown = [name for name in params.classes if name not in known]
    if unknown:
        raise InputError(f"param 'classes' names {'a class' if len(unknown) == 1 else 'classes'} "
                         f"this model does not have: {', '.join(map(repr, unknown[:20]))}"
                         f"{' ...' if len(unknown) > 20 else ''}; the model's classes: "
                         f"{', '.join(class_names)}")
    kept = set(params.classes)
    return [index for index, name in enumerate(class_names) if name not in kept]


def drop_excluded_classes(class_logits: Sequence[Any], excluded: list[int]) -> None:
    """In place: each level's class logits (numpy arrays or torch tensors, (batch, classes, h, w))
    set to -inf for the ``excluded`` classes."""
    if not excluded:
        return
    for logits in class_logits:
        logits[:, excluded] = EXCLUDED_LOGIT


def check_classes(class_names: Sequence[str], params: PredictParams) -> None:
    """Refuse unknown class names before any work (the runner calls it once per call)."""
    excluded_classes(class_names, params)

