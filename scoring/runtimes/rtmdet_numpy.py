"""mmdet 3.3.0's dense-head pre- and post-processing, step by step in numpy (float32 as mmdet
and mmcv compute them), for the ONNX runtime (``scoring.runtimes.onnx_rtmdet``): the config's
test pipeline (keep-ratio resize, pad) and the heads' ``_predict_by_feat_single`` /
``_bbox_post_process`` / RTMDet-Ins' ``_bbox_mask_post_process`` (priors: RTMDet's points or
YOLOF's anchors, score filter and top-k, box decoding: distances or YOLOF's deltas, mmcv's
batched NMS, the dynamic mask convolutions, full-size masks a chunk at a time). Imports numpy
and OpenCV only.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, Iterator

import cv2
import numpy as np

from scoring.errors import MmdetMlflowError
from scoring.runtimes import masks as mask_windows
from scoring.runtimes.base import keep_ratio_size

MASK_CHUNK_BYTES = mask_windows.MASK_CHUNK_BYTES
# OpenCV's whole-picture masks are cheap a pixel: windows pay off below a quarter of the picture.
WHOLE_PICTURE_FRACTION = 0.25
# Version of the "onnx" section of model.json this module reads.
ONNX_INFO_FORMAT = 1


class OnnxModelError(MmdetMlflowError):
    """An ONNX model that is missing, corrupt, or does not fit the settings in its model.json."""


# ----------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class OnnxModelSpec:
    """What the numpy pre- and post-processing need to know about the exported network, read from
    model.json's "onnx" section (written by ``mlflow_model.onnx_export.onnx_model_spec``).
    ``head_kind`` is the family whose head it is: "rtmdet-ins" (what a section without one
    holds), "rtmdet" (the same head without masks) or "yolof" (anchors, delta boxes)."""

    input_name: str
    # static network input (height, width): the Pad size; None: each batch padded to its
    # largest picture rounded up to ``pad_size_divisor``, with ``batch_pad_value``
    input_hw: tuple[int, int] | None
    resize_scale_wh: tuple[int, int]  # Resize(scale=(w, h))
    keep_ratio: bool
    pad_value: tuple[float, float, float]  # per channel of the BGR image
    mean: tuple[float, float, float]  # DetDataPreprocessor mean/std, in the network's order
    std: tuple[float, float, float]
    bgr_to_rgb: bool
    strides: tuple[int, ...]
    num_classes: int
    test_cfg: dict  # nms_pre, score_thr, min_bbox_size, nms (iou_threshold), max_per_img
    outputs: dict  # "cls_scores" / "bbox_preds" (/ "kernel_preds"): names per level; "mask_feat"
    prior_offset: float = 0.0  # MlvlPointGenerator's offset (0 for RTMDet)
    head_kind: str = "rtmdet-ins"
    # RTMDet-Ins: the dynamic mask convolutions
    num_prototypes: int = 0
    dyconv_channels: int = 0
    weight_nums: tuple[int, ...] = ()
    bias_nums: tuple[int, ...] = ()
    # YOLOF: per level (anchors, 4) base anchors, the box coder's settings
    base_anchors: tuple = ()
    coder: dict = field(default_factory=dict)
    pad_size_divisor: int = 1
    batch_pad_value: float = 0.0

    @property
    def num_gen_params(self) -> int:
        return sum(self.weight_nums) + sum(self.bias_nums)

    @property
    def with_masks(self) -> bool:
        return "mask_feat" in self.outputs

    @property
    def anchors_per_cell(self) -> int:
        return len(self.base_anchors[0]) if self.base_anchors else 1

    @classmethod
    def from_dict(cls, d: dict) -> "OnnxModelSpec":
        if d.get("format") != ONNX_INFO_FORMAT:
            raise OnnxModelError(f"model.json's onnx section has format {d.get('format')!r}; this "
                                 f"code reads format {ONNX_INFO_FORMAT}: re-export the model")
        try:
            pre, head = d["preprocess"], d["head"]
            kind = head.get("kind", "rtmdet-ins")
            masks = {}
            if kind == "rtmdet-ins":
                masks = dict(num_prototypes=int(head["num_prototypes"]),
                             dyconv_channels=int(head["dyconv_channels"]),
                             weight_nums=tuple(head["weight_nums"]), bias_nums=tuple(head["bias_nums"]))
            return cls(
                input_name=d["input_name"],
                input_hw=None if pre["input_hw"] is None else tuple(pre["input_hw"]),
                resize_scale_wh=tuple(pre["resize_scale_wh"]),
                keep_ratio=bool(pre["keep_ratio"]),
                pad_value=tuple(pre["pad_value"]),
                mean=tuple(pre["mean"]),
                std=tuple(pre["std"]),
                bgr_to_rgb=bool(pre["bgr_to_rgb"]),
                strides=tuple(head["strides"]),
                num_classes=int(head["num_classes"]),
                test_cfg=dict(d["test_cfg"]),
                outputs=dict(d["outputs"]),
                prior_offset=float(head.get("prior_offset", 0.0)),
                head_kind=kind,
                base_anchors=tuple(np.asarray(a, np.float32) for a in head.get("base_anchors", ())),
                coder=dict(head.get("coder", {})),
                pad_size_divisor=int(pre.get("pad_size_divisor", 1)),
                batch_pad_value=float(pre.get("batch_pad_value", 0.0)),
                **masks,
            )
        except (KeyError, TypeError, ValueError) as err:
            raise OnnxModelError(f"model.json's onnx section is incomplete or malformed ({err!r}): "
                                 f"re-export the model") from None

    def expected_outputs(self, batch: Any = "batch") -> dict[str, tuple]:
        """Output name -> (batch, channels, height, width) the head must produce for this config
        (height and width None where the input size is dynamic)."""
        def size(stride: int) -> tuple:
            if self.input_hw is None:
                return (None, None)
            return tuple(math.ceil(side / stride) for side in self.input_hw)

        anchors = self.anchors_per_cell
        want = {}
        for kind, channels in (("cls_scores", self.num_classes * anchors), ("bbox_preds", 4 * anchors),
                               ("kernel_preds", self.num_gen_params)):
            for name, stride in zip(self.outputs.get(kind, ()), self.strides):
                want[name] = (batch, channels, *size(stride))
        if self.with_masks:  # MaskFeatModule works at the first level's size
            want[self.outputs["mask_feat"]] = (batch, self.num_prototypes, *size(self.strides[0]))
        return want


# ----------------------------------------------------------------------------- preprocessing


@dataclass(frozen=True)
class ImageMeta:
    """What mmdet's pipeline records per image and the post-processing reads."""

    ori_hw: tuple[int, int]
    # mmdet's img_shape: after a Pad step the padded network input size, else the resized size
    img_hw: tuple[int, int]
    scale_factor: tuple[float, float]  # (w_scale, h_scale) of the resize


