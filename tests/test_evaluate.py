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


@pytest.fixture(autouse=True)
def artifacts_outside_the_repository(tmp_path, monkeypatch):
    """The suite's sqlite tracking store keeps logged artifacts in ./mlruns of the working
    directory: make that the test's own folder."""
    monkeypatch.chdir(tmp_path)


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


def test_box_only_ground_truth_is_measured_on_boxes_and_refused_for_masks():
    """Object-detection ground truth has no segmentation: fine for boxes, a clear error for masks."""
    gt = _ground_truth()
    for ann in gt["annotations"]:
        del ann["segmentation"]
    results = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9}
               for a in gt["annotations"] if not a["iscrowd"]]
    base = metrics.coco_evaluate(metrics.coco_api(copy.deepcopy(gt), masks=False), results, "bbox")
    assert metrics.coco_stats(base)["AP"] == pytest.approx(1.0, abs=1e-12)
    azure = metrics.azure_metrics(base, 0.5, 0.3)
    assert azure["mean_average_precision"] == pytest.approx(1.0) and azure["recall"] == 1.0
    with pytest.raises(metrics.EvaluationError, match="annotation 1 of image 1: no 'segmentation'"):
        metrics.coco_api(gt)


def test_predictions_for_unknown_images_are_refused():
    gt = _ground_truth()
    result = {**_segm_result(gt["annotations"][0], 0.9), "image_id": 42}
    with pytest.raises(metrics.EvaluationError, match="not in the ground truth"):
        metrics.coco_evaluate(metrics.coco_api(gt), [result], "segm")


# ---------------------------------------------------------------------------------------------
# The whole command, with a real tiny model on a synthetic fridge-objects set.

import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

from helpers import TINY, make_official_checkpoint, with_visible_outputs  # noqa: E402

# Category ids on purpose neither 1..K nor sorted by name: they must come through unchanged.
TEST_CATEGORIES = [{"id": 30, "name": "can"}, {"id": 10, "name": "carton"}, {"id": 20, "name": "milk_bottle"}]
IMAGE_ID_BASE = 500


@pytest.fixture(scope="module")
def fridge_model(tmp_path_factory) -> Path:
    """A tiny RTMDet-Ins with the synthetic set's four classes (random weights; masks and scores
    made worth measuring: see helpers.with_visible_outputs)."""
    import mlflow_model
    from mmdet_mlflow.synth import CLASSES

    folder = tmp_path_factory.mktemp("fridge_model")
    checkpoint = with_visible_outputs(make_official_checkpoint(folder / "fridge.pth", classes=CLASSES,
                                                               confident=False))
    mlflow_model.save_model(folder / "model", TINY, str(checkpoint), classes=CLASSES)
    return folder / "model"


