"""The metric core: COCO ground truth + COCO-format results -> COCO stats (pycocotools' COCOeval,
nothing re-implemented) and the metric names Azure AutoML logs for image instance segmentation and
object detection alike, matched the way COCOeval matches. No model here: anything that has COCO dicts can use it (tests feed hand-made ones).

Conventions (also written into metrics.json as ``definitions``):
- -1 means "undefined", as COCOeval writes it: AP of a class without ground truth, precision
  with no predictions, recall without ground truth.
- Azure-named metrics are computed on masks (``segm``) for instance segmentation and on boxes
  (``bbox``) for object detection, at one IoU threshold (``iou_threshold``), with COCOeval's
  own per-image matching: per image and class, detections in descending score
  order each take the unmatched ground truth with the highest IoU >= the threshold; a detection
  that matches a crowd region is ignored (neither true nor false positive); at most 100
  detections per image and class count (COCO's maxDets).

The names every metric goes by, here, in fine-tuning and in MLflow, are in docs/metrics.md:
Azure's names keep Azure's meaning (``AZURE_METRIC_NAMES``); COCO's stats are
``<bbox|segm>_<COCOeval stat>`` (``coco_metric_names``), never Azure's names.
"""
from __future__ import annotations

import contextlib
import io
from typing import Sequence

import numpy as np

from scoring.errors import MmdetMlflowError

# COCOeval.summarize()'s stats, in its order.
COCO_STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl",
                   "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
BACKGROUND = "background"
UNDEFINED = -1.0
# Azure's metric names, with Azure's meaning (AutoML logs the same names for image instance
# segmentation, on masks, and image object detection, on boxes): AP at one IoU threshold,
# precision and recall at one score threshold (azure_metrics). Azure's defaults for the two thresholds:
AZURE_METRIC_NAMES = ("mean_average_precision", "precision", "recall")
AZURE_IOU_THRESHOLD = 0.5
AZURE_BOX_SCORE_THRESHOLD = 0.3

DEFINITIONS = {
    "undefined": "-1 means undefined (COCO's convention): AP or recall of a label without ground "
                 "truth, precision without predictions.",
    "bbox, segm": "pycocotools COCOeval stats on predictions.bbox.json / predictions.segm.json "
                  "against ground_truth.json (every prediction down to map_score_threshold, at "
                  "most 100 per image and class).",
    "segm_from_polygons": "the same segm evaluation on the public response's polygons "
                          "(polygon_tolerance) rasterized back with pycocotools: what polygon "
                          "output costs against the model's own masks.",
    "matching": "Azure-named metrics use mask IoU at iou_threshold and COCOeval's matching: per "
                "image and label, predictions in descending score order each take the unmatched "
                "ground truth of that label with the highest IoU >= iou_threshold; a prediction "
                "matched to a crowd region is ignored.",
    "mean_average_precision": "mean over labels with ground truth of average_precision.",
    "average_precision": "COCO's 101-point interpolated AP of one label at iou_threshold "
                         "(all areas, every prediction down to map_score_threshold).",
    "precision, recall": "at box_score_threshold: true positives / predictions and true positives "
                         "/ non-crowd ground truth; overall values sum the counts over all labels "
                         "(micro average).",
    "confusion_matrix": "rows: ground-truth label, then 'background' (a prediction that matched "
                        "nothing); columns: predicted label, then 'background' (ground truth that "
                        "nothing matched). Predictions at box_score_threshold. The diagonal is the "
                        "true positives above; then the left-over predictions and ground truth of "
                        "each image are matched regardless of label, same greedy rule and IoU "
                        "threshold, and each such pair counts in (true label, predicted label).",
}
# The same, for an evaluation on boxes alone (object detection): one COCO section, box IoU.
BOX_DEFINITIONS = {
    **{k: v for k, v in DEFINITIONS.items() if k not in ("bbox, segm", "segm_from_polygons")},
    "bbox": "pycocotools COCOeval stats on predictions.bbox.json against ground_truth.json "
            "(every prediction down to map_score_threshold, at most 100 per image and class).",
    "matching": DEFINITIONS["matching"].replace("mask IoU", "box IoU"),
}


def definitions(iou_type: str) -> dict[str, str]:
    """What each number of an evaluation on ``iou_type`` ("segm": masks, or "bbox": boxes) means."""
    return DEFINITIONS if iou_type == "segm" else BOX_DEFINITIONS


class EvaluationError(MmdetMlflowError, ValueError):
    """Test data or predictions that cannot be evaluated; the message says what and where."""


@contextlib.contextmanager
def _quiet():
    """pycocotools prints progress on stdout; keep our stdout for our own output."""
    with contextlib.redirect_stdout(io.StringIO()):
        yield


