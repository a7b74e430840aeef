"""Evaluate a saved model on labelled test data: score every image, write the predictions and the
ground truth in COCO format, compute COCO and Azure-named metrics (mmdet_mlflow.metrics), draw
PR curves and sample pictures, log to MLflow when tracking is on.

What is measured follows the task (``evaluated_task``): an instance-segmentation model on
instance-segmentation data is measured on masks and boxes (sections ``bbox``, ``segm``,
``segm_from_polygons``; Azure-named metrics on masks); anything with an object-detection side
(an object-detection model, or object-detection test data) on boxes alone (section ``bbox``;
Azure-named metrics on boxes), and the model is not asked for masks (mask_format "none").

Scoring uses a LOW score threshold (the model config's ``score_thr``, 0.05 for RTMDet-Ins, or
``box_score_threshold`` if lower): COCO AP integrates precision over the whole ranking of
detections, so cutting at 0.3 would drop the low-score tail and under-report AP. Precision,
recall and the confusion matrix are then read at ``box_score_threshold``.

Masks are the model's own (``ImageDetections.iter_masks``) encoded as RLE (what an answer with
``mask_format="rle"`` carries), not the simplified polygons of the public response; ``segm_from_polygons`` scores those polygons (rasterized back
with pycocotools) so the cost of the polygon output is visible.

Metric names (Azure's keep Azure's meaning, COCO's are ``segm_AP``, ...): docs/metrics.md.

Test data (AutoML JSONL, MLTable folder or COCO JSON; see mmdet_mlflow.data):
- labels are matched to the model's classes by name; an annotated label the model does not know
  is an error (it could never be found); predictions of model classes the test data does not
  define are left out (the data says nothing about them) and counted in
  ``counts.predictions_outside_test_labels``;
- a missing or unreadable image is an error that names it (the data layer checks first);
- images without annotations are test images like any other (their detections are false
  positives); test data without a single annotation is an error (nothing to measure).
"""
from __future__ import annotations

import functools
import json
import os
import re
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Sequence

import numpy as np

import mlflow_model
from scoring.errors import InputError
from scoring.model_dir import ModelDir
from scoring.schema import INSTANCE_SEGMENTATION, OBJECT_DETECTION, TASKS, PredictParams
from mmdet_mlflow.data import load_dataset, spread_indices, to_coco
from mmdet_mlflow.files import atomic_write_json, atomic_write_text
from mmdet_mlflow.metrics import (AZURE_BOX_SCORE_THRESHOLD, AZURE_IOU_THRESHOLD, AZURE_METRIC_NAMES,
                                  EvaluationError, azure_metrics, coco_api, coco_evaluate,
                                  coco_metric_names, coco_stats, definitions)
from mmdet_mlflow.plots import pr_curves, sample_grid

METRICS_FILE = "metrics.json"
GROUND_TRUTH_FILE = "ground_truth.json"
PREDICTION_FILES = {"bbox": "predictions.bbox.json", "segm": "predictions.segm.json",
                    "segm_from_polygons": "predictions.segm_from_polygons.json"}
# The COCO sections an evaluation of each task reports, the one the Azure-named metrics are
# computed on first.
SECTIONS = {INSTANCE_SEGMENTATION: ("segm", "bbox", "segm_from_polygons"), OBJECT_DETECTION: ("bbox",)}
PR_CURVES_FILE = "pr_curves.png"
SAMPLES_FILE = "samples.png"
DEFAULT_MAP_SCORE_THRESHOLD = 0.05  # RTMDet-Ins configs' score_thr
DEFAULT_SAMPLES = 8