@pytest.fixture(scope="module")
def labelled_set(tmp_path_factory, fridge_model):
    """Synthetic scenes whose COCO ground truth mixes the scenes' own objects (which a random
    model will not find) with some of the model's own masks (which it finds exactly), so AP lands
    strictly between 0 and 1. Defines only three of the model's four classes (water_bottle
    predictions must be left out), keeps odd image / category ids, has one image without
    annotations and one crowd region. Returns (COCO path, the model's masks/scores per image)."""
    import mlflow_model
    from mmdet_mlflow.data import load_dataset, to_coco
    from mmdet_mlflow.evaluate import mask_rle
    from mmdet_mlflow.synth import SceneStyle, generate
    from scoring.decode import decode_image

    folder = tmp_path_factory.mktemp("fridge_data")
    # the harder set this test's expectations (which detections exist, the confusions made of
    # them) were built on; the demo's default set is easier
    generate(folder, num_images=5, seed=7, progress=False,
             style=SceneStyle(object_size=(60, 250), min_visible_fraction=0.35))
    dataset = load_dataset(folder / "train.coco.json")
    predictor = mlflow_model.load_predictor(fridge_model / mlflow_model.MODEL_DATA_DIR)
    params = predictor.default_params.updated({"score_threshold": 0.05})  # what evaluate uses
    images = [decode_image(r.path.read_bytes()) for r in dataset.images]
    detections = predictor(images, params)  # one batch, as evaluate's (batch size 8) will be
    model_masks = [(list(d.iter_masks(params.mask_threshold)), d.scores.copy(),
                    [d.label_name(i) for i in range(len(d))], d.boxes.copy()) for d in detections]

    coco = to_coco(dataset, relative_to=folder)
    category_id = {c["name"]: c["id"] for c in TEST_CATEGORIES}
    old_names = {c["id"]: c["name"] for c in coco["categories"]}
    annotations = []
    for n, image in enumerate(coco["images"]):
        old_id, image["id"] = image["id"], IMAGE_ID_BASE + 7 * n
        if n == 2:
            continue  # an image without annotations: every detection on it is a false positive
        for ann in coco["annotations"]:
            name = old_names[ann["category_id"]]
            if ann["image_id"] == old_id and name in category_id:
                annotations.append({**ann, "image_id": image["id"], "category_id": category_id[name]})
        masks, scores, labels, boxes = model_masks[n]
        for k in range(min(3, len(masks))):
            name = labels[k] if labels[k] in category_id else "can"
            if k != 1:  # the model's own mask: found exactly by segm
                segmentation = mask_rle(masks[k])
            else:  # the model's own box: found exactly by bbox
                x1, y1, x2, y2 = np.clip(boxes[k], 0, [image["width"], image["height"]] * 2).tolist()
                segmentation = [[x1, y1, x2, y1, x2, y2, x1, y2]]
            if k == 2:  # a label the model did not give: a confusion in the matrix
                name = "carton" if name != "carton" else "milk_bottle"
            annotations.append({"image_id": image["id"], "category_id": category_id[name],
                                "segmentation": segmentation, "iscrowd": int(n == 1 and k == 0),
                                "bbox": [0.0, 0.0, 1.0, 1.0], "area": 1.0})  # both recomputed on reading
    for i, ann in enumerate(annotations, 1):
        ann["id"] = 1000 + i
    coco.update(annotations=annotations, categories=TEST_CATEGORIES)
    path = folder / "test.coco.json"
    path.write_text(json.dumps(coco))
    return path, model_masks


def _coco_recomputed(out: Path, iou_type: str, file_name: str):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt = COCO(str(out / "ground_truth.json"))
    evaluator = COCOeval(gt, gt.loadRes(str(out / file_name)), iou_type)
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    return evaluator


