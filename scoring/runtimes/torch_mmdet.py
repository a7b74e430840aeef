"""The torch runtime's shared part: an mmdet detector of any family behind the runtime seam.

Loading (``build_detector``, ``load_detector``: the one place a saved model's config and weights
become an mmdet model) and ``MmdetTorchRuntime``, the base of every torch runtime: mmdet's own test
pipeline (resize, pad, pack; as ``inference_detector`` prepares a picture) as ``preprocess``,
and the request's params applied through the model's family (``Family.test_cfg``). Two runtimes
serve the families that need nothing of their own:

- ``DenseHeadDetector`` (one-stage dense heads: RTMDet, YOLOF, VFNet): ``forward`` runs the
  network to the head's raw outputs, ``postprocess`` is the family's class filter on them, then
  mmdet's ``predict_by_feat`` (score filter, top-k, box decoding, rescale, NMS) with the
  request's test settings;
- ``WholeDetector`` (the generic path, DETRs, Sparse R-CNN, any other mmdet detector): mmdet's
  own ``predict`` with the request's test settings, answers from its ``pred_instances`` (masks
  when the model makes them); settings the model has no place for (a score threshold of a
  DETR) and the ``classes`` param are applied to its answers; for the latter the head keeps
  every answer (``Family.test_cfg``'s ``every_answer``), so the filter acts before the cut to
  ``max_detections``.

RTMDet-Ins (``torch_rtmdet``) and Mask R-CNN (``torch_mask_rcnn``) build on the base to keep
their masks lazy. Only a model whose ``model.json`` names the torch runtime imports this module.

Every network pass runs under ``torch.inference_mode`` rather than ``no_grad``: nothing of an
answer is ever differentiated, and without autograd's version counters and view tracking the
heads made of many small operations (Sparse R-CNN's iterative stages) run measurably faster
(bench/families.py).
"""
from __future__ import annotations

import contextlib
import copy
import functools
import threading
from typing import Iterator, Sequence

import numpy as np
import torch

from scoring import settings
from scoring.class_filter import excluded_classes
from scoring.model_dir import WeightsDir
from scoring.runtimes.base import ImageDetections, Predictor, forward_batch_size, masks_wanted
from scoring.schema import PredictParams


def default_device() -> str:
    return settings.DEVICE.value() or ("cuda" if torch.cuda.is_available() else "cpu")


def build_detector(config, state_dict, class_names: Sequence[str], device: str | None = None):
    """An mmdet detector in eval mode with exactly these weights (strict: every key, every
    shape), as mmdet's init_detector would build it."""
    from mmdet.registry import MODELS
    from mmengine.model.utils import revert_sync_batchnorm
    from mmengine.registry import init_default_scope

    from scoring.families import family_of_config
    from scoring.weights import check_state_dict

    init_default_scope(config.get("default_scope", "mmdet"))
    # a copy: some detectors write into the config they are built from (Deformable DETR's
    # two-stage settings), which would make the config saved beside the weights unbuildable
    model = revert_sync_batchnorm(MODELS.build(copy.deepcopy(config.model)))
    check_state_dict(model, state_dict, "weights", family_of_config(config.model))
    model.load_state_dict(state_dict, strict=True)
    model.cfg = config
    model.dataset_meta = {"classes": tuple(class_names)}
    return model.to(device or default_device()).eval()


def load_detector(weights_dir, device: str | None = None, info: dict | None = None):
    """(detector, model.json info) of a weights folder (a path or a ``scoring.model_dir.WeightsDir``;
    ``info``: its model.json, when already read)."""
    from mmengine.config import Config

    from scoring.weights import read_state_dict

    weights_dir = WeightsDir(getattr(weights_dir, "path", weights_dir))
    info = info if info is not None else weights_dir.read_info()
    cfg = Config.fromfile(str(weights_dir.config))
    # The one safe reader: a truncated or corrupt weights file fails the server's start with a
    # message naming the file, not torch's "failed finding central directory".
    state_dict, _ = read_state_dict(weights_dir.weights)
    return build_detector(cfg, state_dict, info["classes"], device), info


def class_shaped_layers(model_cfg, family) -> dict[str, tuple[int, int]]:
    """Every tensor of the model whose shape the class count sets, found by building the model
    for one class and for two: key -> (rows per class, other rows) of its first dimension."""
    from mmdet.registry import MODELS
    from mmengine.registry import init_default_scope

    init_default_scope("mmdet")
    shapes = []
    for count in (1, 2):
        cfg = copy.deepcopy(model_cfg)
        family.set_num_classes(cfg, count)
        if "backbone" in cfg:
            cfg["backbone"]["init_cfg"] = None
        shapes.append({k: tuple(v.shape) for k, v in MODELS.build(cfg).state_dict().items()})
    one, two = shapes
    return {key: (two[key][0] - one[key][0], 2 * one[key][0] - two[key][0])
            for key in one if one[key] != two[key]}


