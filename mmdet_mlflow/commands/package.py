"""mmdet-mlflow package: config + checkpoint -> MLflow model directory (torch or ONNX runtime)."""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

from mmdet_mlflow.commands.predict import add_tiling_arguments, tiling_from_args
from scoring.runtimes import DEFAULT_RUNTIME, RUNTIMES

DEFAULT_CALIBRATION_IMAGES = 32
CHECK_IMAGES = 24  # images the int8 network's speed and accuracy are measured on at packaging


def add_parser(subparsers):
    p = subparsers.add_parser("package", help="write an MLflow model directory from a config and checkpoint")
    p.add_argument("--config", required=True,
                   help="an RTMDet-Ins config name mmdet ships (e.g. rtmdet-ins_x_8xb16-300e_coco) or a config file")
    p.add_argument("--checkpoint", required=True,
                   help="a checkpoint path, an http(s) URL, or 'official' (published COCO weights, sha256-checked)")
    p.add_argument("--output", required=True, help="the model directory to create (must not exist)")
    p.add_argument("--classes", help="comma-separated class names (default: from the checkpoint, else COCO)")
    p.add_argument("--runtime", choices=RUNTIMES, default=DEFAULT_RUNTIME,
                   help="torch: mmdet on torch (default); onnx: ONNX Runtime, a model that needs no "
                        "torch, mmcv or mmdet and installs from wheels")
    p.add_argument("--quantize", choices=["int8"],
                   help="with --runtime onnx: also quantize to int8 (static, calibrated on "
                        "--calibration-data) and serve that; prints its speed and agreement with fp32")
    p.add_argument("--calibration-data",
                   help="images to calibrate int8 on: a folder of images, or AutoML JSONL / MLTable / COCO data")
    p.add_argument("--calibration-images", type=int, default=DEFAULT_CALIBRATION_IMAGES,
                   help=f"how many of them (default {DEFAULT_CALIBRATION_IMAGES}, spread over the set)")
    add_tiling_arguments(p, "the model's default tiling, recorded in model.json; a request may "
                            "override it")
    p.set_defaults(handler=run)


def run(args):
    import mlflow_model
    from scoring.errors import InputError

    if args.quantize and args.runtime != "onnx":
        raise InputError("--quantize int8 needs --runtime onnx")
    if args.quantize and not args.calibration_data:
        raise InputError("--quantize int8 needs --calibration-data (images like the ones it will see)")
    classes = [c.strip() for c in args.classes.split(",")] if args.classes else None
    # read once: the calibration images and the (other) images that measure int8's cost
    source = ImageSource.read(Path(args.calibration_data)) if args.quantize else None
    calibration = calibration_images(source, args.calibration_images) if source else None
    model = mlflow_model.save_model(args.output, args.config, args.checkpoint, classes=classes,
                                    runtime=args.runtime, quantize=args.quantize,
                                    calibration_images=calibration,
                                    default_params=tiling_from_args(args))
    if args.quantize:
        report_int8_cost(Path(args.output), source)
    flavor = model.flavors[mlflow_model.FLAVOR_NAME]
    print(f"packaged {flavor['config_name']} ({len(flavor['classes'])} classes, weights sha256 "
          f"{flavor['checkpoint']['sha256'][:12]}, {args.runtime} runtime) into {args.output}")
    print(f"serve it: mmdet-mlflow serve --model {args.output}")


class ImageSource(NamedTuple):
    """Images from --calibration-data: a bare folder of images, or one of our data formats."""
    path: Path
    files: list[Path]
    dataset: object | None  # mmdet_mlflow.data.Dataset; None for a bare folder

    @classmethod
    def read(cls, path: Path) -> "ImageSource":
        from mmdet_mlflow.predict import image_files

        if path.is_dir() and not any(path.glob("MLTable")):
            dataset, files = None, image_files(path)
        else:
            from mmdet_mlflow.data import load_dataset

            dataset = load_dataset(path)
            files = [record.path for record in dataset.images]
        if not files:
            raise FileNotFoundError(f"no images in {path}")
        return cls(path, files, dataset)


def calibration_images(source: ImageSource, count: int) -> list:
    """Up to ``count`` decoded images, spread evenly over a folder or a data set."""
    from mmdet_mlflow.data import spread_indices
    from scoring.decode import decode_image

    files = source.files
    return [decode_image(files[i].read_bytes(), row=str(files[i])) for i in spread_indices(len(files), count)]


