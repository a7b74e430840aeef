"""mmdet-mlflow evaluate: COCO and Azure-named metrics of a saved model on labelled test data."""
from __future__ import annotations

import sys

from mmdet_mlflow.commands.predict import add_tiling_arguments, tiling_from_args


def add_parser(subparsers):
    p = subparsers.add_parser(
        "evaluate", help="score labelled test data and compute COCO / Azure metrics",
        description="Scores every test image with the model, then writes metrics.json (COCO bbox "
                    "and segm stats for an instance-segmentation model on instance-segmentation "
                    "data, bbox alone where the model or the data is object detection; Azure's "
                    "mean_average_precision / precision / recall / "
                    "per_label_metrics, a confusion matrix, per-image counts), the predictions "
                    "and ground truth in COCO format, pr_curves.png and samples.png. Logs to "
                    "MLflow when a run is active or MLFLOW_TRACKING_URI is set.")
    p.add_argument("--model", required=True, help="an MLflow model directory saved by `package`")
    p.add_argument("--test", required=True,
                   help="test data: AutoML JSONL, an MLTable folder or COCO instances JSON")
    p.add_argument("--output", required=True, help="folder for metrics.json, predictions, pictures")
    p.add_argument("--iou-threshold", type=float, default=0.5,
                   help="mask IoU (box IoU for object detection) for a match in the Azure-named "
                        "metrics (default 0.5)")
    p.add_argument("--box-score-threshold", type=float, default=0.3,
                   help="score from which a prediction counts for precision, recall, the "
                        "confusion matrix and the sample pictures (default 0.3)")
    p.add_argument("--map-score-threshold", type=float, default=None,
                   help="lowest score scored for AP (default: the model config's score_thr, 0.05; "
                        "AP needs the low-score tail)")
    p.add_argument("--batch-size", type=int, default=None, help="images per forward pass (default: the model's)")
    p.add_argument("--samples", type=int, default=8, help="images in samples.png (default 8)")
    p.add_argument("--confine-images", action="store_true",
                   help="refuse image paths outside the folder of the annotation file naming them")
    # the tiling predict params as predict and package take them (evaluate's own --iou-threshold
    # is the metrics' match IoU, and --map-score-threshold its score threshold)
    add_tiling_arguments(p, "evaluate scores what tiled requests answer (docs/serving.md, Large pictures)")
    p.set_defaults(handler=run)


def run(args):
    from mmdet_mlflow.evaluate import evaluate

    doc = evaluate(args.model, args.test, args.output, iou_threshold=args.iou_threshold,
                   box_score_threshold=args.box_score_threshold, batch_size=args.batch_size,
                   map_score_threshold=args.map_score_threshold, num_samples=args.samples,
                   confine_images=args.confine_images, params=tiling_from_args(args))
    for note in doc.get("notes", []):
        print(f"note: {note}", file=sys.stderr)
    bbox = doc["bbox"]
    if "segm" in doc:
        segm = doc["segm"]
        coco = (f"segm AP {segm['AP']:.4f} (AP50 {segm['AP50']:.4f}), bbox AP {bbox['AP']:.4f}, segm AP "
                f"from polygons {doc['segm_from_polygons']['AP']:.4f}")
    else:
        coco = f"bbox AP {bbox['AP']:.4f} (AP50 {bbox['AP50']:.4f}, AP75 {bbox['AP75']:.4f}), boxes alone"
    print(f"{doc['counts']['images']} images: {coco}; mean_average_precision "
          f"{doc['mean_average_precision']:.4f}, precision {doc['precision']:.4f}, recall "
          f"{doc['recall']:.4f} at IoU {doc['settings']['iou_threshold']:g}, score "
          f"{doc['settings']['box_score_threshold']:g} -> {args.output}")
