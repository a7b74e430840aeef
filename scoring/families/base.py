"""What a model family is: the one place that owns every family-specific decision (as SAHI's
``DetectionModel`` per library, or Ultralytics' task predictors).

A family says what it does (its task: ``object-detection`` or ``instance-segmentation``), how its
configs are recognised, which configs mmdet ships for it and where their published checkpoints
are listed, how the class count is set in a config (every class-shaped layer, background rows
included) and read from a checkpoint, how a request's params map onto its ``test_cfg`` (and its
default params from it), how the ``classes`` param filters its raw outputs, and per runtime the
function that loads a saved model and the one that exports it. Everything outside the family
asks it. Detection is the base contract: masks are what an instance-segmentation family adds.

This module imports no runtime and no mmdet: a family's loaders and exporters are named as
``"module:function"`` and imported only when a model needs them (exporters only by packaging,
``mlflow_model``, which a served model never carries).
"""
from __future__ import annotations

import copy
import importlib
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, MutableMapping, Sequence

from scoring.errors import MmdetMlflowError
from scoring.schema import INSTANCE_SEGMENTATION, PredictParams


# The runtimes of an exported graph with numpy post-processing (RTMDet-Ins, RTMDet, YOLOF): its
# loaders, and the one exporter that writes the graph for both.
EXPORTED_GRAPH_LOADERS = {
    "onnx": "scoring.runtimes.onnx_rtmdet:load_onnx_predictor",
    "openvino": "scoring.runtimes.openvino_rtmdet:load_openvino_predictor",
}
GRAPH_EXPORTERS = {runtime: "mlflow_model.onnx_export:export_to_weights_dir" for runtime in EXPORTED_GRAPH_LOADERS}


# ``max_per_img`` that keeps every answer of a head that cuts its NMS answers by slicing.
UNCUT = 2**31 - 1


class UnknownModel(MmdetMlflowError, ValueError):
    """A model of a family we do not know, or on a runtime its family lacks."""


@dataclass(frozen=True)
class ClassLayer:
    """The layer whose rows count a checkpoint's classes: the state-dict key (a regex matched
    against the whole key), and how rows map to classes (``rows = per_class x classes +
    background``: Mask R-CNN's ``fc_cls`` has a background row; YOLOF's ``cls_score`` a row per
    anchor and class)."""

    key: str
    background: int = 0
    per_class: int = 1

    def classes(self, state_dict: Mapping[str, Any]) -> int | None:
        pattern = re.compile(self.key)
        key = next((k for k in state_dict if pattern.fullmatch(k)), None)
        if key is None:
            return None
        rows = int(state_dict[key].shape[0]) - self.background
        return rows // self.per_class if rows % self.per_class == 0 else None


@dataclass(frozen=True)
class TrainingRecipe:
    """What fine-tuning (``mmdet_mlflow.training.config``) needs to know of a family beyond its
    config, whose own recipe it trains with (optimizer, schedule, pipelines, hooks), scaled to
    the fine-tune's steps and input size. Data only: no mmdet here."""

    # The learning rate and weight decay a fine-tune uses when its settings name none (the
    # config's own optimizer takes them); None: the config's own value.
    learning_rate: float | None = None
    weight_decay: float | None = None
    # The (w, h) input the config's pipelines are written for: that scale becomes the
    # fine-tune's input size, twice it (RTMDet's mosaic canvas) twice that size, and every
    # other scale in them (multi-scale resizes, crops) is scaled by as much.
    pipeline_scale: tuple[int, int] = (1333, 800)
    # The smallest input side (``image_size``, or ``image_min_size``) the scaled training
    # pipeline still works at: below it the model cannot train (Deformable DETR's two-stage
    # queries need as many encoder tokens), refused before training with this reason.
    min_image_size: int = 32
    min_image_size_reason: str = ""


