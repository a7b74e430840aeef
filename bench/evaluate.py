"""Benchmark of ``mmdet-mlflow evaluate`` (not a test). Prints, measured in this one run on the
same images: images per second of the whole evaluate call (model load, decode, predict, masks
to RLE and polygons, a COCOeval run per section the model's task reports: segm, bbox and
segm_from_polygons for instance segmentation, bbox alone for object detection; Azure metrics,
pictures, writing the files) divided by the model's own predict on those images (model load,
decode, predict, encode to the public response: ``scoring.frame.score_frame``, i.e. what the
pyfunc does) at the same score threshold
(goal >= 0.9: metric computation must not dominate). Also the bare forward pass (predictor only,
no masks) for reference.

The default model is the tiny config, untrained (this machine cannot download weights), made to
give 100 detections per image with real masks (tests/helpers.with_visible_outputs): the worst
case for mask encoding and COCOeval. The default data is the synthetic fridge-objects set.

    .venv/bin/python bench/evaluate.py [--num-images 32] [--repeats 3] [--model DIR --test DATA]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from _quiet import quiet_logs

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
os.environ.pop("MLFLOW_TRACKING_URI", None)  # measure the evaluation, not a tracking server


def prepare(work: Path, num_images: int) -> tuple[Path, Path]:
    import mlflow_model
    from helpers import TINY, make_official_checkpoint, with_visible_outputs
    from mmdet_mlflow.synth import CLASSES, generate

    generate(work / "data", num_images=num_images, seed=0, validation_fraction=0.5, progress=False)
    checkpoint = with_visible_outputs(make_official_checkpoint(work / "tiny.pth", classes=CLASSES,
                                                               confident=False))
    mlflow_model.save_model(work / "model", TINY, str(checkpoint), classes=CLASSES)
    return work / "model", work / "data" / "validation.coco.json"


def metrics_from_files(out: Path) -> tuple[float, list[str]]:
    """Seconds to recompute evaluate's metrics from the files it wrote (the part of evaluate
    that is not scoring), and the COCOeval sections it ran: those the model's task reports
    (an instance-segmentation model: segm, bbox, segm_from_polygons; an object-detection model:
    bbox alone), then the Azure metrics and the PR plot on the first."""
    import json

    from mmdet_mlflow.evaluate import PREDICTION_FILES, SECTIONS
    from mmdet_mlflow.metrics import azure_metrics, coco_api, coco_evaluate
    from mmdet_mlflow.plots import pr_curves
    from scoring.schema import INSTANCE_SEGMENTATION, OBJECT_DETECTION

    gt_text = (out / "ground_truth.json").read_text()
    masked = (out / PREDICTION_FILES["segm"]).is_file()
    sections = SECTIONS[INSTANCE_SEGMENTATION if masked else OBJECT_DETECTION]
    results = {t: json.loads((out / PREDICTION_FILES[t]).read_text()) for t in sections}
    start = time.perf_counter()
    evaluators = {t: coco_evaluate(coco_api(json.loads(gt_text)), r, t.split("_")[0])
                  for t, r in results.items()}
    azure = azure_metrics(evaluators[sections[0]], 0.5, 0.3)
    pr_curves(evaluators[sections[0]], azure["evaluator"], azure["per_label_metrics"], out / "pr.png")
    return time.perf_counter() - start, list(sections)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-images", type=int, default=32, help="synthetic images (half are scored)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model", help="a model directory (default: a tiny untrained one)")
    parser.add_argument("--test", help="test data (default: the synthetic validation split)")
    args = parser.parse_args()
    quiet_logs()

    import torch

    import mlflow_model
    from mmdet_mlflow.data import load_dataset
    from mmdet_mlflow.evaluate import evaluate
    from scoring.decode import decode_image
    from scoring.frame import score_frame

    work = Path(tempfile.mkdtemp(prefix="bench-evaluate-"))
    if args.model and args.test:
        model_dir, test_data = Path(args.model), Path(args.test)
    else:
        model_dir, test_data = prepare(work, args.num_images)
    files = [record.path for record in load_dataset(test_data).images]
    data_dir = model_dir / mlflow_model.MODEL_DATA_DIR
    print(f"{len(files)} images, model {model_dir}, torch threads {torch.get_num_threads()}")

    predictor = mlflow_model.load_predictor(data_dir)
    low_score = {"score_threshold": 0.05}  # what evaluate scores with (the config's score_thr)

    def whole_evaluate():
        evaluate(model_dir, test_data, work / "out", progress=False)

    def model_predict():  # load + decode + predict + encode, as the pyfunc does
        predict_with = mlflow_model.load_predictor(data_dir)
        score_frame(predict_with, [path.read_bytes() for path in files], low_score)

    def bare_forward():  # the loaded predictor's batched forward pass only, no masks
        images = [decode_image(path.read_bytes()) for path in files]
        predictor(images, predictor.default_params.updated(low_score))

    runs = {"evaluate": whole_evaluate, "predict": model_predict, "forward": bare_forward}
    bare_forward()  # warm up
    wall = {name: [] for name in runs}
    cpu = {name: [] for name in runs}  # process CPU time: steadier than wall time on a shared machine
    order = list(runs)
    for repeat in range(args.repeats):  # interleaved, order rotated: drift in load hits all alike
        for name in order[repeat % len(order):] + order[:repeat % len(order)]:
            start, start_cpu = time.perf_counter(), time.process_time()
            runs[name]()
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    timed = [metrics_from_files(work / "out") for _ in range(args.repeats)]
    metric_seconds, sections = min(seconds for seconds, _ in timed), timed[0][1]
    for label, seconds in (("wall time", wall), ("CPU time", cpu)):
        rate = {name: len(files) / min(values) for name, values in seconds.items()}
        print(f"{label}: evaluate {rate['evaluate']:.2f} img/s, model predict (+load) "
              f"{rate['predict']:.2f} img/s, bare forward (no masks) {rate['forward']:.2f} img/s; "
              f"evaluate / predict = {rate['evaluate'] / rate['predict']:.3f} (goal >= 0.9), "
              f"evaluate / bare forward = {rate['evaluate'] / rate['forward']:.3f}")
    print(f"metrics alone (COCOeval {', '.join(sections)}; Azure metrics, PR plot) from the written files: "
          f"{metric_seconds:.2f} s wall = {metric_seconds / min(wall['evaluate']):.1%} of evaluate")
    return 0


if __name__ == "__main__":
    sys.exit(main())