def resize_like_mmdet(image: np.ndarray, scale_wh: tuple[int, int],
                      keep_ratio: bool) -> tuple[np.ndarray, tuple[float, float]]:
    """mmdet.datasets.transforms.Resize with the default interpolation ('bilinear', backend
    'cv2'): mmcv.imrescale (keep_ratio) or mmcv.imresize to ``scale``, both cv2.INTER_LINEAR.
    Returns the image and mmdet's scale_factor (new_w / w, new_h / h)."""
    height, width = image.shape[:2]
    new_w, new_h = keep_ratio_size(width, height, scale_wh) if keep_ratio else scale_wh
    resized = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    return resized, (new_w / width, new_h / height)


def check_fits_input(image: np.ndarray, size_hw: tuple[int, int]) -> None:
    """mmcv.transforms.Pad with a fixed size pads bottom and right: the resized image must fit."""
    height, width = image.shape[:2]
    if height > size_hw[0] or width > size_hw[1]:
        raise OnnxModelError(f"the resized image ({width}x{height}) is larger than the network "
                             f"input ({size_hw[1]}x{size_hw[0]}): the exported settings are wrong")


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


def anchor_priors(base_anchors: np.ndarray, featmap_hw: tuple[int, int], stride: int) -> np.ndarray:
    """mmdet AnchorGenerator.single_level_grid_priors: every base anchor shifted to every
    feature-map cell, (cell, anchor) row-major like the head's outputs; (h*w*anchors, 4)."""
    height, width = featmap_hw
    shift_x = np.arange(width, dtype=np.float32) * np.float32(stride)
    shift_y = np.arange(height, dtype=np.float32) * np.float32(stride)
    xx, yy = np.tile(shift_x, height), np.repeat(shift_y, width)
    shifts = np.stack([xx, yy, xx, yy], axis=-1)
    return (base_anchors[None, :, :] + shifts[:, None, :]).reshape(-1, 4)


