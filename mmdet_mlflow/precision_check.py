"""What a cheaper precision costs against a model's own fp32 network, measured at packaging:
int8 (the ONNX model's quantized network) and bf16 (the OpenVINO model's graph compiled at bf16).
One report for both (``report_precision_cost``: speed end to end, fp32 detections found again,
mAP where the data are labelled: segm mAP of an instance-segmentation model on masked data, else
bbox mAP, as evaluate measures them), one sampler (``mmdet_mlflow.data.spread_indices``), one box
IoU (``scoring.boxes``), and the accuracy gate ``package --runtime openvino`` applies
(``package_gated``). ``mmdet-mlflow package`` calls it; ``save_model`` itself only saves.
"""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

from scoring.errors import MmdetMlflowError

CHECK_IMAGES = 24  # images a cheaper precision's speed and accuracy are measured on at packaging
# The most mAP (segm, or bbox where boxes alone are measured) bf16 may lose against fp32 on the
# calibration data before `package --runtime openvino` refuses the model; --accept-accuracy-drop
# overrides.
MAX_SEGM_MAP_DROP = 0.01


class AccuracyDropError(MmdetMlflowError):
    """A cheaper precision loses more accuracy than the gate allows (nothing was written)."""


def package_gated(output: Path, save, source, accept_drop: bool,
                  max_drop: float = MAX_SEGM_MAP_DROP):
    """``save(path)`` an OpenVINO model into a folder beside ``output``, measure bf16 against fp32
    on it (``report_precision_cost``), record the numbers in its model.json and move it to
    ``output``; refuse with AccuracyDropError, leaving nothing behind, when bf16 loses more than
    ``max_drop`` mAP (the report's ``map_metric``: segm_AP or bbox_AP) unless ``accept_drop``."""
    import os
    import shutil

    if output.exists():
        raise FileExistsError(f"{output} exists: package writes a new model folder")
    staging = output.parent / f".{output.name}.packaging-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        model = save(staging)
        report = report_precision_cost(staging, source, "bf16")
        metric = report.get("map_metric", "segm_AP")
        drop = report.get(f"{metric}_change")
        report[f"max_{metric}_drop"] = max_drop
        report["accepted"] = drop is None or drop >= -max_drop or accept_drop
        if not report["accepted"]:
            raise AccuracyDropError(
                f"bf16 loses {-drop:.3f} {metric.split('_')[0]} mAP against fp32 on {report['images']} images of "
                f"{source.path} (more than {max_drop}): nothing written. Package with "
                f"--runtime onnx, or pass --accept-accuracy-drop (and serve with "
                f"MMDET_MLFLOW_PRECISION=fp32 where accuracy matters)")
        record_precision_cost(staging, report)
        os.replace(staging, output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return model


class ImageSource(NamedTuple):
    """Images from --calibration-data: a bare folder of images, or one of our data formats."""
    path: Path
    files: list[Path]
    dataset: object | None  # mmdet_mlflow.data.Dataset; None for a bare folder

    @classmethod
    def read(cls, path: Path) -> "ImageSource":
        from mmdet_mlflow.predict import image_files

        if path.is_dir() and not any(path.glob("MLTable")):
            dataset, files = None, [e.path for e in image_files(path).entries if not e.problem]
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


def precision_variants(model_dir: Path, candidate: str) -> dict:
    """{"fp32": predictor, candidate: predictor} of a saved model, one image per pass: "int8" is
    the ONNX model's int8 network against its fp32 one (ONNX Runtime), "bf16" the OpenVINO
    model's graph compiled at bf16 against the same graph at fp32."""
    from scoring.model_dir import ONNX_FILE, ONNX_INT8_FILE, ModelDir

    weights = ModelDir(model_dir).data.path
    if candidate == "int8":
        from scoring.runtimes.onnx_rtmdet import load_onnx_predictor

        return {name: load_onnx_predictor(weights, onnx_file=file, batch_size=1)
                for name, file in (("fp32", ONNX_FILE), ("int8", ONNX_INT8_FILE))}
    if candidate == "bf16":
        from scoring.runtimes.openvino_rtmdet import load_openvino_predictor

        return {name: load_openvino_predictor(weights, precision=name, batch_size=1, quiet=True)
                for name in ("fp32", "bf16")}
    raise ValueError(f"no precision {candidate!r} to measure: int8 or bf16")


def report_precision_cost(model_dir: Path, source: ImageSource | None, candidate: str,
                          count: int = CHECK_IMAGES) -> dict:
    """Measure what a cheaper precision (``candidate``: "int8" on ONNX Runtime, "bf16" on
    OpenVINO, ``precision_variants``) costs against the model's own fp32 network, on up to
    ``count`` images of ``source`` spread between the calibration ones (the same where the set
    is small; without a source, ``sample_images``: speed and agreement only): time per image end
    to end (decode aside, one image per pass, the threads serving uses), how many fp32
    detections (score >= 0.3) the candidate finds again (same label, box IoU >= 0.5) and, where
    the data are annotated with the model's labels, COCO mAP of both (``map_metric``: segm_AP
    where evaluate measures masks, bbox_AP where boxes alone). Printed, and returned."""
    import time

    from mmdet_mlflow.data import spread_indices
    from scoring.decode import decode_image
    from scoring.runner import score_images

    if source is not None:
        files, dataset = source.files, source.dataset
        chosen = spread_indices(len(files), count, offset=0.5)
        images = [decode_image(files[i].read_bytes(), row=str(files[i])) for i in chosen]
        where = f"{len(images)} images of {source.path}"
    else:
        from mlflow_model.onnx_export import sample_images

        dataset, chosen, images = None, [], sample_images(min(count, 8))
        where = f"{len(images)} synthetic pictures (no --calibration-data: no mAP)"
    variants = precision_variants(model_dir, candidate)
    seconds, answers = {}, {}
    for name, predictor in variants.items():
        params = predictor.default_params.updated({"score_threshold": 0.3})
        list(score_images(predictor, [(0, images[0])], params, decode=lambda key, image: image))  # warm-up
        started = time.perf_counter()
        answers[name] = [scored.response["boxes"] for scored in score_images(
            predictor, enumerate(images), params, decode=lambda key, image: image)]
        seconds[name] = (time.perf_counter() - started) / len(images)
    report = {"precision": candidate, "images": len(images), "seconds_per_image": seconds,
              "speedup": seconds["fp32"] / seconds[candidate]}
    ran_as = getattr(variants[candidate], "precision", candidate)
    if ran_as != candidate:  # e.g. bf16 asked of a CPU without native bf16: OpenVINO ran f32
        report["ran_as"] = ran_as
        print(f"this CPU has no native {candidate}: it ran as {ran_as}, so what {candidate} costs "
              f"was not measured here", flush=True)
    print(f"{candidate} vs fp32 on {where}: {report['speedup']:.2f}x the speed end to end "
          f"({seconds['fp32'] * 1000:.0f} ms -> {seconds[candidate] * 1000:.0f} ms an image)", flush=True)
    found, total = _agreement(answers["fp32"], answers[candidate])
    report[f"fp32_detections_found_by_{candidate}"] = [found, total]
    print(f"{candidate} finds {found} of fp32's {total} detections at score >= 0.3 on them (same "
          f"label, box IoU >= 0.5)", flush=True)
    measured = _maps(model_dir, dataset, chosen, variants) if dataset is not None else None
    if measured:
        metric, maps = measured
        report.update({"map_metric": metric, metric: maps, f"{metric}_change": maps[candidate] - maps["fp32"]})
        print(f"{metric.split('_')[0]} mAP@[.5:.95] on them: fp32 {maps['fp32']:.3f}, {candidate} "
              f"{maps[candidate]:.3f} ({report[f'{metric}_change']:+.3f})", flush=True)
    return report


def report_int8_cost(model_dir: Path, source: ImageSource, count: int = CHECK_IMAGES) -> dict:
    """``report_precision_cost`` of the ONNX model's int8 network (the name callers know)."""
    return report_precision_cost(model_dir, source, "int8", count)


def record_precision_cost(model_dir: Path, report: dict) -> None:
    """Keep a ``report_precision_cost`` in the model's model.json, under "precision_checks"."""
    from scoring.model_dir import ModelDir

    weights = ModelDir(model_dir).data
    info = weights.read_info()
    info.setdefault("precision_checks", {})[report["precision"]] = report
    weights.write_info(info)


def _maps(model_dir: Path, dataset, chosen: list[int], variants: dict) -> tuple[str, dict] | None:
    """(metric, {variant: value}): COCO mAP@[.5:.95] of each variant on the chosen images of an
    annotated data set whose labels the model knows, as evaluate measures it (``segm_AP`` where
    masks are measured, ``bbox_AP`` where boxes alone are); None (and why) where that cannot be
    measured."""
    import tempfile

    from mmdet_mlflow.data import Dataset, write_coco
    from mmdet_mlflow.evaluate import evaluate
    from mmdet_mlflow.metrics import EvaluationError

    subset = Dataset(images=[dataset.images[i] for i in chosen], classes=dataset.classes,
                     category_ids=dataset.category_ids, task=dataset.task)
    if not any(record.instances for record in subset.images):
        return None
    try:
        with tempfile.TemporaryDirectory() as tmp:
            test = write_coco(subset, Path(tmp) / "check.coco.json", relative=False)
            docs = {name: evaluate(model_dir, test, Path(tmp) / name, predictor=predictor, progress=False,
                                   num_samples=0, track=False)
                    for name, predictor in variants.items()}
    except EvaluationError as err:
        print(f"no mAP for {' vs '.join(reversed(list(variants)))}: {err}", flush=True)
        return None
    section = "segm" if all("segm" in doc for doc in docs.values()) else "bbox"
    return f"{section}_AP", {name: doc[section]["AP"] for name, doc in docs.items()}


def _agreement(reference: list[list[dict]], other: list[list[dict]]) -> tuple[int, int]:
    """(found, total): the reference's detections the other answer has too (same label, box IoU
    >= 0.5, each matched once), over the answers of the same images."""
    from scoring.boxes import box_iou

    def corners(box: dict) -> tuple:
        return box["topX"], box["topY"], box["bottomX"], box["bottomY"]

    found = total = 0
    for wanted, got in zip(reference, other):
        unused = list(got)
        for box in wanted:
            total += 1
            match = next((g for g in unused if g["label"] == box["label"]
                          and box_iou(corners(g["box"]), corners(box["box"])) >= 0.5), None)
            if match is not None:
                unused.remove(match)
                found += 1
    return found, total
