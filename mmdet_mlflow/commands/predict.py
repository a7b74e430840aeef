"""mmdet-mlflow predict: score image files with a saved model."""
from __future__ import annotations

from pathlib import Path

from mmdet_mlflow.commands.args import boolean
from scoring.schema import MASK_FORMATS, PredictParams


def add_params_arguments(parser):
    """--score-threshold etc., one per predict param (defaults: the model's own)."""
    for name, value in PredictParams().as_dict().items():
        flag = f"--{name.replace('_', '-')}"
        if name == "classes":  # checked by PredictParams and against the model's classes
            parser.add_argument(flag, dest=name, default=None, metavar="NAME[,NAME...]",
                                help="predict param classes: keep only these classes, comma-separated "
                                     "(default: all the model's classes)")
            continue
        if name == "mask_format":
            parser.add_argument(flag, dest=name, default=None, choices=MASK_FORMATS,
                                help=f"predict param mask_format (default: {value})")
            continue
        kind = boolean if isinstance(value, bool) else type(value)
        parser.add_argument(flag, dest=name, type=kind, default=None,
                            help=f"predict param {name} (default: the model's, usually {value})")


TILING_PARAMS = ("tile_grid_size", "tile_overlap_ratio", "tile_predictions_nms_thresh")
TILING_HELP = {
    "tile_grid_size": "Azure AutoML's tiling for small objects in large pictures: \"MxN\", columns "
                      "x rows (e.g. 3x2): the tiles and the whole picture go through the network",
    "tile_overlap_ratio": "share of a tile its neighbours overlap, [0, 1) (AutoML's default 0.25)",
    "tile_predictions_nms_thresh": "IoU above which detections of tiles and of the whole picture "
                                   "are one object (AutoML's default 0.25)",
}


def add_tiling_arguments(parser, purpose: str) -> None:
    """--tile-grid-size and the other tiling params, for commands that set a model's defaults."""
    defaults = PredictParams()
    for name in TILING_PARAMS:
        value = getattr(defaults, name)
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, type=type(value), default=None,
                            help=f"{TILING_HELP[name]}: {purpose}")


def tiling_from_args(args) -> dict:
    return {k: getattr(args, k) for k in TILING_PARAMS if getattr(args, k, None) is not None}


def params_from_args(args) -> dict:
    return {k: getattr(args, k) for k in PredictParams().as_dict() if getattr(args, k) is not None}


def add_parser(subparsers):
    p = subparsers.add_parser("predict", help="predict on an image or a folder of images")
    p.add_argument("--model", required=True, help="an MLflow model directory saved by `package`")
    p.add_argument("--input", required=True,
                   help="an image file or a folder of images (recursively, but hidden names; "
                        "what cannot be read is an error line)")
    p.add_argument("--output", required=True, help="JSON lines file: one {file, boxes} per image")
    p.add_argument("--visualize", metavar="OUT_DIR", help="also write annotated PNGs here")
    add_params_arguments(p)
    p.set_defaults(handler=run)


def run(args):
    from mmdet_mlflow.predict import image_files, predict_files

    source = Path(args.input)
    listing = image_files(source)
    counts = predict_files(Path(args.model), listing.entries, Path(args.output),
                           params_from_args(args), Path(args.visualize) if args.visualize else None,
                           root=source if source.is_dir() else source.parent)
    hidden = f" ({listing.hidden} hidden, not read)" if listing.hidden else ""
    print(f"{counts['images']} images, {counts['detections']} detections, {counts['errors']} "
          f"unreadable{hidden} -> {args.output}"
          + (f"; pictures in {args.visualize}" if args.visualize else ""))
    return 1 if counts["errors"] else 0