def report_int8_cost(model_dir: Path, source: ImageSource, count: int = CHECK_IMAGES) -> dict:
    """Measure what int8 costs against the model's own fp32 network, on up to ``count`` images
    of ``source`` spread between the calibration ones (the same where the set is small): time per
    image end to end (decode aside, one image per pass, the threads serving uses), how many
    fp32 detections (score >= 0.3) int8 finds again (same label, box IoU >= 0.5) and, where the
    data are annotated with the model's labels, COCO segm mAP of both. Printed, and returned."""
    import time

    from scoring.model_dir import ONNX_FILE, ONNX_INT8_FILE, ModelDir
    from mmdet_mlflow.data import spread_indices
    from scoring.decode import decode_image
    from scoring.runner import score_images
    from scoring.runtimes.onnx_rtmdet import load_onnx_segmenter

    files, dataset = source.files, source.dataset
    chosen = spread_indices(len(files), count, offset=0.5)
    images = [decode_image(files[i].read_bytes(), row=str(files[i])) for i in chosen]
    weights = ModelDir(model_dir).data.path
    variants = {name: load_onnx_segmenter(weights, onnx_file=file, batch_size=1)
                for name, file in (("fp32", ONNX_FILE), ("int8", ONNX_INT8_FILE))}
    seconds, answers = {}, {}
    for name, segmenter in variants.items():
        params = segmenter.default_params.updated({"score_threshold": 0.3})
        list(score_images(segmenter, [(0, images[0])], params, decode=lambda key, image: image))  # warm-up
        started = time.perf_counter()
        answers[name] = [scored.response["boxes"] for scored in score_images(
            segmenter, enumerate(images), params, decode=lambda key, image: image)]
        seconds[name] = (time.perf_counter() - started) / len(images)
    report = {"images": len(images), "seconds_per_image": seconds,
              "speedup": seconds["fp32"] / seconds["int8"]}
    print(f"int8 vs fp32 on {len(images)} images of {source.path}: {report['speedup']:.2f}x the speed end to end "
          f"({seconds['fp32'] * 1000:.0f} ms -> {seconds['int8'] * 1000:.0f} ms an image)", flush=True)
    found, total = _agreement(answers["fp32"], answers["int8"])
    report["fp32_detections_found_by_int8"] = [found, total]
    print(f"int8 finds {found} of fp32's {total} detections at score >= 0.3 on them (same label, "
          f"box IoU >= 0.5)", flush=True)
    maps = _segm_maps(model_dir, dataset, chosen, variants) if dataset is not None else None
    if maps:
        report["segm_AP"] = maps
        print(f"segm mAP@[.5:.95] on them: fp32 {maps['fp32']:.3f}, int8 {maps['int8']:.3f} "
              f"({maps['int8'] - maps['fp32']:+.3f})", flush=True)
    return report


def _segm_maps(model_dir: Path, dataset, chosen: list[int], variants: dict) -> dict | None:
    """COCO segm mAP of each variant on the chosen images of an annotated data set whose labels
    the model knows; None (and why) where that cannot be measured."""
    import tempfile

    from mmdet_mlflow.data import Dataset, write_coco
    from mmdet_mlflow.evaluate import evaluate
    from mmdet_mlflow.metrics import EvaluationError

    subset = Dataset(images=[dataset.images[i] for i in chosen], classes=dataset.classes,
                     category_ids=dataset.category_ids)
    if not any(record.instances for record in subset.images):
        return None
    try:
        with tempfile.TemporaryDirectory() as tmp:
            test = write_coco(subset, Path(tmp) / "check.coco.json", relative=False)
            return {name: evaluate(model_dir, test, Path(tmp) / name, segmenter=segmenter, progress=False,
                                   num_samples=0, track=False)["segm"]["AP"]
                    for name, segmenter in variants.items()}
    except EvaluationError as err:
        print(f"no segm mAP for int8 vs fp32: {err}", flush=True)
        return None


def _agreement(reference: list[list[dict]], other: list[list[dict]]) -> tuple[int, int]:
    def iou(a, b):
        w = min(a["bottomX"], b["bottomX"]) - max(a["topX"], b["topX"])
        h = min(a["bottomY"], b["bottomY"]) - max(a["topY"], b["topY"])
        inter = max(0.0, w) * max(0.0, h)
        area = lambda r: (r["bottomX"] - r["topX"]) * (r["bottomY"] - r["topY"])  # noqa: E731
        return inter / (area(a) + area(b) - inter) if inter > 0 else 0.0

    found = total = 0
    for wanted, got in zip(reference, other):
        unused = list(got)
        for box in wanted:
            total += 1
            match = next((g for g in unused if g["label"] == box["label"] and iou(g["box"], box["box"]) >= 0.5), None)
            if match is not None:
                unused.remove(match)
                found += 1
    return found, total
