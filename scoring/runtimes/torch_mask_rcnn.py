"""Mask R-CNN on torch, its masks lazy: mmdet's ``StandardRoIHead.predict`` pastes every
detection's 28x28 mask into a picture-size mask at once (100 detections of a 12-megapixel
picture: 1.2 GB of booleans). Here the boxes, scores and labels come from mmdet's own steps
(the RPN, ``predict_bbox``, the mask head's forward), and each detection keeps its 28x28 mask
probabilities; its mask is pasted into its box's window only when the encoder asks for it, with
mmdet's own paste (``_do_paste_mask``, one box at a time as mmdet runs it on a CPU), so the
pixels are mmdet's."""
from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import torch

from scoring.runtimes.base import ImageDetections, masks_wanted
from scoring.runtimes.masks import MaskWindow
from scoring.runtimes.torch_mmdet import MmdetTorchRuntime, _loader
from scoring.schema import PredictParams


class MaskRcnnDetector(MmdetTorchRuntime):
    # Its per-class NMS answers, all kept (``filters_answers``), then filtered and cut to
    # ``max_detections``, equal filtering first; masks are made for the kept ones only.
    filters_answers = True

    @torch.inference_mode()
    def forward(self, batch: dict, params: PredictParams) -> dict:
        detector = self.detector
        data = detector.data_preprocessor(batch, False)
        samples = data["data_samples"]
        metas = [sample.metainfo for sample in samples]
        feats = detector.extract_feat(data["inputs"])
        proposals = detector.rpn_head.predict(feats, samples, rescale=False)
        cfg = self.test_cfg(params)
        results = detector.roi_head.predict_bbox(feats, metas, proposals, rcnn_test_cfg=cfg.rcnn,
                                                 rescale=False)
        results = [result[torch.as_tensor(self.kept_answers(result, params), dtype=torch.long,
                                          device=result.scores.device)] for result in results]
        mask_logits = self._mask_logits(feats, results) if masks_wanted(params) else None
        return {"results": results, "metas": metas, "mask_logits": mask_logits}

    def _mask_logits(self, feats, results) -> list[torch.Tensor]:
        """Each detection's 28x28 mask logits of its own class, per picture."""
        from mmdet.structures.bbox import bbox2roi

        rois = bbox2roi([result.bboxes for result in results])
        if rois.shape[0] == 0:
            return [rois.new_zeros((0, 1, 1, 1)) for _ in results]
        logits = self.detector.roi_head._mask_forward(feats, rois)["mask_preds"]
        out = []
        for result, part in zip(results, logits.split([len(r) for r in results], 0)):
            if not self.detector.roi_head.mask_head.class_agnostic:
                part = part[torch.arange(len(result), device=part.device), result.labels][:, None]
            out.append(part)
        return out

    def postprocess(self, raw: dict, params: PredictParams) -> list[ImageDetections]:
        for result, meta in zip(raw["results"], raw["metas"]):
            # mmdet's mask head rescales the boxes to the picture, in place, as it pastes
            scale = result.bboxes.new_tensor(meta["scale_factor"]).repeat((1, 2))
            result.bboxes = result.bboxes / scale

        def masks_of(index: int, result):
            return PastedMasks(raw["mask_logits"][index], result.bboxes, raw["metas"][index]["ori_shape"][:2])

        return self.detections(raw["results"], raw["metas"], params,
                               masks_of=masks_of if raw["mask_logits"] is not None else lambda i, r: None)


class PastedMasks:
    """The ``MaskSource`` of one picture's Mask R-CNN detections: 28x28 mask logits and boxes;
    each mask pasted into its box's window when asked for (``iter_windows``)."""

    def __init__(self, logits: torch.Tensor, boxes: torch.Tensor, image_hw):
        self.logits, self.boxes = logits, boxes
        self.image_hw = (int(image_hw[0]), int(image_hw[1]))

    def __len__(self) -> int:
        return int(self.logits.shape[0])

    def iter_windows(self, threshold: float) -> Iterator[MaskWindow]:
        from mmdet.models.roi_heads.mask_heads.fcn_mask_head import _do_paste_mask

        height, width = self.image_hw
        probabilities = self.logits.sigmoid()
        for i in range(len(self)):
            with torch.inference_mode():
                pasted, (rows, columns) = _do_paste_mask(probabilities[i:i + 1], self.boxes[i:i + 1],
                                                         height, width, skip_empty=True)
            pixels = (pasted[0] >= threshold).cpu().numpy()
            yield MaskWindow(pixels, (int(columns.start), int(rows.start)), self.image_hw)

    def iter_masks(self, threshold: float) -> Iterator[np.ndarray]:
        return (window.full() for window in self.iter_windows(threshold))

    def select(self, indices: Sequence[int]) -> "PastedMasks":
        keep = torch.as_tensor(list(indices), dtype=torch.long, device=self.logits.device)
        return PastedMasks(self.logits[keep], self.boxes[keep], self.image_hw)


load_mask_rcnn_detector = _loader(MaskRcnnDetector)