def delta2bbox(rois: np.ndarray, deltas: np.ndarray, coder: dict, max_hw: tuple[int, int],
               wh_ratio_clip: float = 16 / 1000) -> np.ndarray:
    """mmdet DeltaXYWHBBoxCoder.decode (delta2bbox, one class of deltas), float32 as torch:
    (dx, dy, dw, dh) denormalized by the coder's means and stds, the center shift clamped to
    ``ctr_clamp`` pixels and the size ratio to log(1 / wh_ratio_clip) (YOLOF's add_ctr_clamp),
    clipped to the image where the coder clips."""
    if len(deltas) == 0:
        return deltas.reshape(0, 4)
    means = np.asarray(coder.get("means", (0.0,) * 4), np.float32)
    stds = np.asarray(coder.get("stds", (1.0,) * 4), np.float32)
    denorm = deltas * stds + means
    dxy, dwh = denorm[:, :2], denorm[:, 2:]
    pxy = (rois[:, :2] + rois[:, 2:]) * np.float32(0.5)
    pwh = rois[:, 2:] - rois[:, :2]
    dxy_wh = pwh * dxy
    max_ratio = np.float32(abs(np.log(wh_ratio_clip)))
    if coder.get("add_ctr_clamp", False):
        clamp = np.float32(coder.get("ctr_clamp", 32))
        dxy_wh = np.clip(dxy_wh, -clamp, clamp)
        dwh = np.minimum(dwh, max_ratio)
    else:
        dwh = np.clip(dwh, -max_ratio, max_ratio)
    gxy = pxy + dxy_wh
    gwh = pwh * np.exp(dwh)
    boxes = np.concatenate([gxy - gwh * np.float32(0.5), gxy + gwh * np.float32(0.5)], axis=-1)
    if coder.get("clip_border", True):
        np.clip(boxes[:, 0::2], 0, max_hw[1], out=boxes[:, 0::2])
        np.clip(boxes[:, 1::2], 0, max_hw[0], out=boxes[:, 1::2])
    return boxes.astype(np.float32, copy=False)


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
    border pixels repeated in both. With ``boxes`` (original pixels), each mask is made over its
    box window only (``iter_windows``, scoring.runtimes.masks)."""

    def __init__(self, mask_logits: np.ndarray, stride: int, scale_factor: tuple[float, float],
                 ori_hw: tuple[int, int], boxes: np.ndarray | None = None,
                 box_margin_cells: float | None = None):
        self.mask_logits = mask_logits
        self.geometry = mask_windows.MaskGeometry.from_scale_factor(stride, scale_factor, ori_hw)
        self.boxes = boxes
        self.box_margin_cells = box_margin_cells

    def __len__(self) -> int:
        return len(self.mask_logits)

    def windowed(self) -> bool:
        return self.geometry.windowed(*self.mask_logits.shape[-2:])

    def chunk_size(self) -> int:
        # as the torch runtime's chunks (its float masks at the upsampled size); ours hold only
        # the boolean masks, and one float mask at a time
        return self.geometry.chunk_size(*self.mask_logits.shape[-2:], budget=MASK_CHUNK_BYTES)

    def masks(self, logits: np.ndarray, threshold: float) -> np.ndarray:
        """Boolean masks (k, ori_h, ori_w) for a chunk of low-resolution logits (k, h, w)."""
        low_h, low_w = logits.shape[-2:]
        big_h, big_w = self.geometry.upsampled_shape(low_h, low_w)
        cut = mask_windows.logit_cutoff(threshold)
        # One mask at a time: each comes out in its own contiguous rows, as findContours wants
        # (a many-channel resize leaves every mask strided over the whole chunk, and copying
        # them out cost more than the resizing). The second resize is computed only for the
        # kept window on a long, thin image (scoring.runtimes.masks), and skipped where its size
        # is unchanged (cv2's is a copy there, as torch's interpolate is the identity).
        windowed = self.windowed()
        ori_h, ori_w = self.geometry.ori_hw
        out = np.empty((len(logits), ori_h, ori_w), bool)
        for i, low in enumerate(logits):
            up = self._upsample(low)
            if windowed:
                out[i] = mask_windows.windowed_resize(up[None], (big_h, big_w), (ori_h, ori_w), cut)[0]
                continue
            if up.shape != (big_h, big_w):
                up = cv2.resize(up, (big_w, big_h), interpolation=cv2.INTER_LINEAR)
            np.greater(up[:ori_h, :ori_w], np.float32(cut), out=out[i])
        return out

    def _upsample(self, low: np.ndarray) -> np.ndarray:
        """The first resize, by the stride (OpenCV; also on a crop: the same values there)."""
        stride = self.geometry.stride
        return cv2.resize(np.ascontiguousarray(low), (low.shape[1] * stride, low.shape[0] * stride),
                          interpolation=cv2.INTER_LINEAR)

    def iter_masks(self, threshold: float) -> Iterator[np.ndarray]:
        """Each detection's full-size mask (its window's, pasted)."""
        return (window.full() for window in self.iter_windows(threshold))

    def iter_whole_masks(self, threshold: float) -> Iterator[np.ndarray]:
        """Each detection's mask made over the whole picture, a chunk at a time (the way before
        windows; what ``iter_windows`` is checked against)."""
        step = self.chunk_size()
        for start in range(0, len(self.mask_logits), step):
            yield from self.masks(self.mask_logits[start : start + step], threshold)

    def select(self, indices) -> "NumpyMaskResampler":
        """The masks of these detections only, in this order (tiling merges pieces by index)."""
        chosen = copy.copy(self)
        chosen.mask_logits = self.mask_logits[list(indices)]
        chosen.boxes = None if self.boxes is None else self.boxes[list(indices)]
        return chosen

    def iter_windows(self, threshold: float) -> Iterator[mask_windows.MaskWindow]:
        """Each detection's mask over the window where it can be True, cut to its box and
        ``box_margin_cells`` where given (scoring.runtimes.masks.iter_box_windows)."""
        return mask_windows.iter_box_windows(
            self.geometry, self.mask_logits, self.boxes, threshold, upsample=self._upsample,
            whole_masks=lambda start, stop: self.masks(self.mask_logits[start:stop], threshold),
            box_margin_cells=self.box_margin_cells, whole_fraction=WHOLE_PICTURE_FRACTION,
            chunk_size=self.chunk_size())
