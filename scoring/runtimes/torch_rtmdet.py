"""The torch runtime: an mmdet RTMDet-Ins detector behind the ``Predictor`` seam.

Loading (``load_torch_predictor``), the three steps (preprocess with mmdet's own test pipeline
and the request's test settings, both from ``torch_mmdet``'s base; forward with the detector's
data preprocessor, backbone, neck and head; post-processing) and RTMDet-Ins post-processing with
the full-image masks deferred:

mmdet's ``RTMDetInsHead._bbox_mask_post_process`` upsamples every detection's mask logits to the
original image size in one tensor: 100 detections on a 12-megapixel image is 4.8 GB of float32.
Here the boxes, scores and labels are computed exactly as mmdet 3.3.0 does, but each detection
keeps only its low-resolution mask logits (N x H/8 x W/8); ``MaskResampler`` turns them into
full-size boolean masks a few at a time with the very same interpolation calls (per-channel,
so bit-identical to mmdet's), and the caller encodes each chunk before the next is made.
The threshold is one comparison of the logits with the cut at which torch's own sigmoid crosses
it (``sigmoid_cutoff``), and a second resize to the same size (a picture of the network input's
size) is skipped: the same booleans, without two full passes over every mask.

That post-processing is a copy of a private mmdet method, put on the head instance, so it is used
only on the mmdet it was copied from (``COPIED_FROM_MMDET``, scoring.version_guard): on another
mmdet the head keeps its own ``_bbox_mask_post_process`` (mmdet's public ``predict_by_feat``
path, full-size masks made at once, more memory on large pictures), with a warning.

Only a model whose ``model.json`` names the torch runtime imports this module (and torch).
"""
from __future__ import annotations

import functools
import math
import types
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from scoring.class_filter import excluded_classes
from scoring.runtimes import masks as mask_windows
from scoring.runtimes.base import ImageDetections, masks_wanted
from scoring.runtimes.torch_mmdet import DenseHeadDetector, DenseMasks, _loader
from scoring.schema import PredictParams

MASK_CHUNK_BYTES = mask_windows.MASK_CHUNK_BYTES

# The mmdet whose RTMDetInsHead._bbox_mask_post_process bbox_post_process_deferring_masks copies
# (tests/test_serving_guards.py checks it is the version mlflow_model/requirements.txt pins).
COPIED_FROM_MMDET = "3.3.0"


def defers_masks() -> bool:
    """Whether the installed mmdet is the one ``bbox_post_process_deferring_masks`` was copied
    from (a warning when not: mmdet's own post-processing is used instead)."""
    import mmdet

    from scoring.version_guard import written_for

    return written_for("mmdet", mmdet.__version__, COPIED_FROM_MMDET,
                       "RTMDet-Ins masks are made by mmdet's own post-processing: all at the "
                       "picture's full size at once, which takes more memory on large pictures")


def bbox_post_process_deferring_masks(
    head, results, mask_feat, cfg, rescale=False, with_nms=True, img_meta=None
):
    """Drop-in for ``RTMDetInsHead._bbox_mask_post_process`` (mmdet 3.3.0, same steps in the same
    order) that leaves ``results.mask_logits`` (low resolution) instead of ``results.masks``;
    ``MaskResampler.for_image`` makes the masks from them."""
    from mmcv.ops import batched_nms
    from mmdet.structures.bbox import get_box_tensor, get_box_wh, scale_boxes

    assert rescale, "the deferred masks are always resampled to the original image size"
    assert with_nms, "with_nms must be True for RTMDet-Ins"
    scale_factor = [1 / s for s in img_meta["scale_factor"]]
    results.bboxes = scale_boxes(results.bboxes, scale_factor)

    if hasattr(results, "score_factors"):
        results.scores = results.scores * results.pop("score_factors")

    if cfg.get("min_bbox_size", -1) >= 0:
        w, h = get_box_wh(results.bboxes)
        valid = (w > cfg.min_bbox_size) & (h > cfg.min_bbox_size)
        if not valid.all():
            results = results[valid]

    if results.bboxes.numel() > 0:
        det_bboxes, keep = batched_nms(
            get_box_tensor(results.bboxes), results.scores, results.labels, cfg.nms
        )
        results = results[keep]
        results.scores = det_bboxes[:, -1]
        results = results[: cfg.max_per_img]
        if cfg.get("with_masks", True):
            mask_logits = head._mask_predict_by_feat_single(mask_feat, results.kernels, results.priors)
        else:  # mask_format "none": no mask logits at all
            mask_logits = mask_feat.new_zeros((len(results), 0, 0))
    else:
        mask_logits = mask_feat.new_zeros((0, *mask_feat.shape[-2:]))
    del results.kernels, results.priors
    results.mask_logits = mask_logits
    return results