def evaluate(model_dir, test_data, output_dir, iou_threshold: float = AZURE_IOU_THRESHOLD,
             box_score_threshold: float = AZURE_BOX_SCORE_THRESHOLD, batch_size: int | None = None,
             map_score_threshold: float | None = None, num_samples: int = DEFAULT_SAMPLES,
             progress: bool = True, confine_images: bool = False, predictor=None,
             track: bool = True, params: dict | None = None) -> dict:
    """Evaluate ``model_dir`` (saved by ``package``) on ``test_data``; write everything to
    ``output_dir`` and return the metrics.json document. ``confine_images``: refuse test images
    outside the test data's folder (mmdet_mlflow.data.paths). ``predictor``: score with this one
    instead of the one the model serves (e.g. its fp32 ONNX network beside the int8 one it
    serves); ``track=False``: log nothing to MLflow. ``params``: predict params over the model's
    own (e.g. ``tile_grid_size``: evaluate tiled inference, scoring.tiling); the score threshold
    is evaluate's own (``map_score_threshold``), and so is ``mask_format`` (polygons where masks
    are measured, none where boxes alone are)."""
    _check_thresholds(iou_threshold, box_score_threshold, map_score_threshold)
    try:
        PredictParams().updated(params)  # a bad param is refused before anything is loaded
    except InputError as err:
        raise EvaluationError(str(err)) from None
    model_dir, test_data, output_dir = Path(model_dir), Path(test_data), Path(output_dir)
    weights = _saved_weights(model_dir)

    dataset = load_dataset(test_data, confine_images=confine_images)
    info = weights.read_info()
    # an older model.json names no task: those models were all RTMDet-Ins
    model_task = predictor.task if predictor is not None else info.get("task", INSTANCE_SEGMENTATION)
    task, note = evaluated_task(model_task, dataset.task)
    sections = SECTIONS[task]
    category_of = _category_ids(dataset, info["classes"], test_data)
    masks = task == INSTANCE_SEGMENTATION
    ground_truth, gt_text = _ground_truth(dataset, test_data, masks)

    predictor = predictor or mlflow_model.load_saved_predictor(model_dir, batch_size=batch_size)
    map_score_threshold, params = _scoring_params(predictor, params, map_score_threshold,
                                                  box_score_threshold, masks)
    image_ids = [image["id"] for image in ground_truth["images"]]
    sample_indices = set(spread_indices(len(dataset.images), num_samples))
    scored = _score(predictor, dataset.images, image_ids, params, category_of, box_score_threshold,
                    sample_indices, progress, masks)

    output_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(output_dir / GROUND_TRUTH_FILE, gt_text)
    stats, matched = _write_and_measure(output_dir, gt_text, scored, sections, masks)
    azure = azure_metrics(matched, iou_threshold, box_score_threshold)
    per_image = _per_image(ground_truth, scored, matched, azure)
    document = {
        "task": task,
        **({"notes": [note]} if note else {}),
        **{section: stats[section] for section in PREDICTION_FILES if section in stats},
        **{name: azure[name] for name in AZURE_METRIC_NAMES},
        "per_label_metrics": azure["per_label_metrics"],
        "confusion_matrix": azure["confusion_matrix"],
        "settings": _settings_record(
            dict(iou_threshold=iou_threshold, box_score_threshold=box_score_threshold,
                 map_score_threshold=map_score_threshold), params, masks,
            dict(model=str(model_dir), test_data=str(test_data), model_task=model_task,
                 test_data_task=dataset.task), predictor),
        "counts": _counts(per_image, scored),
        "per_image": per_image,
        "definitions": definitions(sections[0]),
    }

    pr_curves(matched, azure["evaluator"], azure["per_label_metrics"], output_dir / PR_CURVES_FILE)
    sample_grid(scored.samples, box_score_threshold, output_dir / SAMPLES_FILE)
    atomic_write_json(output_dir / METRICS_FILE, document, indent=2)
    if track:
        _log_to_mlflow(document, output_dir)
    return document


def _check_thresholds(iou_threshold: float, box_score_threshold: float,
                      map_score_threshold: float | None) -> None:
    for name, value in (("iou_threshold", iou_threshold), ("box_score_threshold", box_score_threshold)):
        if not 0.0 <= value <= 1.0:
            raise EvaluationError(f"{name} must be between 0 and 1, got {value}")
    if map_score_threshold is not None and not 0.0 <= map_score_threshold <= box_score_threshold:
        raise EvaluationError(f"map_score_threshold must be between 0 and box_score_threshold "
                              f"({box_score_threshold}), got {map_score_threshold}: precision and "
                              f"recall are read from the predictions scored for AP")


def _saved_weights(model_dir: Path):
    """The weights folder of a model saved by ``package``; refused when it is not one."""
    weights = ModelDir(model_dir).data
    if not weights.info_file.is_file():
        raise EvaluationError(f"{model_dir} is not a model directory saved by `mmdet-mlflow package` "
                              f"(no {weights.info_file.relative_to(model_dir)})")
    return weights


