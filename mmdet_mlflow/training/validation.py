"""The metric fine-tuning validates with each epoch: mmdet's CocoMetric gathers the predictions
(on every rank, RLE-encoded masks), and our metric core (mmdet_mlflow.metrics) scores them, so
that validation and evaluation compute the same numbers under the same names (docs/metrics.md):
COCO's stats for masks and boxes (``segm_AP``, ``bbox_AP``, ...) and Azure's
``mean_average_precision``, ``precision`` and ``recall`` (of the masks; of the boxes for an
object-detection model, which has only the box stats). Unlike CocoMetric's own, the values are
not rounded to three decimals, and a model that detects nothing scores 0, not nothing.
"""
from __future__ import annotations

from mmdet.evaluation import CocoMetric
from mmdet.registry import METRICS

from mmdet_mlflow.metrics import (AZURE_METRIC_NAMES, azure_metrics, coco_evaluate, coco_metric_names,
                                  coco_stats)
from scoring.schema import INSTANCE_SEGMENTATION


@METRICS.register_module(force=True)
class ValidationMetric(CocoMetric):
    """CocoMetric's gathering, our scoring. Prints pycocotools' tables (the fine-tune keeps them
    in evaluation.log)."""

    def __init__(self, ann_file: str, iou_threshold: float, box_score_threshold: float,
                 task: str = INSTANCE_SEGMENTATION, **kwargs):
        """``task``: the model's; an object-detection model is scored on its boxes alone."""
        self.iou_types = ("bbox", "segm") if task == INSTANCE_SEGMENTATION else ("bbox",)
        super().__init__(ann_file=ann_file, metric=list(self.iou_types), format_only=False,
                         backend_args=None, **kwargs)
        self.iou_threshold = iou_threshold
        self.box_score_threshold = box_score_threshold

    def compute_metrics(self, results: list) -> dict[str, float]:
        _, predictions = zip(*results)
        if self.cat_ids is None:
            self.cat_ids = self._coco_api.get_cat_ids(cat_names=self.dataset_meta["classes"])
        bbox, segm = coco_results(predictions, self.cat_ids)
        named = {}
        evaluators = {}
        found_by_type = {"bbox": bbox, "segm": segm}
        for iou_type in self.iou_types:
            found = found_by_type[iou_type]
            evaluators[iou_type] = coco_evaluate(self._coco_api, found, iou_type)
            named.update(coco_metric_names(iou_type, coco_stats(evaluators[iou_type])))
            print(f"{iou_type} ({len(found)} predictions):")
            evaluators[iou_type].summarize()
        scored = self.iou_types[-1]  # Azure's metrics: of the masks, else of the boxes
        azure = azure_metrics(evaluators[scored], self.iou_threshold, self.box_score_threshold)
        named.update({name: azure[name] for name in AZURE_METRIC_NAMES})
        print(", ".join(f"{name} {azure[name]:.4f}" for name in AZURE_METRIC_NAMES) +
              f" ({'masks' if scored == 'segm' else 'boxes'}, IoU {self.iou_threshold:g}, "
              f"score {self.box_score_threshold:g})")
        return named


def coco_results(predictions, cat_ids) -> tuple[list[dict], list[dict]]:
    """CocoMetric's gathered predictions as COCO results: boxes (x, y, w, h, as CocoMetric writes
    them) and masks (RLE, without a bbox: pycocotools would take a result's box area for its
    mask area)."""
    bbox, segm = [], []
    for found in predictions:
        scores = found["scores"]
        mask_scores = found.get("mask_scores", scores)
        for i, label in enumerate(found["labels"]):
            head = {"image_id": found["img_id"], "category_id": cat_ids[label]}
            x1, y1, x2, y2 = (float(v) for v in found["bboxes"][i])
            bbox.append({**head, "bbox": [x1, y1, x2 - x1, y2 - y1], "score": float(scores[i])})
            if "masks" in found:
                rle = found["masks"][i]
                counts = rle["counts"].decode() if isinstance(rle["counts"], bytes) else rle["counts"]
                segm.append({**head, "segmentation": {"size": list(rle["size"]), "counts": counts},
                             "score": float(mask_scores[i])})
    return bbox, segm