@dataclass(frozen=True)
class Family:
    name: str  # what model.json's "family" records
    title: str  # for messages
    task: str  # OBJECT_DETECTION or INSTANCE_SEGMENTATION
    model_types: tuple[str, ...]  # the config's model.type
    # The config's head types (``model.bbox_head`` of a one-stage model, ``model.roi_head`` of a
    # two-stage one) that tell two families of one model type apart (RTMDet and RTMDet-Ins);
    # empty: any.
    head_types: tuple[str, ...] = ()
    config_folders: tuple[str, ...] = ()  # mmdet's configs/<folder>: its configs and metafile.yml
    shipped_configs: tuple[str, ...] = ()  # the configs we name and test
    class_layer: ClassLayer | None = None
    # Every state-dict key whose tensor is shaped by the class count (a regex matched against
    # the whole key): re-initialised when fine-tuning for other classes.
    class_shaped: str | None = None
    # A key only this family's checkpoints have, where another family shares its class layer
    # (RTMDet-Ins's mask kernels beside RTMDet's class layer): tells a checkpoint's family.
    own_key: str | None = None
    # runtime -> "module:function" that loads a weights folder: (path, info=, device=,
    # batch_size=) -> the runtime's detector. Imported only when a model on it is loaded.
    loaders: Mapping[str, str] = field(default_factory=dict)
    # runtime -> "module:function" that exports the network for that runtime: (weights folder,
    # detector) -> its record. Resolved by packaging (mlflow_model) only.
    exporters: Mapping[str, str] = field(default_factory=dict)
    # How fine-tuning trains it (``TrainingRecipe``).
    training: TrainingRecipe = TrainingRecipe()
    # How a class-shaped tensor's rows of one class lie when a class has several (rows per
    # class, ``scoring.runtimes.torch_mmdet.class_shaped_layers``): "class-major" (a class's
    # rows together: Mask R-CNN's 4 box deltas per class) or "anchor-major" (a block of all
    # classes per anchor: YOLOF's cls_score). Rows beyond the classes' (a background row) come
    # last, as mmdet lays them out.
    class_rows: str = "class-major"
    # Where the model config counts a picture's candidates when its head scores each candidate
    # once per class and keeps the best ``max_per_img`` of candidates x classes (dotted keys of
    # ``model``, the first found counts: a DETR's ``num_queries``, Sparse R-CNN's
    # ``rpn_head.num_proposals``, a two-stage model's proposals ``test_cfg.rpn.max_per_img``).
    # What the head can answer at most: ``answer_capacity``.
    candidate_counts: tuple[str, ...] = ()
    # The form the torch runtime serves it in (``scoring.runtimes.torch_serving_form``): batch
    # norms folded into the convolutions before them, and on a CPU channels-last memory. Each
    # changes answers by float rounding only, so a family takes them once its answers are tested
    # equal to mmdet's in that form. ``verify_serving_form``: the form is kept only where the
    # network's raw outputs on a probe picture at load show it the same network (the generic
    # path: an unknown detector may read a tensor's memory as NCHW in an op of its own).
    fold_batchnorms: bool = False
    channels_last: bool = False
    verify_serving_form: bool = False

    @property
    def makes_masks(self) -> bool:
        return self.task == INSTANCE_SEGMENTATION

    @property
    def runtimes(self) -> tuple[str, ...]:
        return tuple(self.loaders)

    # --- configs ----------------------------------------------------------------------------

    def recognises(self, model_cfg: Mapping[str, Any]) -> bool:
        """Whether a config's ``model`` is of this family."""
        if str(model_cfg.get("type", "")).split(".")[-1] not in self.model_types:
            return False
        if not self.head_types:
            return True
        heads = (model_cfg.get("bbox_head") or {}, model_cfg.get("roi_head") or {})
        return any(str(head.get("type", "")).split(".")[-1] in self.head_types for head in heads)

    def set_num_classes(self, model_cfg: MutableMapping[str, Any], count: int) -> None:
        """Size every class-shaped head of the config for ``count`` classes: every
        ``num_classes`` of the model's heads (a list of stage heads too), but not the region
        proposal network's, which has one class (object or not)."""
        def visit(node, inside_rpn: bool) -> None:
            if isinstance(node, MutableMapping):
                for key, value in node.items():
                    if key == "num_classes" and not inside_rpn and isinstance(value, int):
                        node[key] = count
                    else:
                        visit(value, inside_rpn or key == "rpn_head")
            elif isinstance(node, list):
                for item in node:
                    visit(item, inside_rpn)

        for key in model_cfg:
            if key.endswith("_head"):
                visit(model_cfg[key], key == "rpn_head")

    def class_count(self, state_dict: Mapping[str, Any]) -> int | None:
        """Classes of a checkpoint, from its class layer's rows (None: no such layer)."""
        return self.class_layer.classes(state_dict) if self.class_layer else None

    def claims(self, state_dict: Mapping[str, Any]) -> bool:
        """Whether a checkpoint looks like this family's: its class layer, and its own key."""
        if self.class_count(state_dict) is None:
            return False
        return self.own_key is None or any(re.fullmatch(self.own_key, key) for key in state_dict)

    def is_class_shaped(self, key: str) -> bool:
        return bool(self.class_shaped) and re.fullmatch(self.class_shaped, key) is not None

    # --- predict params ---------------------------------------------------------------------

    @staticmethod
    def detection_cfg(test_cfg: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        """The part of a test_cfg that decides the final detections: a two-stage model's
        ``rcnn``, else the test_cfg itself."""
        return test_cfg["rcnn"] if isinstance(test_cfg.get("rcnn"), MutableMapping) else test_cfg

    def default_params(self, test_cfg: Mapping[str, Any]) -> PredictParams:
        """Predict params that follow the config's own test settings where they exist (its NMS
        IoU, its detections per picture, its mask threshold); an object-detection model answers
        without masks (``mask_format`` "none")."""
        cfg = self.detection_cfg(dict(test_cfg or {}))
        nms = cfg.get("nms") or {}
        return PredictParams(
            iou_threshold=float(nms.get("iou_threshold", PredictParams.iou_threshold)),
            max_detections=int(cfg.get("max_per_img", PredictParams.max_detections)),
            mask_threshold=float(cfg.get("mask_thr_binary", PredictParams.mask_threshold)),
            mask_format=PredictParams.mask_format if self.makes_masks else "none",
        )

    def answer_capacity(self, model_cfg: Mapping[str, Any], class_count: int) -> int | None:
        """The most answers the model's head can give a picture: its candidates (the first of
        ``candidate_counts`` the config has) x classes; None: no bound known (a head that cuts
        its NMS answers to ``max_per_img`` takes any count)."""
        for dotted in self.candidate_counts:
            node: Any = model_cfg
            for part in dotted.split("."):
                node = node.get(part) if isinstance(node, Mapping) else None
            if isinstance(node, int) and node > 0:
                return node * class_count
        return None

    def test_cfg(self, test_cfg, params: PredictParams, capacity: int | None = None,
                 every_answer: bool = False):
        """A copy of the model's test settings with a request's params where the family has
        them (score threshold, NMS IoU and class-agnosticism, detections per picture, mask
        threshold; the candidates before NMS at least ``max_detections``). Passed per call,
        never written into the shared model, so concurrent requests cannot see each other's.

        ``capacity``: the most answers the head can give (``answer_capacity``), which its
        ``max_per_img`` cannot pass (a top-k over candidates x classes). ``every_answer``: keep
        all of them, for a ``classes`` param applied to the head's answers: then it acts before
        the cut to ``max_detections`` (a top-k over all candidates x classes, or per-class NMS,
        filtered, equals the filter first), and the runtime cuts."""
        cfg = copy.deepcopy(test_cfg)
        final = self.detection_cfg(cfg)
        if "score_thr" in final:
            final["score_thr"] = params.score_threshold
        if isinstance(final.get("nms"), MutableMapping):
            final["nms"]["iou_threshold"] = params.iou_threshold
            final["nms"]["class_agnostic"] = params.class_agnostic_nms  # mmcv's batched_nms reads it
        if "max_per_img" in final:
            if every_answer:
                final["max_per_img"] = capacity or UNCUT
            else:
                final["max_per_img"] = min(params.max_detections, capacity or params.max_detections)
        if "nms_pre" in final:
            final["nms_pre"] = max(int(final["nms_pre"]), params.max_detections)
        if "mask_thr_binary" in final:
            final["mask_thr_binary"] = params.mask_threshold
        return cfg

    def exclude_classes(self, class_logits: Sequence[Any], excluded: list[int]) -> None:
        """In place: the ``classes`` param on a dense head's raw class outputs (each level
        (batch, classes, height, width)): the excluded classes' logits set to -inf, so no score
        top-k or NMS ever picks them (``scoring.class_filter``)."""
        from scoring.class_filter import drop_excluded_classes

        drop_excluded_classes(class_logits, excluded)

    # --- runtimes ---------------------------------------------------------------------------

    def loader(self, runtime: str) -> Callable:
        return _imported(self._named(self.loaders, runtime, "runtime"))

    def lent_predictor(self, detector, config, class_names: Sequence[str], default_params: PredictParams,
                       batch_size: int):
        """A context manager: the family's torch runtime around a live mmdet ``detector`` that
        stays its owner's (a network in the middle of its fine-tune, validated as its saved
        model will answer; ``config``: the config it is saved with). Its mode and head are as
        they were afterwards (``scoring.runtimes.torch_mmdet.borrowed_predictor``)."""
        return self.loader("torch").lend(detector, self, config, class_names, default_params, batch_size)

    def exporter(self, runtime: str) -> str:
        """``"module:function"`` of the export for ``runtime`` (packaging imports it)."""
        return self._named(self.exporters, runtime, "export")

    def check_runtime(self, runtime: str) -> None:
        """Refuse a runtime the family lacks, before anything is written."""
        self._named(self.loaders, runtime, "runtime")

    def _named(self, table: Mapping[str, str], runtime: str, what: str) -> str:
        if runtime not in table or runtime not in self.loaders:
            have = ", ".join(runtime for runtime in self.loaders if runtime in table) or "none"
            raise UnknownModel(f"{self.title} models have no {runtime!r} {what} here ({what}s: {have})")
        return table[runtime]


def _imported(reference: str) -> Callable:
    module, function = reference.split(":")
    return getattr(importlib.import_module(module), function)