def _ground_truth(dataset, test_data: Path, masks: bool) -> tuple[dict, str]:
    """The test data as COCO ground truth, and the very text written to ground_truth.json;
    refused when nothing is annotated or COCOeval would choke on it, before any scoring."""
    data_folder = test_data if test_data.is_dir() else test_data.parent
    ground_truth = to_coco(dataset, relative_to=data_folder.absolute())
    ground_truth["info"]["description"] = f"ground truth of {test_data}"
    if not ground_truth["annotations"]:
        raise EvaluationError(f"{test_data}: no image has annotations: there is nothing to measure "
                              f"predictions against")
    # Everything is scored against the very text written to ground_truth.json (a fresh COCO
    # object each time, as anyone recomputing from the files would do).
    gt_text = json.dumps(ground_truth)
    coco_api(json.loads(gt_text), masks)
    return ground_truth, gt_text


def _scoring_params(predictor, params: dict | None, map_score_threshold: float | None,
                    box_score_threshold: float, masks: bool) -> tuple[float, PredictParams]:
    """The score threshold predictions are scored for AP at (the model's own, or the default,
    unless given; never above ``box_score_threshold``) and the predict params that score them:
    ``params`` over the model's own, polygons where masks are measured, none where not."""
    if map_score_threshold is None:
        configured = predictor.configured_score_threshold or DEFAULT_MAP_SCORE_THRESHOLD
        map_score_threshold = min(float(configured), box_score_threshold)
    return map_score_threshold, predictor.default_params.updated(
        {**(params or {}), "score_threshold": map_score_threshold,
         "mask_format": "polygon" if masks else "none"})


def _write_and_measure(output_dir: Path, gt_text: str, scored: _Scored, sections: Sequence[str],
                       masks: bool) -> tuple[dict, object]:
    """Each section's predictions written and measured with COCOeval against the ground truth:
    the stats per section, and the evaluator of the first (what the Azure-named metrics and the
    PR curves are on)."""
    stats, evaluators = {}, {}
    for section in sorted(sections, key=list(PREDICTION_FILES).index):  # the order they are written in
        text = json.dumps(scored.results[section])
        atomic_write_text(output_dir / PREDICTION_FILES[section], text)
        evaluators[section] = coco_evaluate(coco_api(json.loads(gt_text), masks), json.loads(text),
                                            section.split("_")[0])
        stats[section] = coco_stats(evaluators[section])
    return stats, evaluators[sections[0]]


def _per_image(ground_truth: dict, scored: _Scored, matched, azure: dict) -> list[dict]:
    per_image = []
    for image, counts in zip(ground_truth["images"], scored.per_image):
        anns = matched.cocoGt.imgToAnns[image["id"]]
        per_image.append({"image_id": image["id"], "file_name": image["file_name"],
                          "ground_truth": sum(1 for a in anns if not a["iscrowd"]),
                          "crowd_regions": sum(1 for a in anns if a["iscrowd"]),
                          **counts, **azure["per_image"][image["id"]]})
    return per_image


def _settings_record(thresholds: dict, params: PredictParams, masks: bool, inputs: dict,
                     predictor) -> dict:
    """metrics.json's ``settings``: the ``thresholds`` read at, the predict params that scored,
    the ``inputs`` (model, test data and their tasks), and what scored."""
    return {
        **thresholds, "max_detections": params.max_detections,
        **({"mask_threshold": params.mask_threshold, "polygon_tolerance": params.polygon_tolerance}
           if masks else {}),
        "nms_iou_threshold": params.iou_threshold,
        "tile_grid_size": params.tile_grid_size, "tile_overlap_ratio": params.tile_overlap_ratio,
        "tile_predictions_nms_thresh": params.tile_predictions_nms_thresh,
        **inputs,
        # what scored: the runtime, and the precision its network ran in on this machine
        # (an OpenVINO model's "auto" is bf16 or fp32 by the CPU; int8 for a quantized ONNX one)
        "runtime": predictor.runtime, "precision": getattr(predictor, "precision", "fp32"),
    }


def _counts(per_image: list[dict], scored: _Scored) -> dict:
    return {"images": len(per_image), "ground_truth": sum(p["ground_truth"] for p in per_image),
            "predictions": len(scored.results["bbox"]),
            "predictions_at_box_score_threshold": sum(p["predicted"] for p in per_image),
            "predictions_outside_test_labels": scored.outside_labels}


