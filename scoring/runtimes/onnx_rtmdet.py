"""RTMDet-Ins on ONNX Runtime: the same answers as the torch runtime without torch, mmcv, mmdet
or mmengine (this module imports numpy, OpenCV and onnxruntime only).

The ONNX file holds the network up to the head's raw outputs (``mlflow_model.onnx_export``):
per level the class logits, the box distances and the dynamic-kernel parameters, plus the mask
prototype features. Everything around it is reproduced here in numpy, step by step as mmdet
3.3.0 / mmcv 2.1.0 do it, in float32 like they do, so that the boxes, scores and masks match:

- ``preprocess``: the config's test pipeline (``Resize`` keep_ratio, ``Pad``) and
  ``DetDataPreprocessor`` (normalize, channel order) -> the very tensor mmdet feeds the network;
- ``postprocess``: ``RTMDetInsHead.predict_by_feat`` -> ``_predict_by_feat_single`` ->
  ``_bbox_mask_post_process`` (score filter and top-k, box decoding from the priors, rescale,
  min size, mmcv's ``batched_nms``, ``max_per_img``, the dynamic mask convolutions), with the
  full-size masks made a chunk at a time as ``scoring.runtimes.torch_rtmdet.MaskResampler`` makes them.

The settings these steps need (input size, normalization, strides, test_cfg, ...) are written
into model.json's ``"onnx"`` section at export time, so no mmengine config is read here.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import cv2
import numpy as np

from mlflow_model.checkpoints import sha256_of
from mlflow_model.model_dir import INFO_FILE, ONNX_FILE, ONNX_INFO_KEY
from scoring.errors import MmdetMlflowError
from scoring.runtimes import masks as mask_windows
from scoring.runtimes.base import ImageDetections, Segmenter
from scoring.schema import PredictParams

MASK_CHUNK_BYTES = mask_windows.MASK_CHUNK_BYTES
# cv2.resize works on at most this many channels (CV_CN_MAX): masks are resized as channels.
CV2_MAX_CHANNELS = 512
# Version of the "onnx" section of model.json this module reads.
ONNX_INFO_FORMAT = 1


class OnnxModelError(MmdetMlflowError):
    """An ONNX model that is missing, corrupt, or does not fit the settings in its model.json."""


# ----------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class OnnxModelSpec:
    """What the numpy pre- and post-processing need to know about the exported network, read from
    model.json's "onnx" section (written by ``mlflow_model.onnx_export.onnx_model_spec``)."""

    input_name: str
    input_hw: tuple[int, int]  # static network input (height, width): the Pad size
    resize_scale_wh: tuple[int, int]  # Resize(scale=(w, h))
    keep_ratio: bool
    pad_value: tuple[float, float, float]  # per channel of the BGR image
    mean: tuple[float, float, float]  # DetDataPreprocessor mean/std, in the network's order
    std: tuple[float, float, float]
    bgr_to_rgb: bool
    strides: tuple[int, ...]
    num_classes: int
    num_prototypes: int
    dyconv_channels: int
    weight_nums: tuple[int, ...]
    bias_nums: tuple[int, ...]
    test_cfg: dict  # nms_pre, score_thr, min_bbox_size, nms (iou_threshold), max_per_img
    outputs: dict  # "cls_scores" / "bbox_preds" / "kernel_preds": names per level; "mask_feat"
    prior_offset: float = 0.0  # MlvlPointGenerator's offset (0 for RTMDet)

    @property
    def num_gen_params(self) -> int:
        return sum(self.weight_nums) + sum(self.bias_nums)

    @classmethod
    def from_dict(cls, d: dict) -> "OnnxModelSpec":
        if d.get("format") != ONNX_INFO_FORMAT:
            raise OnnxModelError(f"model.json's onnx section has format {d.get('format')!r}; this "
                                 f"code reads format {ONNX_INFO_FORMAT}: re-export the model")
        try:
            pre, head = d["preprocess"], d["head"]
            return cls(
                input_name=d["input_name"],
                input_hw=tuple(pre["input_hw"]),
                resize_scale_wh=tuple(pre["resize_scale_wh"]),
                keep_ratio=bool(pre["keep_ratio"]),
                pad_value=tuple(pre["pad_value"]),
                mean=tuple(pre["mean"]),
                std=tuple(pre["std"]),
                bgr_to_rgb=bool(pre["bgr_to_rgb"]),
                strides=tuple(head["strides"]),
                num_classes=int(head["num_classes"]),
                num_prototypes=int(head["num_prototypes"]),
                dyconv_channels=int(head["dyconv_channels"]),
                weight_nums=tuple(head["weight_nums"]),
                bias_nums=tuple(head["bias_nums"]),
                test_cfg=dict(d["test_cfg"]),
                outputs=dict(d["outputs"]),
                prior_offset=float(head.get("prior_offset", 0.0)),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise OnnxModelError(f"model.json's onnx section is incomplete or malformed ({err!r}): "
                                 f"re-export the model") from None

    def expected_outputs(self, batch: Any = "batch") -> dict[str, tuple]:
        """Output name -> (batch, channels, height, width) the head must produce for this config."""
        height, width = self.input_hw
        want = {}
        for kind, channels in (("cls_scores", self.num_classes), ("bbox_preds", 4),
                               ("kernel_preds", self.num_gen_params)):
            for name, stride in zip(self.outputs[kind], self.strides):
                want[name] = (batch, channels, math.ceil(height / stride), math.ceil(width / stride))
        stride = self.strides[0]  # MaskFeatModule works at the first level's size
        want[self.outputs["mask_feat"]] = (batch, self.num_prototypes, math.ceil(height / stride),
                                           math.ceil(width / stride))
        return want


# ----------------------------------------------------------------------------- preprocessing


@dataclass(frozen=True)
class ImageMeta:
    """What mmdet's pipeline records per image and the post-processing reads."""

    ori_hw: tuple[int, int]
    img_hw: tuple[int, int]  # mmdet's img_shape after Pad: the padded network input size
    scale_factor: tuple[float, float]  # (w_scale, h_scale) of the resize


def rescale_size(width: int, height: int, scale_wh: tuple[int, int]) -> tuple[int, int]:
    """mmcv.rescale_size with a tuple scale: the largest size with the image's aspect ratio that
    fits the long edge within max(scale) and the short edge within min(scale), rounded as
    mmcv._scale_size does (int(x + 0.5))."""
    long_edge, short_edge = max(scale_wh), min(scale_wh)
    factor = min(long_edge / max(height, width), short_edge / min(height, width))
    return int(width * float(factor) + 0.5), int(height * float(factor) + 0.5)


def resize_like_mmdet(image: np.ndarray, scale_wh: tuple[int, int],
                      keep_ratio: bool) -> tuple[np.ndarray, tuple[float, float]]:
    """mmdet.datasets.transforms.Resize with the default interpolation ('bilinear', backend
    'cv2'): mmcv.imrescale (keep_ratio) or mmcv.imresize to ``scale``, both cv2.INTER_LINEAR.
    Returns the image and mmdet's scale_factor (new_w / w, new_h / h)."""
    height, width = image.shape[:2]
    new_w, new_h = rescale_size(width, height, scale_wh) if keep_ratio else scale_wh
    resized = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    return resized, (new_w / width, new_h / height)


def pad_like_mmcv(image: np.ndarray, size_hw: tuple[int, int], pad_value) -> np.ndarray:
    """mmcv.transforms.Pad with a fixed size: mmcv.impad(shape=size) pads bottom and right."""
    height, width = image.shape[:2]
    if height > size_hw[0] or width > size_hw[1]:
        raise OnnxModelError(f"the resized image ({width}x{height}) is larger than the network "
                             f"input ({size_hw[1]}x{size_hw[0]}): the exported settings are wrong")
    canvas = np.empty((*size_hw, image.shape[2]), dtype=image.dtype)
    canvas[:] = np.asarray(pad_value, dtype=image.dtype)
    canvas[:height, :width] = image
    return canvas


# ----------------------------------------------------------------------------- post-processing


def sigmoid(x: np.ndarray) -> np.ndarray:
    return (1.0 / (1.0 + np.exp(-x))).astype(np.float32, copy=False)


def grid_priors(featmap_hw: tuple[int, int], stride: int, offset: float = 0.0) -> np.ndarray:
    """mmdet MlvlPointGenerator.single_level_grid_priors(with_stride=True): one
    (x, y, stride_w, stride_h) row per feature-map cell, row-major like the head's outputs."""
    height, width = featmap_hw
    shift_x = (np.arange(width, dtype=np.float32) + np.float32(offset)) * np.float32(stride)
    shift_y = (np.arange(height, dtype=np.float32) + np.float32(offset)) * np.float32(stride)
    xx = np.tile(shift_x, height)
    yy = np.repeat(shift_y, width)
    strides = np.full_like(xx, stride)
    return np.stack([xx, yy, strides, strides], axis=-1)


def per_prior(head_output: np.ndarray) -> np.ndarray:
    """(C, h, w) -> (h*w, C), one row per prior: the head's ``permute(1, 2, 0).reshape(-1, C)``."""
    return head_output.transpose(1, 2, 0).reshape(-1, head_output.shape[0])


def filter_scores_and_topk(scores: np.ndarray, score_thr: float, topk: int):
    """mmdet.models.utils.filter_scores_and_topk: (prior, class) pairs scoring above
    ``score_thr``, the ``topk`` best, best first. Returns (scores, labels, prior indices)."""
    prior_idx, class_idx = np.nonzero(scores > np.float32(score_thr))  # row-major as torch.nonzero
    kept = scores[prior_idx, class_idx]
    order = np.argsort(-kept, kind="stable")[:topk]
    return kept[order], class_idx[order], prior_idx[order]


def distance2bbox(points: np.ndarray, distances: np.ndarray, max_hw: tuple[int, int]) -> np.ndarray:
    """mmdet.structures.bbox.distance2bbox (DistancePointBBoxCoder.decode) with max_shape:
    (left, top, right, bottom) distances from the prior points, clamped to the image."""
    boxes = np.stack([points[:, 0] - distances[:, 0], points[:, 1] - distances[:, 1],
                      points[:, 0] + distances[:, 2], points[:, 1] + distances[:, 3]], axis=-1)
    np.clip(boxes[:, 0::2], 0, max_hw[1], out=boxes[:, 0::2])
    np.clip(boxes[:, 1::2], 0, max_hw[0], out=boxes[:, 1::2])
    return boxes


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float,
        max_num: int | None = None) -> np.ndarray:
    """mmcv.ops.nms on CPU (nms_cpu.cpp, offset 0), in float32 as mmcv computes it: boxes by
    descending score, each suppressing the later ones whose IoU with it is > ``iou_threshold``.
    Returns the kept indices, best first. Stopping at ``max_num`` kept boxes gives the first
    ``max_num`` of the full answer: whether a box is kept depends on better boxes only."""
    boxes = boxes.astype(np.float32, copy=False)
    x1, y1, x2, y2 = boxes.T
    areas = (x2 - x1) * (y2 - y1)
    order = np.argsort(-scores, kind="stable")
    threshold = np.float32(iou_threshold)
    zero = np.float32(0)
    suppressed = np.zeros(len(order), dtype=bool)
    keep = []
    for position, i in enumerate(order):
        if suppressed[position]:
            continue
        keep.append(i)
        if max_num is not None and len(keep) >= max_num:
            break
        rest = order[position + 1:]
        live = ~suppressed[position + 1:]
        if not live.any():
            break
        width = np.maximum(zero, np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]))
        height = np.maximum(zero, np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]))
        inter = width * height
        iou = inter / (areas[i] + areas[rest] - inter)
        suppressed[position + 1:] |= live & (iou > threshold)
    return np.asarray(keep, dtype=np.int64)