def count_classes(state_dict, model_cfg, family) -> int | None:
    """The classes a checkpoint was trained for: by its family's class layer, or (a family that
    names none) by the shape of any class-shaped tensor (``class_shaped_layers``)."""
    count = family.class_count(state_dict)
    if count is not None:
        return count
    for key, (per_class, rest) in class_shaped_layers(model_cfg, family).items():
        if key in state_dict and per_class and (state_dict[key].shape[0] - rest) % per_class == 0:
            return (int(state_dict[key].shape[0]) - rest) // per_class
    return None


class MmdetTorchRuntime(Predictor):
    """An mmdet detector on BGR uint8 arrays, real batches (one forward pass per batch)."""

    runtime = "torch"
    # Whether the ``classes`` param is applied to the head's answers (not to its raw class
    # outputs): the head then keeps every answer when a request leaves classes out.
    filters_answers = False

    def __init__(self, detector, family, class_names: Sequence[str], default_params: PredictParams,
                 batch_size: int = 8, config=None):
        """``config``: the mmengine config whose test pipeline prepares the pictures (default:
        the detector's own ``cfg``, which ``build_detector`` sets)."""
        from mmcv.transforms import Compose
        from mmdet.utils import get_test_pipeline_cfg
        from mmengine.registry import init_default_scope

        init_default_scope("mmdet")
        super().__init__(family, class_names, default_params, batch_size)
        self.detector = detector
        steps = [s for s in copy.deepcopy(get_test_pipeline_cfg(
                 detector.cfg if config is None else config))
                 if "LoadAnnotations" not in s["type"]]  # nothing to annotate at inference
        steps[0]["type"] = "mmdet.LoadImageFromNDArray"  # as mmdet's inference_detector does
        resize = next((s for s in steps if s["type"].split(".")[-1] == "Resize" and s.get("keep_ratio")), None)
        if resize is not None:
            self.input_scale = tuple(resize["scale"])
        self.pipeline = Compose(steps)
        model_cfg = (detector.cfg if config is None else config).model
        self._test_cfg = copy.deepcopy(model_cfg.test_cfg)
        self._answer_capacity = family.answer_capacity(model_cfg, len(self.class_names))
        self.configured_score_threshold = family.detection_cfg(self._test_cfg).get("score_thr")

    @property
    def device(self) -> torch.device:
        return self.detector.data_preprocessor.device

    def preprocess(self, images: Sequence[np.ndarray]) -> dict:
        """mmdet's test pipeline (resize, pad, pack) for each image, collated into one batch."""
        packed = [self.pipeline(dict(img=img, img_id=i)) for i, img in enumerate(images)]
        return dict(inputs=[p["inputs"] for p in packed],
                    data_samples=[p["data_samples"] for p in packed])

    def give_back(self) -> None:
        """Undo what this runtime put on its detector, when the detector was only lent to it
        (``borrowed_predictor``); nothing here."""

    def test_cfg(self, params: PredictParams):
        """The model's test settings with this request's params (``Family.test_cfg``)."""
        every_answer = self.filters_answers and bool(excluded_classes(self.class_names, params))
        return self.family.test_cfg(self._test_cfg, params, self._answer_capacity, every_answer)

    def kept_answers(self, result, params: PredictParams) -> np.ndarray:
        """Indices of the answers (an mmdet ``InstanceData``) a request keeps, best first: the
        score threshold and the ``classes`` param where the model had no place for them (a
        no-op where it had), then the best ``max_detections`` (a stable sort by score: mmdet's
        order where it sorts, and Sparse R-CNN's unsorted top-k put in order)."""
        scores = result.scores.detach().float().cpu().numpy()
        keep = scores >= params.score_threshold
        excluded = excluded_classes(self.class_names, params)
        if excluded:
            keep &= ~np.isin(result.labels.detach().cpu().numpy(), excluded)
        kept = np.flatnonzero(keep)
        return kept[np.argsort(-scores[kept], kind="stable")][:params.max_detections]

    def detections(self, results, metas, params: PredictParams,
                   masks_of=lambda i, result: None) -> list[ImageDetections]:
        """mmdet's per-image ``InstanceData`` as our detections, those ``kept_answers`` keeps."""
        out = []
        for i, (result, meta) in enumerate(zip(results, metas)):
            scores = result.scores.detach().float().cpu().numpy()
            labels = result.labels.detach().cpu().numpy()
            kept = self.kept_answers(result, params)
            masks = masks_of(i, result) if masks_wanted(params) else None
            height, width = meta["ori_shape"][:2]
            out.append(ImageDetections(
                image_size=(int(width), int(height)),
                boxes=result.bboxes.detach().float().cpu().numpy()[kept],
                scores=scores[kept], labels=labels[kept], class_names=self.class_names,
                masks=None if masks is None else masks.select(kept.tolist())))
        return out