def evaluated_task(model_task: str, data_task: str) -> tuple[str, str | None]:
    """The task an evaluation measures (scoring.schema.TASKS) of a model of ``model_task`` on
    test data of ``data_task``, and a note for the reader where that is less than the model
    makes: masks where both have them, else boxes alone (an object-detection model on instance
    segmentation data is measured on the data's boxes)."""
    for what, given in (("the model", model_task), ("the test data", data_task)):
        if given not in TASKS:
            raise EvaluationError(f"{what} is for {given!r}, which evaluate cannot measure: it "
                                  f"evaluates {' or '.join(TASKS)}")
    if model_task == INSTANCE_SEGMENTATION and data_task == OBJECT_DETECTION:
        return OBJECT_DETECTION, (
            f"an {INSTANCE_SEGMENTATION} model on {OBJECT_DETECTION} test data (boxes alone): "
            f"box metrics only; its masks are not measured")
    return (INSTANCE_SEGMENTATION if model_task == data_task == INSTANCE_SEGMENTATION
            else OBJECT_DETECTION), None


class _Scored:
    def __init__(self):
        self.results = {iou_type: [] for iou_type in PREDICTION_FILES}
        self.per_image: list[dict] = []  # per image: predictions at box_score_threshold / for AP
        self.samples: list[tuple] = []  # (file name, image, ground-truth boxes, predicted boxes)
        self.outside_labels = 0


def _score(predictor, records, image_ids, params, category_of, box_score_threshold,
           sample_indices, progress, masks: bool) -> _Scored:
    """Every test image through the one runner; with ``masks``, each detection's mask is made
    once and gives its RLE (segm) and, through the one encoder, its polygons
    (segm_from_polygons); without, boxes alone (no mask is made)."""
    from tqdm import tqdm

    from mmdet_mlflow.data import response_boxes
    from scoring import settings
    from scoring.decode import decode_image
    from scoring.runner import score_images

    def decode_checked(index, record):
        image = decode_image(record.path.read_bytes(), row=str(record.path))
        if image.shape[:2] != (record.height, record.width):
            raise EvaluationError(
                f"{record.path}: decodes to {image.shape[1]}x{image.shape[0]} (EXIF "
                f"orientation applied) but the test data says {record.width}x{record.height}")
        return image

    out = _Scored()
    # the model's model_config is active while it scores, as when MLflow serves it
    with settings.using(predictor.model_config), \
            tqdm(total=len(records), desc="evaluate", unit="img", file=sys.stderr,
                 disable=None if progress else True) as bar:
        for scored in score_images(predictor, enumerate(records), params,
                                   encode=encode_keeping_rles if masks else encode_boxes,
                                   decode=decode_checked, keep_images=True):
            index, record = scored.key, records[scored.key]
            boxes = _add_results(out, image_ids[index], scored.detections, scored.response, category_of)
            shown = [b for b in boxes if b["score"] >= box_score_threshold]
            out.per_image.append({"predicted": len(shown), "predicted_for_ap": len(boxes)})
            if index in sample_indices:
                truth = response_boxes(record)
                if not masks:  # boxes are what was measured: the pictures show boxes alone
                    truth = [{k: v for k, v in box.items() if k != "polygon"} for box in truth]
                out.samples.append((record.path.name, scored.image, truth, shown))
            bar.update(1)
    return out


def _add_results(out: _Scored, image_id: int, dets, encoded, category_of) -> list[dict]:
    """One image's detections appended as COCO results (bbox as mmdet's CocoMetric writes it:
    x, y, w, h of the model's box, unclipped; segm and segm_from_polygons where masks were
    made); returns its response boxes for the test labels."""
    boxes, rles = encoded
    width, height = dets.image_size
    kept = []
    for i, box in enumerate(boxes):
        category_id = category_of.get(box["label"])
        if category_id is None:
            out.outside_labels += 1
            continue
        kept.append(box)
        score = float(dets.scores[i])
        x1, y1, x2, y2 = (float(v) for v in dets.boxes[i])
        head = {"image_id": image_id, "category_id": category_id}
        out.results["bbox"].append({**head, "bbox": [x1, y1, x2 - x1, y2 - y1], "score": score})
        if rles is None:
            continue
        out.results["segm"].append({**head, "segmentation": rles[i], "score": score})
        out.results["segm_from_polygons"].append(
            {**head, "segmentation": _polygons_rle(box["polygon"], width, height), "score": score})
    return kept


