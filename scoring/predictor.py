"""The model step, Hugging Face pipeline style: preprocess -> forward -> postprocess, each
testable on its own, with real batches (one forward pass per batch, not a loop of images)."""
from __future__ import annotations

import copy
import types
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch

from scoring.rtmdet import MaskResampler, bbox_post_process_deferring_masks
from scoring.schema import PredictParams


@dataclass
class ImageDetections:
    """One image's detections in original-image pixels. Masks are made on demand, a chunk at a
    time (see scoring.rtmdet), because all of them at full size may not fit in memory."""

    image_size: tuple[int, int]  # (width, height) of the original image
    boxes: np.ndarray  # (N, 4) x1, y1, x2, y2
    scores: np.ndarray  # (N,)
    labels: np.ndarray  # (N,) class indices
    class_names: Sequence[str]
    mask_logits: torch.Tensor  # (N, h, w) low resolution
    mask_resampler: MaskResampler

    def __len__(self) -> int:
        return len(self.scores)

    def label_name(self, i: int) -> str:
        return self.class_names[int(self.labels[i])]

    def iter_masks(self, threshold: float) -> Iterator[np.ndarray]:
        """The full-size boolean mask of each detection, in order."""
        return self.mask_resampler.iter_masks(self.mask_logits, threshold)


class InstanceSegmenter:
    """Runs an mmdet RTMDet-Ins detector on BGR uint8 arrays."""

    def __init__(self, detector, class_names: Sequence[str], default_params: PredictParams,
                 batch_size: int = 8):
        from mmcv.transforms import Compose
        from mmdet.utils import get_test_pipeline_cfg
        from mmengine.registry import init_default_scope

        init_default_scope("mmdet")
        self.detector = detector
        self.class_names = list(class_names)
        self.default_params = default_params
        self.batch_size = batch_size
        steps = [s for s in copy.deepcopy(get_test_pipeline_cfg(detector.cfg))
                 if "LoadAnnotations" not in s["type"]]  # nothing to annotate at inference
        steps[0]["type"] = "mmdet.LoadImageFromNDArray"  # as mmdet's inference_detector does
        self.pipeline = Compose(steps)
        head = detector.bbox_head
        self._test_cfg = head.test_cfg
        # Our instance only: the detector object itself stays a plain mmdet model elsewhere.
        head._bbox_mask_post_process = types.MethodType(bbox_post_process_deferring_masks, head)

    @property
    def device(self) -> torch.device:
        return self.detector.data_preprocessor.device

    def __call__(self, images: Sequence[np.ndarray],
                 params: PredictParams | None = None) -> list[ImageDetections]:
        params = params or self.default_params
        out = []
        for start in range(0, len(images), self.batch_size):
            batch = self.preprocess(images[start : start + self.batch_size])
            out.extend(self.postprocess(self.forward(batch, params)))
        return out

    def preprocess(self, images: Sequence[np.ndarray]) -> dict:
        """mmdet's test pipeline (resize, pad, pack) for each image, collated into one batch."""
        packed = [self.pipeline(dict(img=img, img_id=i)) for i, img in enumerate(images)]
        return dict(inputs=[p["inputs"] for p in packed],
                    data_samples=[p["data_samples"] for p in packed])

    def test_cfg(self, params: PredictParams):
        """The model's test settings with this request's params: passed per call, never written
        into the shared model, so concurrent requests cannot see each other's settings."""
        cfg = copy.deepcopy(self._test_cfg)
        cfg.score_thr = params.score_threshold
        cfg.nms.iou_threshold = params.iou_threshold
        cfg.max_per_img = params.max_detections
        cfg.nms_pre = max(cfg.get("nms_pre", 1000), params.max_detections)
        cfg.mask_thr_binary = params.mask_threshold
        return cfg

    @torch.no_grad()
    def forward(self, batch: dict, params: PredictParams) -> list:
        """One batched pass: normalize, backbone + neck, head, box post-processing with NMS."""
        data = self.detector.data_preprocessor(batch, False)
        feats = self.detector.extract_feat(data["inputs"])
        head = self.detector.bbox_head
        metas = [sample.metainfo for sample in data["data_samples"]]
        results = head.predict_by_feat(*head(feats), batch_img_metas=metas,
                                       cfg=self.test_cfg(params), rescale=True)
        return list(zip(results, metas))

    def postprocess(self, results: list) -> list[ImageDetections]:
        out = []
        for res, meta in results:
            resampler = MaskResampler.for_image(self.detector.bbox_head, meta)
            out.append(ImageDetections(
                image_size=(resampler.ori_w, resampler.ori_h),
                boxes=res.bboxes.cpu().numpy(),
                scores=res.scores.cpu().numpy(),
                labels=res.labels.cpu().numpy(),
                class_names=self.class_names,
                mask_logits=res.mask_logits,
                mask_resampler=resampler,
            ))
        return out
