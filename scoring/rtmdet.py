"""RTMDet-Ins post-processing with the full-image masks deferred.

mmdet's ``RTMDetInsHead._bbox_mask_post_process`` upsamples every detection's mask logits to the
original image size in one tensor: 100 detections on a 12-megapixel image is 4.8 GB of float32.
Here the boxes, scores and labels are computed exactly as mmdet 3.3.0 does, but each detection
keeps only its low-resolution mask logits (N x H/8 x W/8); ``MaskResampler`` turns them into
full-size boolean masks a few at a time with the very same interpolation calls (per-channel,
so bit-identical to mmdet's), and the caller encodes each chunk before the next is made.
"""
from __future__ import annotations

import math
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

# Upsampled float logits one chunk may hold; a 12-megapixel image gets ~4 masks per chunk.
MASK_CHUNK_BYTES = 256 * 1024 * 1024


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
    stride = head.prior_generator.strides[0][0]
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
        mask_logits = head._mask_predict_by_feat_single(mask_feat, results.kernels, results.priors)
    else:
        mask_logits = mask_feat.new_zeros((0, *mask_feat.shape[-2:]))
    del results.kernels, results.priors
    results.mask_logits = mask_logits
    return results


class MaskResampler:
    """Low-resolution mask logits -> boolean masks at the original image size, as mmdet does."""

    def __init__(self, stride: int, inverse_scale_factor, ori_shape):
        self.stride = stride
        self.inverse_scale_factor = inverse_scale_factor
        self.ori_h, self.ori_w = int(ori_shape[0]), int(ori_shape[1])

    @classmethod
    def for_image(cls, head, img_meta: dict) -> "MaskResampler":
        return cls(head.prior_generator.strides[0][0],
                   [1 / s for s in img_meta["scale_factor"]], img_meta["ori_shape"][:2])

    def _upsampled_shape(self, low_h: int, low_w: int) -> tuple[int, int]:
        h, w = low_h * self.stride, low_w * self.stride
        # mmdet 3.3.0 scales the height with scale_factor[0] (the width factor) too; we keep
        # that so our masks stay identical to mmdet's.
        return math.ceil(h * self.inverse_scale_factor[0]), math.ceil(w * self.inverse_scale_factor[1])

    def chunk_size(self, mask_logits: torch.Tensor) -> int:
        big_h, big_w = self._upsampled_shape(*mask_logits.shape[-2:])
        return max(1, MASK_CHUNK_BYTES // (big_h * big_w * 4))

    def masks(self, mask_logits: torch.Tensor, threshold: float) -> torch.Tensor:
        """Boolean masks (k, ori_h, ori_w) for a chunk of low-resolution logits (k, h, w)."""
        logits = F.interpolate(mask_logits.unsqueeze(0), scale_factor=self.stride, mode="bilinear")
        logits = F.interpolate(
            logits,
            size=list(self._upsampled_shape(*mask_logits.shape[-2:])),
            mode="bilinear",
            align_corners=False,
        )[..., : self.ori_h, : self.ori_w]
        return logits.sigmoid().squeeze(0) > threshold

    def iter_masks(self, mask_logits: torch.Tensor, threshold: float) -> Iterator[np.ndarray]:
        """One HxW boolean numpy mask per detection, never more than a chunk in memory."""
        step = self.chunk_size(mask_logits)
        for start in range(0, mask_logits.shape[0], step):
            chunk = self.masks(mask_logits[start : start + step], threshold).cpu().numpy()
            yield from chunk