def test_evaluate_matches_pycocotools_on_its_own_files(tmp_path, labelled_set, fridge_model, capsys):
    import mlflow

    from mmdet_mlflow.cli import main

    test_file, model_masks = labelled_set
    out = tmp_path / "eval"
    assert main(["evaluate", "--model", str(fridge_model), "--test", str(test_file),
                 "--output", str(out)]) == 0
    assert "segm AP" in capsys.readouterr().out
    doc = json.loads((out / "metrics.json").read_text())
    assert doc["task"] == "instance-segmentation" and "notes" not in doc

    # Our numbers are COCOeval's on the files we wrote, recomputed here from scratch.
    for section, iou_type, file_name in (("bbox", "bbox", "predictions.bbox.json"),
                                         ("segm", "segm", "predictions.segm.json"),
                                         ("segm_from_polygons", "segm", "predictions.segm_from_polygons.json")):
        evaluator = _coco_recomputed(out, iou_type, file_name)
        for name, value in zip(metrics.COCO_STAT_NAMES, evaluator.stats):
            assert doc[section][name] == pytest.approx(value, abs=1e-9), (section, name)
        if section == "segm":
            segm = evaluator
    for section in ("bbox", "segm", "segm_from_polygons"):  # a test with teeth
        assert 0 < doc[section]["AP"] < 1 and 0 < doc[section]["AP50"] < 1, section
    # Azure's mAP at IoU 0.5 is COCO's AP50; per label, COCOeval's precision array at IoU 0.5.
    assert doc["mean_average_precision"] == pytest.approx(doc["segm"]["AP50"], abs=1e-9)
    for k, cat_id in enumerate(segm.params.catIds):
        curve = segm.eval["precision"][0, :, k, 0, 2]
        expected = float(np.mean(curve)) if (curve > -1).all() else -1.0
        name = segm.cocoGt.cats[cat_id]["name"]
        assert doc["per_label_metrics"][name]["average_precision"] == pytest.approx(expected, abs=1e-9)
    # The model's own masks, not polygons: exact masks found exactly, polygons cost something.
    assert doc["segm_from_polygons"]["AP"] <= doc["segm"]["AP"]

    gt = json.loads((out / "ground_truth.json").read_text())
    source = json.loads(test_file.read_text())
    assert [i["id"] for i in gt["images"]] == [i["id"] for i in source["images"]]
    assert gt["categories"] == TEST_CATEGORIES
    assert [i["file_name"] for i in gt["images"]] == [i["file_name"] for i in source["images"]]

    # predictions.segm.json holds the model's masks bit for bit (RLE of iter_masks).
    segm_results = json.loads((out / "predictions.segm.json").read_text())
    kept_ids = {c["id"] for c in TEST_CATEGORIES}
    assert {r["category_id"] for r in segm_results} <= kept_ids
    for n, image in enumerate(source["images"]):
        masks, scores, labels, _ = model_masks[n]
        mine = [r for r in segm_results if r["image_id"] == image["id"]]
        expected = [i for i, label in enumerate(labels) if label != "water_bottle"]
        assert [r["score"] for r in mine] == [float(scores[i]) for i in expected]
        for r, i in zip(mine, expected):
            rle = {**r["segmentation"], "counts": r["segmentation"]["counts"].encode()}
            assert np.array_equal(mask_util.decode(rle).astype(bool), masks[i])
    outside = sum(label == "water_bottle" for _, _, labels, _ in model_masks for label in labels)
    assert outside > 0 and doc["counts"]["predictions_outside_test_labels"] == outside

    # Counts and the confusion matrix agree with each other and with the data.
    per_image = {p["image_id"]: p for p in doc["per_image"]}
    assert per_image[IMAGE_ID_BASE + 14]["ground_truth"] == 0
    assert per_image[IMAGE_ID_BASE + 7]["crowd_regions"] == 1
    for p in doc["per_image"]:
        anns = [a for a in source["annotations"] if a["image_id"] == p["image_id"]]
        assert p["ground_truth"] == sum(not a["iscrowd"] for a in anns)
        assert p["predicted_for_ap"] == sum(r["image_id"] == p["image_id"] for r in segm_results)
    matrix = np.array(doc["confusion_matrix"]["matrix"])
    labels = doc["per_label_metrics"]
    by_id = [c["name"] for c in sorted(TEST_CATEGORIES, key=lambda c: c["id"])]  # COCOeval's order
    assert doc["confusion_matrix"]["labels"] == by_id + ["background"]
    for k, name in enumerate(by_id):
        assert matrix[k].sum() == labels[name]["ground_truth"]
        assert matrix[:, k].sum() == labels[name]["true_positives"] + labels[name]["false_positives"]
        assert matrix[k, k] == labels[name]["true_positives"]
    assert matrix[:3, :3].sum() > np.trace(matrix[:3, :3])  # the relabelled masks are confusions
    tp = np.trace(matrix[:3, :3])
    assert doc["precision"] == pytest.approx(tp / matrix[:, :3].sum())
    assert doc["recall"] == pytest.approx(tp / matrix[:3].sum())

    for picture in ("pr_curves.png", "samples.png"):
        assert (out / picture).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # Logged to MLflow (the suite sets MLFLOW_TRACKING_URI): a run with the metrics and pictures.
    run = mlflow.search_runs(search_all_experiments=True, filter_string="attributes.run_name = 'evaluate'",
                             order_by=["attributes.start_time DESC"], output_format="list")[0]
    assert run.data.metrics["segm_AP"] == pytest.approx(doc["segm"]["AP"])
    assert run.data.metrics["mean_average_precision"] == pytest.approx(doc["mean_average_precision"])
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id, "evaluation")}
    assert {"evaluation/metrics.json", "evaluation/pr_curves.png", "evaluation/samples.png"} <= artifacts
    # what scored, in the output and the run: the torch runtime at fp32
    assert doc["settings"]["runtime"] == "torch" and doc["settings"]["precision"] == "fp32"
    assert run.data.params["evaluate.runtime"] == "torch" and run.data.params["evaluate.precision"] == "fp32"
    assert run.data.tags["evaluate.runtime"] == "torch" and run.data.tags["evaluate.precision"] == "fp32"


