"""Pictures of detections: a prediction is tagged 'label score', ground truth (which has no score)
with its label alone (synth's preview and evaluation's samples showed 1.00 on
every ground-truth box)."""
from __future__ import annotations

import cv2
import numpy as np

from mmdet_mlflow.data import response_boxes
from mmdet_mlflow.synth import generate
from mmdet_mlflow.visualize import draw_detections, label_color

WIDTH, HEIGHT = 400, 300
BOX = {"topX": 0.2, "topY": 0.5, "bottomX": 0.8, "bottomY": 0.9}


def tag_width(drawn: np.ndarray, label: str) -> int:
    """Width in pixels of the filled tag above the box (the rows between the picture's top and
    the box's top edge hold nothing else)."""
    above_box = drawn[: round(BOX["topY"] * HEIGHT) - 1]
    columns = np.where((above_box == label_color(label)).all(axis=2).any(axis=0))[0]
    return int(columns.max() - columns.min() + 1) if columns.size else 0


def text_width(text: str) -> int:
    (width, _), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, 0.4, 1)
    return width


def test_ground_truth_records_carry_no_score(tmp_path):
    datasets = generate(tmp_path / "data", num_images=2, seed=0, progress=False)
    record = next(r for split in datasets.values() for r in split.images if r.instances)
    boxes = response_boxes(record)
    assert len(boxes) == len(record.instances)
    assert all("score" not in box and box["label"] and box["polygon"] for box in boxes)


def test_a_box_without_score_is_tagged_with_its_label_alone():
    blank = np.full((HEIGHT, WIDTH, 3), 255, np.uint8)
    truth = draw_detections(blank, [{"box": BOX, "label": "carton", "polygon": []}])
    predicted = draw_detections(blank, [{"box": BOX, "label": "carton", "score": 0.87, "polygon": []}])
    assert tag_width(truth, "carton") == text_width("carton") + 1
    assert tag_width(predicted, "carton") == text_width("carton 0.87") + 1


def test_an_rle_mask_is_filled_with_its_hole_left_open():
    from scoring.rle import encode

    mask = np.zeros((HEIGHT, WIDTH), np.uint8)
    cv2.circle(mask, (200, 210), 50, 1, -1)
    cv2.circle(mask, (200, 210), 20, 0, -1)
    blank = np.full((HEIGHT, WIDTH, 3), 255, np.uint8)
    drawn = draw_detections(blank, [{"box": BOX, "label": "ring", "score": 0.9,
                                     "rle": encode(mask.astype(bool))}])
    assert not np.array_equal(drawn[210, 165], blank[210, 165])  # inside the ring: filled
    assert np.array_equal(drawn[210, 200], blank[210, 200])  # the hole: untouched
    assert np.array_equal(drawn[250, 100], blank[250, 100])  # inside the box, off the mask


def test_boxes_alone_draw_the_box_and_nothing_inside():
    blank = np.full((HEIGHT, WIDTH, 3), 255, np.uint8)
    drawn = draw_detections(blank, [{"box": BOX, "label": "carton", "score": 0.5}])
    assert np.array_equal(drawn[200:260, 100:300], blank[200:260, 100:300])
    assert (drawn[round(BOX["bottomY"] * HEIGHT), 150] == label_color("carton")).all()