def batched_nms(boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray, iou_threshold: float,
                class_agnostic: bool = False, max_num: int | None = None) -> np.ndarray:
    """mmcv.ops.batched_nms below its split threshold (10000 boxes; nms_pre keeps us under it):
    class-aware NMS by shifting each class's boxes by label * (max coordinate + 1), so boxes of
    different classes never overlap, then one NMS. Done the same way (not per class) so the float
    arithmetic, and with it each IoU decision, is mmcv's. Returns kept indices, best first."""
    if class_agnostic:
        return nms(boxes, scores, iou_threshold, max_num)
    offsets = labels.astype(np.float32) * (boxes.max() + np.float32(1))
    return nms(boxes + offsets[:, None], scores, iou_threshold, max_num)


def dynamic_mask_logits(mask_feat: np.ndarray, kernels: np.ndarray, priors: np.ndarray,
                        spec: OnnxModelSpec) -> np.ndarray:
    """RTMDetInsHead._mask_predict_by_feat_single: each detection's kernel parameters become three
    1x1 convolutions (ReLU between) over [its relative coordinates, the mask prototypes].
    ``mask_feat``: (num_prototypes, h, w); returns (N, h, w) low-resolution logits."""
    num_inst = len(priors)
    height, width = mask_feat.shape[-2:]
    if num_inst == 0:
        return np.zeros((0, height, width), np.float32)
    # (h*w, 2): the points of level 0's priors over the mask features, as mmdet makes them
    coord = grid_priors((height, width), spec.strides[0], spec.prior_offset)[:, :2]
    # (points - coord) / (stride * 8), made directly in (N, 2, h*w) layout: the same float ops
    scale = (priors[:, 2] * np.float32(8))[:, None]
    features = np.empty((num_inst, 2 + spec.num_prototypes, height * width), np.float32)
    np.divide(priors[:, 0:1] - coord[None, :, 0], scale, out=features[:, 0])
    np.divide(priors[:, 1:2] - coord[None, :, 1], scale, out=features[:, 1])
    features[:, 2:] = mask_feat.reshape(1, -1, height * width)
    # parse_dynamic_params: the kernel vector is [weights of each layer..., biases of each layer...]
    splits = np.split(kernels, np.cumsum(spec.weight_nums + spec.bias_nums)[:-1], axis=1)
    n_layers = len(spec.weight_nums)
    x = features
    for layer in range(n_layers):
        out_channels = spec.dyconv_channels if layer < n_layers - 1 else 1
        # contiguous weights keep np.matmul on its BLAS path (2x faster)
        weight = np.ascontiguousarray(splits[layer]).reshape(num_inst, out_channels, -1)
        bias = np.ascontiguousarray(splits[n_layers + layer]).reshape(num_inst, out_channels, 1)
        x = np.matmul(weight, x)
        x += bias
        if layer < n_layers - 1:
            np.maximum(x, 0, out=x)
    return x.reshape(num_inst, height, width)


