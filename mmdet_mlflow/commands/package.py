"""mmdet-mlflow package: config + checkpoint -> MLflow model directory (torch or ONNX runtime)."""
from __future__ import annotations

from pathlib import Path

DEFAULT_CALIBRATION_IMAGES = 32


def add_parser(subparsers):
    p = subparsers.add_parser("package", help="write an MLflow model directory from a config and checkpoint")
    p.add_argument("--config", required=True,
                   help="an RTMDet-Ins config name mmdet ships (e.g. rtmdet-ins_x_8xb16-300e_coco) or a config file")
    p.add_argument("--checkpoint", required=True,
                   help="a checkpoint path, an http(s) URL, or 'official' (published COCO weights, sha256-checked)")
    p.add_argument("--output", required=True, help="the model directory to create (must not exist)")
    p.add_argument("--classes", help="comma-separated class names (default: from the checkpoint, else COCO)")
    p.add_argument("--runtime", choices=["torch", "onnx"], default="torch",
                   help="torch: mmdet on torch (default); onnx: ONNX Runtime, a model that needs no "
                        "torch, mmcv or mmdet and installs from wheels")
    p.add_argument("--quantize", choices=["int8"],
                   help="with --runtime onnx: also quantize to int8 (static, calibrated on "
                        "--calibration-data) and serve that; prints its speed and agreement with fp32")
    p.add_argument("--calibration-data",
                   help="images to calibrate int8 on: a folder of images, or AutoML JSONL / MLTable / COCO data")
    p.add_argument("--calibration-images", type=int, default=DEFAULT_CALIBRATION_IMAGES,
                   help=f"how many of them (default {DEFAULT_CALIBRATION_IMAGES}, spread over the set)")
    p.set_defaults(handler=run)


def run(args):
    import mlflow_model
    from scoring.errors import InputError

    if args.quantize and args.runtime != "onnx":
        raise InputError("--quantize int8 needs --runtime onnx")
    if args.quantize and not args.calibration_data:
        raise InputError("--quantize int8 needs --calibration-data (images like the ones it will see)")
    classes = [c.strip() for c in args.classes.split(",")] if args.classes else None
    calibration = (calibration_images(Path(args.calibration_data), args.calibration_images)
                   if args.quantize else None)
    model = mlflow_model.save_model(args.output, args.config, args.checkpoint, classes=classes,
                                    runtime=args.runtime, quantize=args.quantize,
                                    calibration_images=calibration)
    flavor = model.flavors[mlflow_model.FLAVOR_NAME]
    print(f"packaged {flavor['config_name']} ({len(flavor['classes'])} classes, weights sha256 "
          f"{flavor['checkpoint']['sha256'][:12]}, {args.runtime} runtime) into {args.output}")
    print(f"serve it: mmdet-mlflow serve --model {args.output}")


def calibration_images(path: Path, count: int) -> list:
    """Up to ``count`` decoded images, spread evenly over a folder or a data set."""
    from mmdet_mlflow.predict import image_files
    from scoring.decode import decode_image

    if path.is_dir() and not any(path.glob("MLTable")):
        files = image_files(path)
    else:
        from mmdet_mlflow.data import load_dataset

        files = [record.path for record in load_dataset(path).images]
    if not files:
        raise FileNotFoundError(f"no images in {path}")
    step = max(1, len(files) // max(1, count))
    return [decode_image(f.read_bytes(), row=str(f)) for f in files[::step][:count]]
