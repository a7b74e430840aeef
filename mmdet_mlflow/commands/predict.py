"""mmdet-mlflow predict: score image files with a saved model."""
from __future__ import annotations

from pathlib import Path

from mmdet_mlflow.commands.args import boolean
from scoring.schema import PredictParams


def add_params_arguments(parser):
    """--score-threshold etc., one per predict param (defaults: the model's own)."""
    for name, value in PredictParams().as_dict().items():
        kind = boolean if isinstance(value, bool) else type(value)
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, type=kind, default=None,
                            help=f"predict param {name} (default: the model's, usually {value})")


def params_from_args(args) -> dict:
    return {k: getattr(args, k) for k in PredictParams().as_dict() if getattr(args, k) is not None}


def add_parser(subparsers):
    p = subparsers.add_parser("predict", help="predict on an image or a folder of images")
    p.add_argument("--model", required=True, help="an MLflow model directory saved by `package`")
    p.add_argument("--input", required=True, help="an image file or a folder of images")
    p.add_argument("--output", required=True, help="JSON lines file: one {file, boxes} per image")
    p.add_argument("--visualize", metavar="OUT_DIR", help="also write annotated PNGs here")
    add_params_arguments(p)
    p.set_defaults(handler=run)


def run(args):
    from mmdet_mlflow.predict import image_files, predict_files

    source = Path(args.input)
    files = image_files(source)
    counts = predict_files(Path(args.model), files, Path(args.output), params_from_args(args),
                           Path(args.visualize) if args.visualize else None,
                           root=source if source.is_dir() else source.parent)
    print(f"{counts['images']} images, {counts['detections']} detections, {counts['errors']} "
          f"unreadable -> {args.output}" + (f"; pictures in {args.visualize}" if args.visualize else ""))
    return 1 if counts["errors"] else 0
