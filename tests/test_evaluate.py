"""Evaluation: the metric core on hand-made COCO dicts with known answers, then the whole
``evaluate`` command on a synthetic set with a real tiny model, checked against pycocotools'
COCOeval run here on the files it wrote."""
from __future__ import annotations

import copy

import numpy as np
import pytest
from pycocotools import mask as mask_util

from mmdet_mlflow import metrics

W, H = 100, 80


def _rect(x, y, w, h):
    return [float(x), float(y), float(x + w), float(y), float(x + w), float(y + h), float(x), float(y + h)]


def _ground_truth():
    """Two labelled images, one with no annotations; label 'c' has no ground truth; one crowd."""
    boxes = [  # image, category, x, y, w, h, iscrowd
        (1, 1, 10, 10, 30, 20, 0),
        (1, 2, 50, 30, 40, 40, 0),
        (2, 1, 5, 5, 60, 50, 0),
        (2, 1, 70, 60, 20, 15, 1),
    ]
    anns = [{"id": n + 1, "image_id": i, "category_id": c, "bbox": [float(x), float(y), float(w), float(h)],
             "area": float(w * h), "iscrowd": crowd, "segmentation": [_rect(x, y, w, h)]}
            for n, (i, c, x, y, w, h, crowd) in enumerate(boxes)]
    return {"images": [{"id": i, "width": W, "height": H, "file_name": f"{i}.png"} for i in (1, 2, 3)],
            "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}, {"id": 3, "name": "c"}],
            "annotations": anns}


def _segm_result(ann, score, category_id=None):
    rle = mask_util.merge(mask_util.frPyObjects(ann["segmentation"], H, W))
    rle["counts"] = rle["counts"].decode()
    return {"image_id": ann["image_id"], "category_id": category_id or ann["category_id"],
            "segmentation": rle, "score": score}


def _evaluate(gt, results, iou_threshold=0.5, box_score_threshold=0.3):
    api = metrics.coco_api(copy.deepcopy(gt))
    base = metrics.coco_evaluate(api, copy.deepcopy(results), "segm")
    return metrics.coco_stats(base), metrics.azure_metrics(base, iou_threshold, box_score_threshold)


