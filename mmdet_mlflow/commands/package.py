"""mmdet-mlflow package: config + checkpoint -> MLflow model directory (torch, ONNX or OpenVINO
runtime)."""
from __future__ import annotations

from pathlib import Path

from mmdet_mlflow.commands.args import boolean
from mmdet_mlflow.commands.predict import add_tiling_arguments, tiling_from_args
from mmdet_mlflow.precision_check import MAX_SEGM_MAP_DROP
from scoring.model_dir import ModelDir
from scoring.runtimes import DEFAULT_RUNTIME, RUNTIMES

DEFAULT_CALIBRATION_IMAGES = 32


def add_parser(subparsers):
    p = subparsers.add_parser("package", help="write an MLflow model directory from a config and checkpoint")
    p.add_argument("--config", required=True,
                   help="a config name mmdet ships (e.g. rtmdet-ins_x_8xb16-300e_coco, yolof_r50-c5_8xb8-1x_coco) or a config file: any mmdet 3.x object detector or instance segmenter")
    p.add_argument("--checkpoint", required=True,
                   help="a checkpoint path, an http(s) URL, or 'official' (published COCO weights, sha256-checked)")
    p.add_argument("--output", required=True, help="the model directory to create (must not exist)")
    p.add_argument("--classes", help="comma-separated class names (default: from the checkpoint, else COCO)")
    p.add_argument("--runtime", choices=RUNTIMES, default=DEFAULT_RUNTIME,
                   help="torch: mmdet on torch (default); onnx: ONNX Runtime, a model that needs no "
                        "torch, mmcv or mmdet and installs from wheels; openvino: the same graph on "
                        "OpenVINO Runtime, bf16 where the serving CPU has it (MMDET_MLFLOW_PRECISION), "
                        "its accuracy cost measured here first on --calibration-data")
    p.add_argument("--quantize", choices=["int8"],
                   help="with --runtime onnx: also quantize to int8 (static, calibrated on "
                        "--calibration-data) and serve that; prints its speed and agreement with fp32")
    p.add_argument("--calibration-data",
                   help="images to calibrate int8 on, or (--runtime openvino) to measure bf16 against "
                        "fp32 on: a folder of images, or AutoML JSONL / MLTable / COCO data (with "
                        "labels: segm mAP too)")
    p.add_argument("--calibration-images", type=int, default=DEFAULT_CALIBRATION_IMAGES,
                   help=f"how many of them (default {DEFAULT_CALIBRATION_IMAGES}, spread over the set)")
    p.add_argument("--accept-accuracy-drop", nargs="?", const=True, default=False, type=boolean,
                   metavar="BOOL",
                   help=f"with --runtime openvino: write the model even when bf16 loses more than "
                        f"{MAX_SEGM_MAP_DROP} segm mAP against fp32 on --calibration-data (alone, or "
                        f"true/false as Azure passes it)")
    add_tiling_arguments(p, "the model's default tiling, recorded in model.json; a request may "
                            "override it")
    p.set_defaults(handler=run)


def run(args):
    import mlflow_model
    from mmdet_mlflow.precision_check import (ImageSource, calibration_images, package_gated,
                                              record_precision_cost, report_precision_cost)
    from scoring.errors import InputError

    if args.quantize and args.runtime != "onnx":
        raise InputError("--quantize int8 needs --runtime onnx")
    if args.quantize and not args.calibration_data:
        raise InputError("--quantize int8 needs --calibration-data (images like the ones it will see)")
    if args.accept_accuracy_drop and args.runtime != "openvino":
        raise InputError("--accept-accuracy-drop is for --runtime openvino (its bf16 accuracy gate)")
    classes = [c.strip() for c in args.classes.split(",")] if args.classes else None
    # read once: the calibration images and the (other) images that measure int8's / bf16's cost
    source = ImageSource.read(Path(args.calibration_data)) if args.calibration_data else None
    calibration = calibration_images(source, args.calibration_images) if args.quantize else None
    output = Path(args.output)
    if args.runtime == "openvino":
        package_gated(output, lambda path: mlflow_model.save_model(
            path, args.config, args.checkpoint, classes=classes, runtime="openvino",
            default_params=tiling_from_args(args)), source, args.accept_accuracy_drop)
    else:
        mlflow_model.save_model(output, args.config, args.checkpoint, classes=classes,
                                runtime=args.runtime, quantize=args.quantize,
                                calibration_images=calibration, default_params=tiling_from_args(args))
    if args.quantize:
        record_precision_cost(output, report_precision_cost(output, source, "int8"))
    info = ModelDir(output).read_info()
    print(f"packaged {info['config_name']} ({len(info['classes'])} classes, weights sha256 "
          f"{info['checkpoint']['sha256'][:12]}, {args.runtime} runtime) into {args.output}")
    print(f"serve it: mmdet-mlflow serve --model {args.output}")