def above_threshold(logits: torch.Tensor, threshold: float) -> torch.Tensor:
    """``logits.sigmoid() > threshold``, mmdet's mask rule, as one comparison of the logits with
    ``sigmoid_cutoff`` (a sigmoid over every pixel of every mask costs more than the resize
    that made them)."""
    cut = sigmoid_cutoff(float(threshold), str(logits.device))
    return logits.sigmoid() > threshold if cut is None else logits > cut


def threshold_logit(threshold: float) -> float:
    """The cut the numpy window code compares logits with: torch's (``sigmoid_cutoff``) where
    there is one, so that a mask made over its window and one made whole agree pixel for pixel."""
    cut = sigmoid_cutoff(float(threshold), "cpu")
    return mask_windows.logit_cutoff(threshold) if cut is None else cut


@functools.lru_cache(maxsize=64)
def sigmoid_cutoff(threshold: float, device: str = "cpu") -> float | None:
    """The float32 logit ``c`` with ``torch.sigmoid(x) > threshold``  <=>  ``x > c`` for float32
    ``x`` on ``device``: the largest float whose sigmoid (torch's own, vectorized) is not above
    the threshold. ``logit_cutoff`` in exact arithmetic is within a few units in the last place
    of it but not equal: near 0.5, sigmoid rounds every logit under about 9e-8 to 0.5 exactly.
    Found by bisection over the floats' bit patterns between two logits clearly on either side.
    None where the threshold is 0 or 1, or the sigmoid is not seen to cross it there."""
    approx = mask_windows.logit_cutoff(threshold)
    if not math.isfinite(approx):
        return None

    def above(key: int) -> bool:  # the same value in every lane of torch's vectorized sigmoid
        probe = torch.full((64,), _float_of_key(key), dtype=torch.float32, device=device)
        return bool((probe.sigmoid() > threshold).all())

    slack = 1e-3 * (1 + abs(approx))
    low, high = _key_of_float(approx - slack), _key_of_float(approx + slack)
    if above(low) or not above(high):
        return None
    while high - low > 1:
        middle = (low + high) // 2
        if above(middle):
            high = middle
        else:
            low = middle
    return _float_of_key(low)


def _key_of_float(value: float) -> int:
    """float32 -> an integer in the floats' order (-0.0 and 0.0 the same)."""
    bits = int(np.float32(value).view(np.uint32))
    return bits if bits < 0x80000000 else -(bits & 0x7FFFFFFF)


def _float_of_key(key: int) -> float:
    bits = key if key >= 0 else (-key) | 0x80000000
    return float(np.uint32(bits).view(np.float32))