class DenseHeadDetector(MmdetTorchRuntime):
    """A one-stage detector's dense head: the family's class filter on its raw class logits,
    then mmdet's own post-processing with the request's test settings."""

    @torch.inference_mode()
    def forward(self, batch: dict, params: PredictParams) -> dict:
        """The network only, one batched pass: normalize, backbone + neck, head -> its raw
        outputs (as an ONNX runtime's forward: the box decoding and NMS are post-processing)."""
        data = self.detector.data_preprocessor(batch, False)
        feats = self.detector.extract_feat(data["inputs"])
        return {"head_outputs": self.detector.bbox_head(feats),
                "metas": [sample.metainfo for sample in data["data_samples"]]}

    @torch.inference_mode()
    def postprocess(self, raw: dict, params: PredictParams) -> list[ImageDetections]:
        outputs = raw["head_outputs"]
        self.family.exclude_classes(outputs[0], excluded_classes(self.class_names, params))
        results = self.detector.bbox_head.predict_by_feat(*outputs, batch_img_metas=raw["metas"],
                                                          cfg=self.test_cfg(params), rescale=True)
        return self.detections(results, raw["metas"], params)


class WholeDetector(MmdetTorchRuntime):
    """mmdet's own ``predict`` of any detector, with the request's test settings. A detector
    reads them from its heads (``test_cfg`` attributes), so they are put there for the call,
    one call at a time, and put back."""

    filters_answers = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._predicting = threading.Lock()

    @torch.inference_mode()
    def forward(self, batch: dict, params: PredictParams) -> dict:
        data = self.detector.data_preprocessor(batch, False)
        with self._predicting, self._heads_set_for(self.test_cfg(params)):
            samples = self.detector.predict(data["inputs"], data["data_samples"], rescale=True)
        return {"results": [sample.pred_instances for sample in samples],
                "metas": [sample.metainfo for sample in samples]}

    def postprocess(self, raw: dict, params: PredictParams) -> list[ImageDetections]:
        return self.detections(raw["results"], raw["metas"], params, masks_of=_dense_masks)

    def _heads_set_for(self, cfg):
        return _HeadSettings(self.detector, cfg)


class _HeadSettings:
    """Each head's ``test_cfg`` set from a whole test_cfg for a ``with`` block: the one-stage or
    DETR head takes it whole, a two-stage model's RPN its ``rpn`` and RoI head its ``rcnn``."""

    def __init__(self, detector, cfg):
        self.places = []
        for name, part in (("bbox_head", cfg), ("rpn_head", cfg.get("rpn")), ("roi_head", cfg.get("rcnn"))):
            head = getattr(detector, name, None)
            if head is not None and hasattr(head, "test_cfg") and part is not None:
                self.places.append((head, head.test_cfg, part))

    def __enter__(self):
        for head, _, part in self.places:
            head.test_cfg = part

    def __exit__(self, *exc):
        for head, saved, _ in self.places:
            head.test_cfg = saved


class DenseMasks:
    """The ``MaskSource`` of masks mmdet already made at the picture's size."""

    def __init__(self, masks):
        self.masks = masks

    def __len__(self) -> int:
        return int(self.masks.shape[0])

    def iter_masks(self, threshold: float) -> Iterator[np.ndarray]:
        for mask in self.masks:
            yield (mask.detach().float() > threshold).cpu().numpy() if mask.dtype != torch.bool \
                else mask.cpu().numpy()

    def select(self, indices: Sequence[int]) -> "DenseMasks":
        return DenseMasks(self.masks[list(indices)])


def _dense_masks(index: int, result) -> DenseMasks | None:
    return DenseMasks(result.masks) if "masks" in result else None


@contextlib.contextmanager
def borrowed_predictor(runtime_class, detector, family, config, class_names: Sequence[str],
                       default_params: PredictParams, batch_size: int) -> Iterator[MmdetTorchRuntime]:
    """A ``runtime_class`` around a detector that stays its owner's, such as a network in the
    middle of its fine-tune, validated between epochs as its saved model will answer
    (``config``: the config the model is saved with, whose test pipeline that model will use).
    While lent the detector is in eval mode; afterwards it is as it was: its mode, and whatever
    the runtime put on it (``give_back``)."""
    was_training = detector.training
    detector.eval()
    predictor = runtime_class(detector, family, class_names, default_params, batch_size=batch_size,
                              config=config)
    try:
        yield predictor
    finally:
        predictor.give_back()
        detector.train(was_training)


def _loader(runtime_class):
    """The loader of a torch runtime class (a family's ``loaders["torch"]``), which also lends
    it around a live detector: ``load.lend(detector, family, config, ...)`` (``borrowed_predictor``)."""

    def load(weights_dir, device: str | None = None, batch_size: int | None = None, *,
             info: dict | None = None) -> MmdetTorchRuntime:
        from scoring.families import family_of
        from scoring.runtimes.torch_serving_form import prepare_for_serving

        detector, info = load_detector(weights_dir, device, info)
        family = family_of(info)
        detector = prepare_for_serving(
            detector, family, reload=lambda: load_detector(weights_dir, device, info)[0])
        on_gpu = detector.data_preprocessor.device.type == "cuda"
        return runtime_class(detector, family, info["classes"],
                             PredictParams.from_dict(info["default_params"]),
                             batch_size=batch_size or forward_batch_size(info, on_gpu))

    load.__doc__ = f"The {runtime_class.__name__} of a weights folder (``info``: its model.json, when already read)."
    load.lend = functools.partial(borrowed_predictor, runtime_class)
    return load


load_dense_head_detector = _loader(DenseHeadDetector)
load_whole_detector = _loader(WholeDetector)