def encode_boxes(dets, params) -> tuple[list[dict], None]:
    """The runner's encoder for evaluation on boxes alone: the public response boxes (the one
    encoder, mask_format "none": no mask is made) and no RLEs."""
    from scoring.encode import encode_detections
    from scoring.schema import OUTPUT_COLUMN

    return encode_detections(dets, params)[OUTPUT_COLUMN], None


def encode_keeping_rles(dets, params) -> tuple[list[dict], list[dict]]:
    """The runner's encoder for evaluation: the public response boxes (the one encoder) and,
    from the same masks as they go by, each detection's RLE."""
    from scoring.encode import encode_detections
    from scoring.schema import OUTPUT_COLUMN

    rles: list[dict] = []
    response = encode_detections(dets, params, on_mask=lambda mask: rles.append(mask_rle(mask)))
    return response[OUTPUT_COLUMN], rles


def mask_rle(mask: np.ndarray) -> dict:
    """A boolean HxW mask as COCO compressed RLE with a str ``counts`` (JSON-ready): the very
    encoder of ``mask_format="rle"`` answers (scoring.rle, byte for byte pycocotools')."""
    from scoring.rle import encode

    return encode(mask)


def _polygons_rle(segments: Sequence[Sequence[float]], width: int, height: int) -> dict:
    """Normalized response polygons rasterized back at the image size, as COCO tools would."""
    from pycocotools import mask as mask_util

    pixel = [(np.asarray(s, dtype=np.float64).reshape(-1, 2) * (width, height)).ravel().tolist()
             for s in segments]
    if not pixel:  # a speck whose polygon was dropped: an empty mask
        return _empty_rle(width, height)
    rle = mask_util.merge(mask_util.frPyObjects(pixel, height, width))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


@functools.lru_cache(maxsize=16)
def _empty_rle_counts(width: int, height: int) -> str:
    return mask_rle(np.zeros((height, width), dtype=bool))["counts"]


def _empty_rle(width: int, height: int) -> dict:
    return {"size": [height, width], "counts": _empty_rle_counts(width, height)}


def _category_ids(dataset, model_classes: Sequence[str], test_data) -> dict[str, int]:
    """Model class name -> test-data category id, for the names they share. Annotated labels
    the model does not know are an error."""
    category_of = dict(zip(dataset.classes, dataset.coco_category_ids()))
    used = {inst.label for record in dataset.images for inst in record.instances}
    unknown = sorted(used - set(model_classes))
    if unknown:
        raise EvaluationError(
            f"{test_data}: labels the model does not know: {', '.join(unknown)} (the model's "
            f"classes: {', '.join(model_classes)}); labels are matched by name")
    return {name: category_of[name] for name in model_classes if name in category_of}


def mlflow_metrics(document: dict) -> dict[str, float]:
    """metrics.json's numbers under MLflow metric names; undefined (-1) values are left out."""
    flat = {}
    for section in PREDICTION_FILES:  # the COCO sections this evaluation has
        if section in document:
            flat.update(coco_metric_names(section, document[section]))
    for name in AZURE_METRIC_NAMES:
        flat[name] = document[name]
    for label, values in document["per_label_metrics"].items():
        safe = re.sub(r"[^\w\-. ]", "_", label)
        for name in ("average_precision", "precision", "recall"):
            flat[f"per_label/{safe}/{name}"] = values[name]
    return {k: float(v) for k, v in flat.items() if v >= 0}


def _log_to_mlflow(document: dict, output_dir: Path) -> str | None:
    """Log metrics and pictures to the active MLflow run, or to a new one when only a tracking
    URI is set (as in an Azure ML job); returns the run id, or None when tracking is off."""
    import mlflow

    active = mlflow.active_run()
    if active is None and not os.environ.get("MLFLOW_TRACKING_URI"):
        return None
    with (nullcontext(active) if active else mlflow.start_run(run_name="evaluate")) as run:
        if active is None:
            mlflow.log_params({f"evaluate.{k}": v for k, v in document["settings"].items()})
        # tags too: a run of its own's params say it, but an enclosing run's params may not
        mlflow.set_tags({**{f"evaluate.{k}": document["settings"][k] for k in ("runtime", "precision")},
                         "evaluate.task": document["task"]})
        mlflow.log_metrics(mlflow_metrics(document))
        for name in (METRICS_FILE, PR_CURVES_FILE, SAMPLES_FILE):
            mlflow.log_artifact(str(output_dir / name), artifact_path="evaluation")
        return run.info.run_id