def test_evaluate_reads_an_mltable_folder_into_an_active_run(tmp_path, labelled_set, fridge_model):
    import mlflow

    from mmdet_mlflow.evaluate import evaluate

    test_file, _ = labelled_set
    with mlflow.start_run() as run:
        doc = evaluate(fridge_model, test_file.parent / "validation", tmp_path / "eval",
                       iou_threshold=0.3, box_score_threshold=0.5, progress=False)
    assert doc["counts"]["images"] == 1
    assert doc["settings"]["iou_threshold"] == 0.3 and doc["settings"]["map_score_threshold"] == 0.05
    logged = mlflow.get_run(run.info.run_id).data.metrics
    assert logged["segm_AP"] == pytest.approx(doc["segm"]["AP"])
    tags = mlflow.get_run(run.info.run_id).data.tags  # an enclosing run's params are its own: tags
    assert tags["evaluate.runtime"] == "torch" and tags["evaluate.precision"] == "fp32"
    evaluator = _coco_recomputed(tmp_path / "eval", "segm", "predictions.segm.json")
    assert doc["segm"]["AP"] == pytest.approx(evaluator.stats[0], abs=1e-9)


def test_a_logged_evaluation_names_the_precision_the_network_ran_in(tmp_path, labelled_set, fridge_model):
    """An int8 ONNX model's evaluation says int8; the same graph on OpenVINO says what OpenVINO
    compiled it at on this CPU (bf16 where the CPU has it): in metrics.json and the MLflow run."""
    import mlflow

    import mlflow_model
    from mmdet_mlflow.data import load_dataset
    from mmdet_mlflow.evaluate import evaluate
    from scoring.decode import decode_image
    from scoring.runtimes.openvino_rtmdet import cpu_has_bf16, load_openvino_predictor
    from mmdet_mlflow.synth import CLASSES

    test_file, _ = labelled_set
    calibration = [decode_image(r.path.read_bytes()) for r in load_dataset(test_file).images]
    onnx_model = tmp_path / "int8"
    mlflow_model.save_model(onnx_model, TINY, str(fridge_model.parent / "fridge.pth"), classes=CLASSES,
                            runtime="onnx", quantize="int8", calibration_images=calibration)
    weights = onnx_model / mlflow_model.MODEL_DATA_DIR
    for predictor, runtime, precision in (
            (None, "onnx", "int8"),
            (load_openvino_predictor(weights, precision="bf16", quiet=True), "openvino",
             "bf16" if cpu_has_bf16() else "fp32")):
        with mlflow.start_run(run_name="evaluate-precision") as run:
            doc = evaluate(onnx_model, test_file, tmp_path / runtime, predictor=predictor, progress=False,
                           num_samples=0)
        assert doc["settings"]["runtime"] == runtime and doc["settings"]["precision"] == precision
        written = json.loads((tmp_path / runtime / "metrics.json").read_text())["settings"]
        assert (written["runtime"], written["precision"]) == (runtime, precision)
        tags = mlflow.get_run(run.info.run_id).data.tags
        assert (tags["evaluate.runtime"], tags["evaluate.precision"]) == (runtime, precision)