class NumpyMaskResampler:
    """Low-resolution mask logits -> full-size boolean masks, as scoring.runtimes.torch_rtmdet.MaskResampler
    (and mmdet's _bbox_mask_post_process) make them, a chunk at a time: bilinear upsampling by
    the stride, bilinear resize to the rescaled size (height scaled by the *width* factor, as
    mmdet 3.3.0 does), crop to the original image, sigmoid > threshold. cv2's INTER_LINEAR on
    float32 follows the same half-pixel rule as torch's bilinear with align_corners=False,
    border pixels repeated in both."""

    def __init__(self, mask_logits: np.ndarray, stride: int, scale_factor: tuple[float, float],
                 ori_hw: tuple[int, int]):
        self.mask_logits = mask_logits
        self.stride = stride
        self.inverse_scale_factor = [1 / s for s in scale_factor]
        self.ori_h, self.ori_w = ori_hw

    def __len__(self) -> int:
        return len(self.mask_logits)

    def _upsampled_shape(self, low_h: int, low_w: int) -> tuple[int, int]:
        h, w = low_h * self.stride, low_w * self.stride
        return (math.ceil(h * self.inverse_scale_factor[0]),
                math.ceil(w * self.inverse_scale_factor[1]))

    def windowed(self) -> bool:
        big_h, big_w = self._upsampled_shape(*self.mask_logits.shape[-2:])
        return mask_windows.windowed(big_h, big_w, self.ori_h, self.ori_w)

    def chunk_size(self) -> int:
        if self.windowed():
            return 1  # one mask at a time, in bands of rows (scoring.runtimes.masks)
        big_h, big_w = self._upsampled_shape(*self.mask_logits.shape[-2:])
        return int(min(CV2_MAX_CHANNELS, max(1, MASK_CHUNK_BYTES // (big_h * big_w * 4))))

    def masks(self, logits: np.ndarray, threshold: float) -> np.ndarray:
        """Boolean masks (k, ori_h, ori_w) for a chunk of low-resolution logits (k, h, w)."""
        low_h, low_w = logits.shape[-2:]
        big_h, big_w = self._upsampled_shape(low_h, low_w)
        # sigmoid(x) > t  <=>  x > logit(t): the same masks without a sigmoid over every pixel
        if threshold <= 0:
            cut = -np.inf
        elif threshold >= 1:
            cut = np.inf
        else:
            cut = math.log(threshold) - math.log1p(-threshold)
        channels_last = np.ascontiguousarray(logits.transpose(1, 2, 0))
        up = cv2.resize(channels_last, (low_w * self.stride, low_h * self.stride),
                        interpolation=cv2.INTER_LINEAR)
        if self.windowed():  # a long, thin image: only the kept window (scoring.runtimes.masks)
            up = up.reshape(low_h * self.stride, low_w * self.stride, -1).transpose(2, 0, 1)
            return mask_windows.windowed_resize(np.ascontiguousarray(up), (big_h, big_w),
                                                (self.ori_h, self.ori_w), cut)
        up = cv2.resize(up, (big_w, big_h), interpolation=cv2.INTER_LINEAR)
        up = up.reshape(big_h, big_w, -1)[: self.ori_h, : self.ori_w]  # cv2 drops a last axis of 1
        return (up > np.float32(cut)).transpose(2, 0, 1)

    def iter_masks(self, threshold: float) -> Iterator[np.ndarray]:
        step = self.chunk_size()
        for start in range(0, len(self.mask_logits), step):
            yield from self.masks(self.mask_logits[start : start + step], threshold)


# ----------------------------------------------------------------------------- the runtime


class OnnxSegmenter(Segmenter):
    """RTMDet-Ins through ONNX Runtime, with mmdet's pre- and post-processing in numpy."""

    runtime = "onnx"

    def __init__(self, session, spec: OnnxModelSpec, class_names: Sequence[str],
                 default_params: PredictParams, batch_size: int = 1):
        self.session = session
        self.spec = spec
        self.class_names = list(class_names)
        self.default_params = default_params
        self.batch_size = batch_size
        input_h, input_w = spec.input_hw
        self._priors = [grid_priors((math.ceil(input_h / s), math.ceil(input_w / s)), s,
                                    spec.prior_offset) for s in spec.strides]
        self._output_names = (list(spec.outputs["cls_scores"]) + list(spec.outputs["bbox_preds"])
                              + list(spec.outputs["kernel_preds"]) + [spec.outputs["mask_feat"]])
        self._mean = np.asarray(spec.mean, np.float32).reshape(1, 1, 3)
        self._std = np.asarray(spec.std, np.float32).reshape(1, 1, 3)
        if spec.keep_ratio:
            self.input_scale = tuple(spec.resize_scale_wh)  # Segmenter.image_problem reads it
        self.configured_score_threshold = spec.test_cfg.get("score_thr")

    # --- preprocess: mmdet's test pipeline + DetDataPreprocessor

    def preprocess_image(self, image: np.ndarray) -> tuple[np.ndarray, ImageMeta]:
        """One BGR uint8 image -> (3, H, W) float32 network input and its meta."""
        spec = self.spec
        resized, scale_factor = resize_like_mmdet(image, spec.resize_scale_wh, spec.keep_ratio)
        padded = pad_like_mmcv(resized, spec.input_hw, spec.pad_value)
        # ImgDataPreprocessor: channel flip (if any), float, (x - mean) / std, all in float32
        pixels = (padded[..., ::-1] if self.spec.bgr_to_rgb else padded).astype(np.float32)
        normalized = (pixels - self._mean) / self._std
        meta = ImageMeta(ori_hw=image.shape[:2], img_hw=tuple(spec.input_hw),
                         scale_factor=scale_factor)
        return normalized.transpose(2, 0, 1), meta

    def preprocess(self, images: Sequence[np.ndarray]) -> dict:
        prepared = [self.preprocess_image(img) for img in images]
        return {"inputs": np.ascontiguousarray(np.stack([p[0] for p in prepared])),
                "metas": [p[1] for p in prepared]}

    # --- forward: the network only

    def forward(self, batch: dict, params: PredictParams) -> dict:
        outputs = self.session.run(self._output_names, {self.spec.input_name: batch["inputs"]})
        return {"outputs": dict(zip(self._output_names, outputs)), "metas": batch["metas"]}

    # --- postprocess: RTMDetInsHead.predict_by_feat in numpy

    def test_cfg(self, params: PredictParams) -> dict:
        """The model's test_cfg with this request's params, as the torch runtime's test_cfg()."""
        cfg = dict(self.spec.test_cfg)
        cfg["score_thr"] = params.score_threshold
        cfg["iou_threshold"] = params.iou_threshold
        cfg["max_per_img"] = params.max_detections
        cfg["nms_pre"] = max(int(cfg.get("nms_pre", 1000)), params.max_detections)
        cfg["class_agnostic"] = bool(getattr(params, "class_agnostic_nms", False))
        return cfg

    def postprocess(self, raw: dict, params: PredictParams) -> list[ImageDetections]:
        cfg = self.test_cfg(params)
        outputs, names = raw["outputs"], self.spec.outputs
        results = []
        for i, meta in enumerate(raw["metas"]):
            results.append(self._detections_single(
                [outputs[n][i] for n in names["cls_scores"]],
                [outputs[n][i] for n in names["bbox_preds"]],
                [outputs[n][i] for n in names["kernel_preds"]],
                outputs[names["mask_feat"]][i], meta, cfg))
        return results

    def _detections_single(self, cls_scores, bbox_preds, kernel_preds, mask_feat,
                           meta: ImageMeta, cfg: dict) -> ImageDetections:
        # _predict_by_feat_single: per level, scores -> filter_scores_and_topk
        level_boxes, level_priors, level_scores, level_labels, level_kernels = [], [], [], [], []
        for cls_score, bbox_pred, kernel_pred, priors in zip(cls_scores, bbox_preds, kernel_preds,
                                                            self._priors):
            scores = sigmoid(per_prior(cls_score))
            scores, labels, keep = filter_scores_and_topk(scores, cfg["score_thr"], cfg["nms_pre"])
            level_boxes.append(per_prior(bbox_pred)[keep])
            level_kernels.append(per_prior(kernel_pred)[keep])
            level_priors.append(priors[keep])
            level_scores.append(scores)
            level_labels.append(labels)
        priors = np.concatenate(level_priors)
        boxes = distance2bbox(priors[:, :2], np.concatenate(level_boxes), meta.img_hw)
        scores = np.concatenate(level_scores)
        labels = np.concatenate(level_labels)
        kernels = np.concatenate(level_kernels)

        # _bbox_mask_post_process: rescale (scale_boxes by 1/scale_factor, float32 like torch)
        inverse = np.asarray([1 / meta.scale_factor[0], 1 / meta.scale_factor[1]] * 2, np.float32)
        boxes = boxes * inverse
        min_size = cfg.get("min_bbox_size", -1)
        if min_size is not None and min_size >= 0:
            valid = ((boxes[:, 2] - boxes[:, 0]) > min_size) & ((boxes[:, 3] - boxes[:, 1]) > min_size)
            if not valid.all():
                boxes, scores, labels = boxes[valid], scores[valid], labels[valid]
                kernels, priors = kernels[valid], priors[valid]
        if len(boxes):
            keep = batched_nms(boxes, scores, labels, cfg["iou_threshold"], cfg["class_agnostic"],
                               max_num=cfg["max_per_img"])
            boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
            mask_logits = dynamic_mask_logits(mask_feat, kernels[keep], priors[keep], self.spec)
        else:
            mask_logits = np.zeros((0, *mask_feat.shape[-2:]), np.float32)
        resampler = NumpyMaskResampler(mask_logits, self.spec.strides[0], meta.scale_factor,
                                       meta.ori_hw)
        return ImageDetections(image_size=(meta.ori_hw[1], meta.ori_hw[0]), boxes=boxes,
                               scores=scores, labels=labels, class_names=self.class_names,
                               masks=resampler)


# ----------------------------------------------------------------------------- loading


def default_providers() -> list[str]:
    """The CUDA execution provider when onnxruntime-gpu sees a GPU (unless MMDET_MLFLOW_DEVICE
    says cpu), else the CPU one."""
    import onnxruntime as ort

    from scoring.settings import DEVICE

    device = (DEVICE.value() or "").lower()
    available = ort.get_available_providers()
    if "CUDAExecutionProvider" in available and not device.startswith("cpu"):
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def open_session(onnx_path: Path, spec: OnnxModelSpec, num_threads: int | None = None,
                 providers: Sequence[str] | None = None, spin: bool = True):
    """An ORT session on ``onnx_path``, refused with OnnxModelError unless its input and outputs
    are the ones ``spec`` describes (names, channels, spatial sizes). ``spin=False`` stops ORT's
    threads busy-waiting for work after each run, which steals the CPU from anything else in
    the process (torch, the mask encoding) on a machine with few cores."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if num_threads:
        options.intra_op_num_threads = int(num_threads)
    if not spin:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    try:
        session = ort.InferenceSession(str(onnx_path), sess_options=options,
                                       providers=list(providers or default_providers()))
    except Exception as err:  # ORT raises its own Fail / InvalidProtobuf / InvalidGraph types
        raise OnnxModelError(f"{onnx_path} is not a loadable ONNX model: "
                             f"{type(err).__name__}: {str(err).strip()[:500]}") from None
    check_session_fits(session, spec, onnx_path)
    return session


def check_session_fits(session, spec: OnnxModelSpec, onnx_path: Path) -> None:
    """The network's input and outputs must be what model.json's settings expect, or every
    answer would be wrong (a file from another model, another class count, input size...)."""
    inputs = session.get_inputs()
    problems = []
    if len(inputs) != 1 or inputs[0].name != spec.input_name:
        problems.append(f"inputs {[i.name for i in inputs]}, expected [{spec.input_name!r}]")
    else:
        shape = inputs[0].shape
        if list(shape[1:]) != [3, *spec.input_hw]:
            problems.append(f"input shape {shape}, expected [batch, 3, {spec.input_hw[0]}, "
                            f"{spec.input_hw[1]}]")
    got = {o.name: o.shape for o in session.get_outputs()}
    for name, want in spec.expected_outputs().items():
        if name not in got:
            problems.append(f"no output {name!r}")
        elif list(got[name][1:]) != list(want[1:]):
            problems.append(f"output {name!r} has shape {got[name]}, expected {list(want)}")
    if problems:
        raise OnnxModelError(f"{onnx_path} does not fit this model's settings in model.json "
                             f"({len(spec.outputs['cls_scores'])} levels, {spec.num_classes} "
                             f"classes, input {spec.input_hw[1]}x{spec.input_hw[0]}): "
                             + "; ".join(problems))


def load_onnx_segmenter(weights_dir_path: str | os.PathLike, batch_size: int | None = None,
                        num_threads: int | None = None, onnx_file: str = ONNX_FILE,
                        providers: Sequence[str] | None = None, spin: bool = True) -> OnnxSegmenter:
    """The OnnxSegmenter of a weights folder holding model.json (with its "onnx" section) and
    the ONNX file. Clear OnnxModelError for a missing, corrupt or mismatched ONNX file."""
    from scoring.settings import BATCH_SIZE

    folder = Path(weights_dir_path)
    info_path = folder / INFO_FILE
    if not info_path.is_file():
        raise OnnxModelError(f"no {INFO_FILE} in {folder}: not a saved model's weights folder")
    info = json.loads(info_path.read_text())
    if ONNX_INFO_KEY not in info:
        raise OnnxModelError(f"{info_path} has no {ONNX_INFO_KEY!r} section: this model was not "
                             f"exported to ONNX")
    spec = OnnxModelSpec.from_dict(info[ONNX_INFO_KEY])
    onnx_path = folder / onnx_file
    if not onnx_path.is_file():
        raise OnnxModelError(f"the ONNX file {onnx_path} is missing")
    recorded = info[ONNX_INFO_KEY].get("files", {}).get(onnx_file, {}).get("sha256")
    if recorded and sha256_of(onnx_path) != recorded:
        raise OnnxModelError(f"{onnx_path} is not the file exported with this model (its sha256 "
                             f"differs from the one in {INFO_FILE}): re-export the model")
    session = open_session(onnx_path, spec, num_threads, providers, spin)
    # As the torch runtime: one image per pass on CPU, the model's batch on a GPU.
    on_gpu = session.get_providers()[0] == "CUDAExecutionProvider"
    batch_size = batch_size or BATCH_SIZE.value() or (int(info.get("batch_size", 8)) if on_gpu else 1)
    return OnnxSegmenter(session, spec, info["classes"],
                         PredictParams.from_dict(info["default_params"]), batch_size=batch_size)