def check_ground_truth(gt: dict, masks: bool = True) -> None:
    """Refuse, with a message naming the image / annotation, a ground truth that would make
    COCOeval crash or silently mis-score. ``masks``: every annotation must have a segmentation
    (evaluating masks); without, boxes alone are measured and a segmentation is optional."""
    for key in ("images", "annotations", "categories"):
        if not isinstance(gt.get(key), list):
            raise EvaluationError(f"ground truth has no {key!r} list")
    if not gt["images"]:
        raise EvaluationError("the test data has no images")
    images = {}
    for img in gt["images"]:
        if not all(k in img for k in ("id", "width", "height")):
            raise EvaluationError(f"ground-truth image {img!r} lacks id, width or height")
        images[img["id"]] = img
    category_ids = {c["id"] for c in gt["categories"]}
    names = [c.get("name") for c in gt["categories"]]
    if len(set(names)) != len(names):
        raise EvaluationError(f"category names must be unique (labels are matched by name): {names}")
    for ann in gt["annotations"]:
        where = f"annotation {ann.get('id')} of image {ann.get('image_id')}"
        if ann.get("image_id") not in images:
            raise EvaluationError(f"{where}: no such image")
        if ann.get("category_id") not in category_ids:
            raise EvaluationError(f"{where}: category {ann.get('category_id')} is not defined")
        for key in ("id", "bbox", "area", "iscrowd") + (("segmentation",) if masks else ()):
            if key not in ann:
                raise EvaluationError(f"{where}: no {key!r}")
        seg = ann.get("segmentation")
        if isinstance(seg, list) and (not seg or any(len(s) < 6 or len(s) % 2 for s in seg)):
            raise EvaluationError(f"{where}: a polygon needs at least 3 points (x, y pairs)")


def coco_api(gt: dict, masks: bool = True):
    """A pycocotools COCO object over this dict (checked first, ``check_ground_truth``)."""
    from pycocotools.coco import COCO

    check_ground_truth(gt, masks)
    api = COCO()
    api.dataset = {"info": {}, **gt}  # pycocotools 2.0.10's loadRes needs an 'info'
    with _quiet():
        api.createIndex()
    return api


def load_results(gt_api, results: list[dict]):
    """``gt_api.loadRes(results)``; also when there are none (loadRes itself needs one)."""
    from pycocotools.coco import COCO

    known = set(gt_api.getImgIds())
    stray = {r["image_id"] for r in results} - known
    if stray:
        raise EvaluationError(f"predictions for images not in the ground truth: {sorted(stray)[:5]}")
    if results:
        with _quiet():
            return gt_api.loadRes(results)
    empty = COCO()
    empty.dataset = {"images": list(gt_api.dataset["images"]),
                     "categories": list(gt_api.dataset["categories"]), "annotations": []}
    with _quiet():
        empty.createIndex()
    return empty


def coco_evaluate(gt_api, results: list[dict], iou_type: str):
    """COCOeval run through evaluate / accumulate / summarize, as pycocotools' own example does."""
    from pycocotools.cocoeval import COCOeval

    evaluator = COCOeval(gt_api, load_results(gt_api, results), iou_type)
    with _quiet():
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator


def coco_stats(evaluator) -> dict[str, float]:
    return {name: float(v) for name, v in zip(COCO_STAT_NAMES, evaluator.stats)}


def coco_metric_name(section: str, stat: str) -> str:
    """A COCO stat's metric name: ``segm_AP``, ``segm_AP50``, ``bbox_AR100``, ... (``section``:
    bbox, segm or segm_from_polygons)."""
    return f"{section}_{stat}"


def coco_metric_names(section: str, stats: dict[str, float]) -> dict[str, float]:
    """``coco_stats`` under their metric names (``coco_metric_name``)."""
    return {coco_metric_name(section, stat): value for stat, value in stats.items()}


def _at_iou_threshold(base, iou_threshold: float):
    """A COCOeval at one IoU threshold, all areas, 100 detections, that reuses ``base``'s IoUs
    (computing them is most of COCOeval's time) and otherwise runs COCOeval's own code."""
    from pycocotools.cocoeval import COCOeval

    class FixedIoUs(COCOeval):
        def computeIoU(self, img_id, cat_id):
            return base.ious[img_id, cat_id]

    evaluator = FixedIoUs(base.cocoGt, base.cocoDt, base.params.iouType)
    evaluator.params.iouThrs = np.array([iou_threshold], dtype=np.float64)
    evaluator.params.areaRng = [base.params.areaRng[0]]
    evaluator.params.areaRngLbl = ["all"]
    evaluator.params.maxDets = [base.params.maxDets[-1]]
    with _quiet():
        evaluator.evaluate()
        evaluator.accumulate()
    return evaluator


def _ratio(num: int, den: int) -> float:
    return num / den if den else UNDEFINED