def test_perfect_predictions_score_one():
    gt = _ground_truth()
    results = [_segm_result(a, 0.9) for a in gt["annotations"] if not a["iscrowd"]]
    stats, azure = _evaluate(gt, results)
    assert stats["AP"] == pytest.approx(1.0, abs=1e-12)
    assert stats["AP50"] == pytest.approx(1.0, abs=1e-12)
    assert stats["AP75"] == pytest.approx(1.0, abs=1e-12)
    assert azure["mean_average_precision"] == pytest.approx(1.0, abs=1e-12)
    assert azure["precision"] == azure["recall"] == 1.0
    labels = azure["per_label_metrics"]
    assert labels["a"]["average_precision"] == pytest.approx(1.0)
    assert labels["b"]["average_precision"] == pytest.approx(1.0)
    assert labels["c"] == {"average_precision": -1.0, "precision": -1.0, "recall": -1.0,
                           "true_positives": 0, "false_positives": 0, "ground_truth": 0}
    assert labels["a"]["ground_truth"] == 2  # the crowd region is not ground truth to find
    cm = azure["confusion_matrix"]
    assert cm["labels"] == ["a", "b", "c", "background"]
    assert cm["matrix"] == [[2, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]


def test_no_predictions_score_zero():
    stats, azure = _evaluate(_ground_truth(), [])
    assert stats["AP"] == 0.0 and stats["AR100"] == 0.0
    assert azure["mean_average_precision"] == 0.0
    assert azure["recall"] == 0.0
    assert azure["precision"] == -1.0  # undefined without predictions
    assert azure["per_label_metrics"]["c"]["average_precision"] == -1.0
    assert azure["confusion_matrix"]["matrix"][0] == [0, 0, 0, 2]  # both 'a' missed


def test_one_class_missing_halves_map():
    gt = _ground_truth()
    results = [_segm_result(a, 0.8) for a in gt["annotations"] if a["category_id"] == 1 and not a["iscrowd"]]
    stats, azure = _evaluate(gt, results)
    labels = azure["per_label_metrics"]
    assert labels["a"]["average_precision"] == pytest.approx(1.0)
    assert labels["b"]["average_precision"] == 0.0
    assert azure["mean_average_precision"] == pytest.approx(0.5)
    assert stats["AP50"] == pytest.approx(0.5)
    assert azure["recall"] == pytest.approx(2 / 3)
    assert azure["precision"] == 1.0


def test_matching_thresholds_crowd_and_confusion():
    gt = _ground_truth()
    a1, b1, a2, crowd = gt["annotations"]
    results = [
        _segm_result(a1, 0.9),                  # true positive
        _segm_result(a1, 0.8),                  # duplicate of a1: false positive -> background
        _segm_result(b1, 0.7, category_id=1),   # 'a' predicted on a 'b': confused (b, a)
        _segm_result(a2, 0.2),                  # below box_score_threshold: not counted in P/R
        _segm_result(crowd, 0.9),               # on the crowd region: ignored
        {**_segm_result(a1, 0.6), "image_id": 3},  # on the image without annotations: FP
    ]
    _, azure = _evaluate(gt, results)
    a = azure["per_label_metrics"]["a"]
    assert (a["true_positives"], a["false_positives"], a["ground_truth"]) == (1, 3, 2)
    assert azure["precision"] == pytest.approx(1 / 4)
    assert azure["recall"] == pytest.approx(1 / 3)
    # rows: truth a, b, c, background; columns: predicted a, b, c, missed
    assert azure["confusion_matrix"]["matrix"] == [[1, 0, 0, 1], [1, 0, 0, 0], [0, 0, 0, 0], [2, 0, 0, 0]]
    assert azure["per_image"] == {1: {"true_positives": 1}, 2: {"true_positives": 0},
                                  3: {"true_positives": 0}}
    # the 0.2 prediction still counts for AP (its ranking is what AP measures)
    assert a["average_precision"] > 0
    # with a score threshold below it, it becomes a true positive
    _, low = _evaluate(gt, results, box_score_threshold=0.1)
    assert low["per_label_metrics"]["a"]["true_positives"] == 2


def test_iou_threshold_is_used():
    gt = _ground_truth()
    a1 = gt["annotations"][0]
    shifted = {**a1, "segmentation": [_rect(10 + 12, 10, 30, 20)]}  # IoU 18*20 / (42*20) = 0.43
    results = [_segm_result(shifted, 0.9)]
    for threshold, expected_tp in ((0.5, 0), (0.4, 1)):
        _, azure = _evaluate(gt, results, iou_threshold=threshold)
        assert azure["per_label_metrics"]["a"]["true_positives"] == expected_tp


@pytest.mark.parametrize("break_it, message", [
    (lambda gt: gt["images"].clear(), "no images"),
    (lambda gt: gt["annotations"][0].update(segmentation=[]), "at least 3 points"),
    (lambda gt: gt["annotations"][0].update(image_id=99), "no such image"),
    (lambda gt: gt["annotations"][0].update(category_id=9), "category 9 is not defined"),
    (lambda gt: gt["categories"][1].update(name="a"), "unique"),
])
def test_bad_ground_truth_is_a_clear_error(break_it, message):
    gt = _ground_truth()
    break_it(gt)
    with pytest.raises(metrics.EvaluationError, match=message):
        metrics.coco_api(gt)


def test_predictions_for_unknown_images_are_refused():
    gt = _ground_truth()
    result = {**_segm_result(gt["annotations"][0], 0.9), "image_id": 42}
    with pytest.raises(metrics.EvaluationError, match="not in the ground truth"):
        metrics.coco_evaluate(metrics.coco_api(gt), [result], "segm")