class MaskResampler:
    """Low-resolution mask logits -> boolean masks at the original image size, as mmdet does:
    of the whole picture (``iter_masks`` without boxes), or of each detection's box window
    (``iter_windows``, scoring.runtimes.masks), the first upsampling by torch itself."""

    def __init__(self, stride: int, inverse_scale_factor, ori_shape):
        self.geometry = mask_windows.MaskGeometry(
            int(stride), (float(inverse_scale_factor[0]), float(inverse_scale_factor[1])),
            (int(ori_shape[0]), int(ori_shape[1])))

    @classmethod
    def for_image(cls, head, img_meta: dict) -> "MaskResampler":
        return cls(head.prior_generator.strides[0][0],
                   [1 / s for s in img_meta["scale_factor"]], img_meta["ori_shape"][:2])

    def windowed(self, mask_logits: torch.Tensor) -> bool:
        """Whether to resample only the part that survives the crop (scoring.runtimes.masks);
        the exact path, bit-identical to mmdet's, is kept wherever the crop drops little."""
        return self.geometry.windowed(*mask_logits.shape[-2:])

    def chunk_size(self, mask_logits: torch.Tensor) -> int:
        return self.geometry.chunk_size(*mask_logits.shape[-2:], budget=MASK_CHUNK_BYTES)

    def masks(self, mask_logits: torch.Tensor, threshold: float) -> torch.Tensor:
        """Boolean masks (k, ori_h, ori_w) for a chunk of low-resolution logits (k, h, w)."""
        logits = F.interpolate(mask_logits.unsqueeze(0), scale_factor=self.geometry.stride,
                               mode="bilinear")
        if self.windowed(mask_logits):
            return self._windowed_masks(logits[0], threshold)
        big_hw = self.geometry.upsampled_shape(*mask_logits.shape[-2:])
        # Where the picture is the network input's size the second resize is the identity
        # (weights 0 and 1), a full pass over every mask for nothing: skipped.
        if tuple(big_hw) != tuple(logits.shape[-2:]):
            logits = F.interpolate(logits, size=list(big_hw), mode="bilinear", align_corners=False)
        return above_threshold(logits[0, :, : self.geometry.ori_h, : self.geometry.ori_w], threshold)

    def _windowed_masks(self, logits: torch.Tensor, threshold: float) -> torch.Tensor:
        """The second bilinear resize of ``masks`` computed for the kept ``ori_h x ori_w`` window
        only (scoring.runtimes.masks.windowed_resize, torch's own index rule)."""
        in_h, in_w = logits.shape[-2:]
        big_hw = self.geometry.upsampled_shape(in_h // self.geometry.stride,
                                               in_w // self.geometry.stride)
        window = mask_windows.windowed_resize(logits.float().cpu().numpy(), big_hw,
                                              self.geometry.ori_hw, threshold_logit(threshold))
        return torch.from_numpy(window)

    def iter_masks(self, mask_logits: torch.Tensor, threshold: float) -> Iterator[np.ndarray]:
        """One HxW boolean numpy mask per detection, never more than a chunk in memory."""
        step = self.chunk_size(mask_logits)
        for start in range(0, mask_logits.shape[0], step):
            chunk = self.masks(mask_logits[start : start + step], threshold).cpu().numpy()
            yield from chunk

    def iter_windows(self, mask_logits: torch.Tensor, threshold: float, boxes: np.ndarray | None = None,
                     box_margin_cells: float | None = None) -> Iterator[mask_windows.MaskWindow]:
        """Each detection's mask over the window where it can be True, cut to its box and
        ``box_margin_cells`` where given (scoring.runtimes.masks.iter_box_windows)."""
        low = mask_logits.detach().float().cpu().numpy()
        return mask_windows.iter_box_windows(
            self.geometry, low, boxes, threshold, upsample=self._upsample_crop,
            whole_masks=lambda start, stop: self.masks(mask_logits[start:stop], threshold).cpu().numpy(),
            box_margin_cells=box_margin_cells, chunk_size=self.chunk_size(mask_logits),
            threshold_logit=threshold_logit(threshold))

    def _upsample_crop(self, low: np.ndarray) -> np.ndarray:
        """torch's bilinear upsampling by the stride, as ``masks`` runs it, on a crop."""
        up = F.interpolate(torch.from_numpy(low)[None, None], scale_factor=self.geometry.stride,
                           mode="bilinear")
        return up[0, 0].numpy()


class DeferredMasks:
    """The ``MaskSource`` of one image: its low-resolution logits and the resampler; each mask
    made over its own window (``iter_windows``), full-size ones pasted from those. ``boxes``
    (original pixels) with ``box_margin_cells``: cut each mask to its box and that margin."""

    def __init__(self, mask_logits: torch.Tensor, resampler: MaskResampler,
                 boxes: np.ndarray | None = None, box_margin_cells: float | None = None):
        self.mask_logits = mask_logits
        self.resampler = resampler
        self.boxes = boxes
        self.box_margin_cells = box_margin_cells

    def __len__(self) -> int:
        return int(self.mask_logits.shape[0])

    def iter_masks(self, threshold: float) -> Iterator[np.ndarray]:
        return (window.full() for window in self.iter_windows(threshold))

    def iter_windows(self, threshold: float) -> Iterator[mask_windows.MaskWindow]:
        return self.resampler.iter_windows(self.mask_logits, threshold, self.boxes,
                                           self.box_margin_cells)

    def select(self, indices: Sequence[int]) -> "DeferredMasks":
        """The masks of these detections only, in this order (tiling merges pieces by index)."""
        keep = torch.as_tensor(list(indices), dtype=torch.long, device=self.mask_logits.device)
        return DeferredMasks(self.mask_logits[keep], self.resampler,
                             None if self.boxes is None else self.boxes[list(indices)],
                             self.box_margin_cells)


# --- the three steps ---------------------------------------------------------------------------

class RtmdetInsDetector(DenseHeadDetector):
    """Runs an mmdet RTMDet-Ins detector on BGR uint8 arrays, real batches (one forward pass
    per batch, not a loop of images), its masks deferred."""

    def __init__(self, detector, family, class_names: Sequence[str], default_params: PredictParams,
                 batch_size: int = 8, config=None):
        """``config``: the mmengine config whose test pipeline prepares the pictures (default:
        the detector's own ``cfg``, which ``build_detector`` sets)."""
        super().__init__(detector, family, class_names, default_params, batch_size, config)
        head = detector.bbox_head
        self._head_had_own = "_bbox_mask_post_process" in vars(head)
        if defers_masks():
            # Our instance only: the detector object itself stays a plain mmdet model elsewhere.
            head._bbox_mask_post_process = types.MethodType(bbox_post_process_deferring_masks, head)

    def give_back(self) -> None:
        """The lent detector's head without the deferred-mask post-processing put on it."""
        if not self._head_had_own:
            vars(self.detector.bbox_head).pop("_bbox_mask_post_process", None)

    def test_cfg(self, params: PredictParams):
        """The family's test settings for the request, and whether to make mask logits."""
        cfg = super().test_cfg(params)
        cfg.with_masks = masks_wanted(params)
        return cfg

    @torch.inference_mode()
    def postprocess(self, raw: dict, params: PredictParams) -> list[ImageDetections]:
        """The class filter (``params.classes``) on the class logits, then mmdet's
        ``predict_by_feat`` (score filter, top-k, box decoding, rescale, NMS, mask kernels), with
        the full-size masks deferred to ``DeferredMasks`` (made by mmdet at once where the
        head keeps mmdet's own post-processing: ``defers_masks``)."""
        head = self.detector.bbox_head
        outputs = raw["head_outputs"]  # (cls_scores, bbox_preds, kernel_preds, mask_feat)
        self.family.exclude_classes(outputs[0], excluded_classes(self.class_names, params))
        results = head.predict_by_feat(*outputs, batch_img_metas=raw["metas"],
                                       cfg=self.test_cfg(params), rescale=True)
        out = []
        for res, meta in zip(results, raw["metas"]):
            resampler = MaskResampler.for_image(head, meta)
            boxes = res.bboxes.cpu().numpy()
            out.append(ImageDetections(
                image_size=(resampler.geometry.ori_w, resampler.geometry.ori_h),
                boxes=boxes,
                scores=res.scores.cpu().numpy(),
                labels=res.labels.cpu().numpy(),
                class_names=self.class_names,
                masks=self._masks(res, resampler, boxes) if masks_wanted(params) else None,
            ))
        return out

    def _masks(self, result, resampler: MaskResampler, boxes: np.ndarray):
        if "mask_logits" in result:
            return DeferredMasks(result.mask_logits, resampler, boxes, self.mask_box_margin)
        return DenseMasks(result.masks)  # mmdet's own post-processing (``defers_masks``)


# --- loading ---------------------------------------------------------------------------------

# The RtmdetInsDetector of a weights folder; ``load_torch_predictor.lend`` lends one a network
# in the middle of its fine-tune (``Family.lent_predictor``).
load_torch_predictor = _loader(RtmdetInsDetector)