def azure_metrics(base, iou_threshold: float, box_score_threshold: float) -> dict:
    """``mean_average_precision``, ``precision``, ``recall``, ``per_label_metrics`` and a
    confusion matrix from an evaluated COCOeval (segm for instance segmentation, bbox for object
    detection), see the module docstring.
    Also returns per-image true positives under ``per_image`` (image id -> counts)."""
    evaluator = _at_iou_threshold(base, iou_threshold)
    gt_api, dt_api = evaluator.cocoGt, evaluator.cocoDt
    cat_ids = list(evaluator.params.catIds)
    img_ids = list(evaluator.params.imgIds)
    names = [gt_api.cats[c]["name"] for c in cat_ids]
    precision_curves = evaluator.eval["precision"][0, :, :, 0, 0]  # (recall points, classes)

    per_label, per_image = {}, {i: {"true_positives": 0} for i in img_ids}
    leftovers = {i: ([], []) for i in img_ids}  # image -> (unmatched dt ids, unmatched gt ids)
    totals = {"true_positives": 0, "predictions": 0, "ground_truth": 0}
    n_images = len(img_ids)
    for k, (cat_id, name) in enumerate(zip(cat_ids, names)):
        tp = fp = n_gt = 0
        for i, img_id in enumerate(img_ids):
            e = evaluator.evalImgs[k * n_images + i]
            if e is None:
                continue
            gt_ignore = np.asarray(e["gtIgnore"], dtype=bool)
            n_gt += int((~gt_ignore).sum())
            scores = np.asarray(e["dtScores"])
            matched = e["dtMatches"][0] > 0
            counted = (scores >= box_score_threshold) & ~e["dtIgnore"][0].astype(bool)
            image_tp = int((counted & matched).sum())
            tp += image_tp
            fp += int((counted & ~matched).sum())
            per_image[img_id]["true_positives"] += image_tp
            # Left for the confusion matrix: counted predictions that matched nothing, and
            # ground truth that no counted prediction matched (greedy matching in score order
            # means predictions under the threshold never changed what those above matched).
            found = {d for d, c, m in zip(e["dtIds"], counted, matched) if c and m}
            dts, gts = leftovers[img_id]
            dts.extend(d for d, c, m in zip(e["dtIds"], counted, matched) if c and not m)
            gts.extend(g for g, by, ig in zip(e["gtIds"], e["gtMatches"][0], gt_ignore)
                       if not ig and int(by) not in found)
        curve = precision_curves[:, k]
        per_label[name] = {
            "average_precision": float(np.mean(curve)) if n_gt and (curve > -1).all() else UNDEFINED,
            "precision": _ratio(tp, tp + fp),
            "recall": _ratio(tp, n_gt),
            "true_positives": tp,
            "false_positives": fp,
            "ground_truth": n_gt,
        }
        totals["true_positives"] += tp
        totals["predictions"] += tp + fp
        totals["ground_truth"] += n_gt

    defined_ap = [m["average_precision"] for m in per_label.values() if m["average_precision"] >= 0]
    matrix = _confusion_matrix(gt_api, dt_api, cat_ids, per_label, leftovers, iou_threshold,
                               base.params.iouType)
    return {
        "mean_average_precision": float(np.mean(defined_ap)) if defined_ap else UNDEFINED,
        "precision": _ratio(totals["true_positives"], totals["predictions"]),
        "recall": _ratio(totals["true_positives"], totals["ground_truth"]),
        "per_label_metrics": per_label,
        "confusion_matrix": {"labels": names + [BACKGROUND], "rows": "ground truth",
                             "columns": "predicted", "matrix": matrix.tolist()},
        "per_image": per_image,
        "evaluator": evaluator,
    }


def _confusion_matrix(gt_api, dt_api, cat_ids: Sequence[int], per_label: dict,
                      leftovers: dict, iou_threshold: float, iou_type: str) -> np.ndarray:
    from pycocotools import mask as mask_util

    index = {c: k for k, c in enumerate(cat_ids)}
    background = len(cat_ids)
    matrix = np.zeros((background + 1, background + 1), dtype=np.int64)
    for k, metrics in enumerate(per_label.values()):
        matrix[k, k] = metrics["true_positives"]
    for img_id, (dt_ids, gt_ids) in leftovers.items():
        dts = sorted((dt_api.anns[d] for d in dt_ids), key=lambda d: -d["score"])
        gts = [gt_api.anns[g] for g in gt_ids]
        taken = np.zeros(len(gts), dtype=bool)
        if dts and gts:
            if iou_type == "segm":
                regions = [d["segmentation"] for d in dts], [gt_api.annToRLE(g) for g in gts]
            else:
                regions = [d["bbox"] for d in dts], [g["bbox"] for g in gts]
            ious = mask_util.iou(*regions, [0] * len(gts))
        for row, dt in enumerate(dts):
            best = -1
            if gts:
                candidates = np.where(taken, -1.0, ious[row])
                best = int(np.argmax(candidates))
                if candidates[best] < iou_threshold:
                    best = -1
            if best >= 0:
                taken[best] = True
                matrix[index[gts[best]["category_id"]], index[dt["category_id"]]] += 1
            else:
                matrix[background, index[dt["category_id"]]] += 1
        for gt, was_taken in zip(gts, taken):
            if not was_taken:
                matrix[index[gt["category_id"]], background] += 1
    return matrix