def test_evaluate_scores_tiled_inference_with_the_tiling_options(tmp_path, labelled_set, fridge_model,
                                                                 capsys):
    """`evaluate --tile-grid-size ...` scores what a tiled request answers (scoring.tiling), and
    says so in metrics.json; a bad grid is refused, naming the param, before anything is written."""
    import mlflow_model
    from mmdet_mlflow.cli import main
    from mmdet_mlflow.data import load_dataset
    from scoring.decode import decode_image
    from scoring.schema import PredictParams
    from scoring.tiling import segment_tiled

    test_file, _ = labelled_set
    out = tmp_path / "tiled"
    assert main(["evaluate", "--model", str(fridge_model), "--test", str(test_file), "--output", str(out),
                 "--tile-grid-size", "2x2", "--tile-overlap-ratio", "0.3",
                 "--tile-predictions-nms-thresh", "0.4"]) == 0
    doc = json.loads((out / "metrics.json").read_text())
    assert doc["settings"]["tile_grid_size"] == "2x2"
    assert doc["settings"]["tile_overlap_ratio"] == 0.3
    assert doc["settings"]["tile_predictions_nms_thresh"] == 0.4

    predictor = mlflow_model.load_predictor(fridge_model / mlflow_model.MODEL_DATA_DIR)
    params = predictor.default_params.updated({"score_threshold": 0.05, "tile_grid_size": "2x2",
                                               "tile_overlap_ratio": 0.3,
                                               "tile_predictions_nms_thresh": 0.4})
    untiled = PredictParams(**{**params.as_dict(), "tile_grid_size": ""})
    kept = {c["id"] for c in TEST_CATEGORIES}
    results = json.loads((out / "predictions.bbox.json").read_text())
    names = {c["id"]: c["name"] for c in TEST_CATEGORIES}
    for image in load_dataset(test_file).images:
        picture = decode_image(image.path.read_bytes())
        tiled = segment_tiled(predictor, picture, params)
        want = sorted((tiled.label_name(i), round(float(tiled.scores[i]), 4)) for i in range(len(tiled))
                      if tiled.label_name(i) in names.values())
        got = sorted((names[r["category_id"]], round(r["score"], 4)) for r in results
                     if r["image_id"] == image.image_id and r["category_id"] in kept)
        assert got == want, image.path.name
    plain = predictor([picture], untiled)[0]
    assert len(tiled) != len(plain) or not np.allclose(tiled.boxes, plain.boxes)  # tiling did something

    code = main(["evaluate", "--model", str(fridge_model), "--test", str(test_file),
                 "--output", str(tmp_path / "bad"), "--tile-grid-size", "4by4"])
    assert code == 2 and "tile_grid_size" in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_bad_test_data_is_a_clear_error(tmp_path, labelled_set, fridge_model, tiny_model_dir, capsys):
    from mmdet_mlflow.cli import main

    def run(model, test, *more):
        code = main(["evaluate", "--model", str(model), "--test", str(test), "--output", out, *more])
        return code, capsys.readouterr().err

    test_file, _ = labelled_set
    out = str(tmp_path / "out")
    # The COCO-classed model does not know the fridge labels: refused before scoring.
    code, err = run(tiny_model_dir, test_file)
    assert code == 2 and "labels the model does not know: can, carton, milk_bottle" in err

    coco = json.loads(test_file.read_text())
    missing = tmp_path / "missing.coco.json"
    missing.write_text(json.dumps({**coco, "images": [{**coco["images"][0], "file_name": "images/nope.jpg"}]
                                   + coco["images"][1:]}))
    code, err = run(fridge_model, missing)
    assert code == 2 and "image file not found" in err and "nope.jpg" in err

    unlabelled = test_file.parent / "unlabelled.coco.json"
    unlabelled.write_text(json.dumps({**coco, "annotations": []}))
    code, err = run(fridge_model, unlabelled)
    assert code == 2 and "no image has annotations" in err

    code, err = run(tmp_path, test_file)
    assert code == 2 and "not a model directory" in err
    code, err = run(fridge_model, test_file, "--map-score-threshold", "0.5")
    assert code == 2 and "map_score_threshold must be between 0 and box_score_threshold" in err
    code, err = run(fridge_model, test_file, "--iou-threshold", "1.5")
    assert code == 2 and "iou_threshold must be between 0 and 1" in err
    assert not Path(out).exists()  # nothing half-written

ROOT = Path(__file__).resolve().parent.parent
COMPONENT = ROOT / "components" / "evaluate"


def test_component_spec_is_valid_and_matches_the_cli():
    import re

    from azure.ai.ml import load_component

    from mmdet_mlflow.cli import build_parser

    component = load_component(str(COMPONENT / "spec.yaml"))
    assert component.type == "command"
    assert set(component.inputs) == {"mlflow_model", "test_data", "iou_threshold", "box_score_threshold",
                                     "map_score_threshold", "batch_size"}
    assert set(component.outputs) == {"evaluation_result"}
    assert component.inputs["iou_threshold"].default == 0.5
    assert component.inputs["box_score_threshold"].default == 0.3
    # every flag the command passes is one `mmdet-mlflow evaluate` knows
    evaluate_parser = build_parser()._subparsers._group_actions[0].choices["evaluate"]
    known = {flag for action in evaluate_parser._actions for flag in action.option_strings}
    flags = set(re.findall(r"(--[a-z-]+) ", component.command))
    assert flags and flags <= known, flags - known


def test_component_entry_reports_bad_data_like_the_cli(tmp_path, labelled_set, tiny_model_dir):
    test_file, _ = labelled_set
    # what the component's command runs (components/evaluate/spec.yaml)
    result = subprocess.run([sys.executable, "-m", "mmdet_mlflow.cli", "evaluate", "--model", str(tiny_model_dir),
                             "--test", str(test_file), "--output", str(tmp_path / "out")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "labels the model does not know" in result.stderr and "Traceback" not in result.stderr


# ---------------------------------------------------------------------------------------------
# Object detection: an object-detection model, or object-detection test data, is measured on
# boxes alone.

OD_CONFIG = "rtmdet_tiny_8xb32-300e_coco"
MASK_FILES = ("predictions.segm.json", "predictions.segm_from_polygons.json")


@pytest.fixture(scope="module")
def od_model(tmp_path_factory) -> Path:
    """A tiny RTMDet (object detection) with the synthetic set's classes. Random weights made
    worth measuring: scores that vary with the picture on both sides of 0.3 (as the instance
    segmentation model's, helpers.with_visible_outputs), and box sides of 3 strides from each
    prior (random regression weights give boxes of no size, which mmdet drops)."""
    import torch

    import mlflow_model
    from mmdet_mlflow.synth import CLASSES

    folder = tmp_path_factory.mktemp("od_model")
    checkpoint = with_visible_outputs(make_official_checkpoint(folder / "od.pth", OD_CONFIG, classes=CLASSES,
                                                               confident=False))
    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True)
    for key, value in ckpt["state_dict"].items():
        if key.startswith("bbox_head.rtm_reg.") and key.endswith(".bias"):
            value.fill_(3.0)
    torch.save(ckpt, checkpoint)
    mlflow_model.save_model(folder / "model", OD_CONFIG, str(checkpoint), classes=CLASSES)
    return folder / "model"


@pytest.fixture(scope="module")
def od_labelled_set(tmp_path_factory, od_model) -> Path:
    """Synthetic scenes annotated with boxes alone (``synth --task object-detection``), plus the
    object-detection model's own two best boxes on each picture but the last (found almost
    exactly), so box AP lands strictly between 0 and 1. COCO without any segmentation."""
    import mlflow_model
    from mmdet_mlflow.data import load_dataset, to_coco
    from mmdet_mlflow.synth import generate
    from scoring.decode import decode_image
    from scoring.schema import OBJECT_DETECTION

    folder = tmp_path_factory.mktemp("od_data")
    generate(folder, num_images=4, seed=7, progress=False, task=OBJECT_DETECTION)
    dataset = load_dataset(folder / "train.coco.json")
    predictor = mlflow_model.load_predictor(od_model / mlflow_model.MODEL_DATA_DIR)
    detections = predictor([decode_image(r.path.read_bytes()) for r in dataset.images],
                           predictor.default_params.updated({"score_threshold": 0.05}))
    coco = to_coco(dataset, relative_to=folder)
    category_id = {c["name"]: c["id"] for c in coco["categories"]}
    for image, found in list(zip(coco["images"], detections))[:-1]:
        for k in range(min(2, len(found))):
            x1, y1, x2, y2 = np.clip(found.boxes[k], 0, [image["width"], image["height"]] * 2).tolist()
            coco["annotations"].append({"id": len(coco["annotations"]) + 1, "image_id": image["id"],
                                        "category_id": category_id[found.label_name(k)],
                                        "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1),
                                        "iscrowd": 0})
    assert not any("segmentation" in a for a in coco["annotations"])
    path = folder / "test.coco.json"
    path.write_text(json.dumps(coco))
    return path


def _assert_box_metrics_only(doc: dict, out: Path) -> None:
    """metrics.json of an evaluation on boxes: the bbox section alone, equal to pycocotools' own
    on the files written, the Azure-named metrics on boxes."""
    assert doc["task"] == "object-detection"
    assert "segm" not in doc and "segm_from_polygons" not in doc
    assert not any((out / name).exists() for name in MASK_FILES)
    assert "mask_threshold" not in doc["settings"] and "polygon_tolerance" not in doc["settings"]
    evaluator = _coco_recomputed(out, "bbox", "predictions.bbox.json")
    for name, value in zip(metrics.COCO_STAT_NAMES, evaluator.stats):
        assert doc["bbox"][name] == pytest.approx(value, abs=1e-9), name
    assert doc["mean_average_precision"] == pytest.approx(doc["bbox"]["AP50"], abs=1e-9)
    for k, cat_id in enumerate(evaluator.params.catIds):
        curve = evaluator.eval["precision"][0, :, k, 0, 2]
        expected = float(np.mean(curve)) if (curve > -1).all() else -1.0
        name = evaluator.cocoGt.cats[cat_id]["name"]
        assert doc["per_label_metrics"][name]["average_precision"] == pytest.approx(expected, abs=1e-9)
    assert "box IoU" in doc["definitions"]["matching"] and "segm_from_polygons" not in doc["definitions"]
    assert doc["counts"]["predictions"] == len(json.loads((out / "predictions.bbox.json").read_text()))
    for picture in ("pr_curves.png", "samples.png"):
        assert (out / picture).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_an_object_detection_model_is_measured_on_boxes(tmp_path, od_model, od_labelled_set, capsys):
    """An object-detection model on object-detection data: COCO bbox stats and the Azure-named
    metrics on boxes, nothing about masks (had evaluate asked the model for masks, its runner
    would have refused); what MLflow gets says the same."""
    import mlflow

    from mmdet_mlflow.cli import main

    out = tmp_path / "eval"
    assert main(["evaluate", "--model", str(od_model), "--test", str(od_labelled_set), "--output", str(out),
                 "--samples", "2"]) == 0
    printed = capsys.readouterr()
    assert "bbox AP" in printed.out and "segm" not in printed.out and "note:" not in printed.err
    doc = json.loads((out / "metrics.json").read_text())
    _assert_box_metrics_only(doc, out)
    assert "notes" not in doc
    assert doc["settings"]["model_task"] == doc["settings"]["test_data_task"] == "object-detection"
    assert 0 < doc["bbox"]["AP"] < 1 and 0 < doc["bbox"]["AP50"] < 1  # a test with teeth

    run = mlflow.search_runs(search_all_experiments=True, filter_string="attributes.run_name = 'evaluate'",
                             order_by=["attributes.start_time DESC"], output_format="list")[0]
    assert run.data.metrics["bbox_AP"] == pytest.approx(doc["bbox"]["AP"])
    assert run.data.metrics["mean_average_precision"] == pytest.approx(doc["mean_average_precision"])
    assert not any(name.startswith("segm") for name in run.data.metrics)
    assert run.data.tags["evaluate.precision"] == "fp32" and run.data.tags["evaluate.task"] == "object-detection"
    assert run.data.params["evaluate.model_task"] == "object-detection"


def test_an_instance_segmentation_model_on_box_only_data_is_measured_on_boxes(
        tmp_path, fridge_model, od_labelled_set, capsys):
    from mmdet_mlflow.cli import main

    out = tmp_path / "eval"
    assert main(["evaluate", "--model", str(fridge_model), "--test", str(od_labelled_set),
                 "--output", str(out), "--samples", "1"]) == 0
    err = capsys.readouterr().err
    assert "note: an instance-segmentation model on object-detection test data" in err
    doc = json.loads((out / "metrics.json").read_text())
    _assert_box_metrics_only(doc, out)
    assert doc["notes"] == ["an instance-segmentation model on object-detection test data (boxes "
                            "alone): box metrics only; its masks are not measured"]
    assert doc["settings"]["model_task"] == "instance-segmentation"


def test_an_object_detection_model_on_masked_data_is_measured_on_its_boxes(
        tmp_path, od_model, labelled_set):
    from mmdet_mlflow.evaluate import evaluate

    test_file, _ = labelled_set
    out = tmp_path / "eval"
    doc = evaluate(od_model, test_file, out, progress=False, num_samples=1, track=False)
    _assert_box_metrics_only(doc, out)
    assert "notes" not in doc and doc["settings"]["test_data_task"] == "instance-segmentation"
    # the ground truth is the data's, masks and all: COCOeval's bbox reads its boxes
    assert all("segmentation" in a for a in json.loads((out / "ground_truth.json").read_text())["annotations"])


def test_tasks_evaluate_cannot_measure_are_a_clear_error(tmp_path, od_labelled_set, od_model, capsys):
    from mmdet_mlflow.cli import main
    from mmdet_mlflow.evaluate import evaluated_task

    assert evaluated_task("instance-segmentation", "instance-segmentation") == ("instance-segmentation", None)
    assert evaluated_task("object-detection", "instance-segmentation") == ("object-detection", None)
    with pytest.raises(metrics.EvaluationError, match="the model is for 'keypoints', which evaluate "
                                                      "cannot measure"):
        evaluated_task("keypoints", "object-detection")

    # test data mixing box-only instances with masked ones: refused, naming the annotation
    coco = json.loads(od_labelled_set.read_text())
    x, y, w, h = coco["annotations"][1]["bbox"]
    coco["annotations"][1]["segmentation"] = [[x, y, x + w, y, x + w, y + h]]
    mixed = od_labelled_set.parent / "mixed.coco.json"
    mixed.write_text(json.dumps(coco))
    code = main(["evaluate", "--model", str(od_model), "--test", str(mixed), "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "a dataset is one task" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_the_precision_check_measures_box_map_where_evaluate_measures_boxes(od_model, od_labelled_set):
    """The packaging gate's mAP is evaluate's: bbox_AP for an object-detection model (the same
    network twice here: no change)."""
    import mlflow_model
    from mmdet_mlflow.data import load_dataset
    from mmdet_mlflow.precision_check import _maps

    predictor = mlflow_model.load_predictor(od_model / mlflow_model.MODEL_DATA_DIR)
    dataset = load_dataset(od_labelled_set)
    metric, maps = _maps(od_model, dataset, [0, 1], {"fp32": predictor, "bf16": predictor})
    assert metric == "bbox_AP" and maps["fp32"] == maps["bf16"] > 0
