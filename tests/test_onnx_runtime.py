"""The ONNX Runtime model answers as the torch (mmdet) model does, on the same weights, and needs
none of torch, mmcv, mmdet or mmengine. Real tiny models on CPU, exported once per module."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from helpers import TINY_TEST_SCALE, claim_classes, copied_model_folder, found_again, scene_image, truncate_graph

ROOT = Path(__file__).resolve().parent.parent

# (width, height, seed): landscape, portrait, small, wide, square, odd sizes
IMAGE_SIZES = [(320, 240, 0), (200, 300, 1), (640, 480, 2), (1000, 400, 3), (97, 131, 4),
               (640, 640, 5)]


@pytest.fixture(scope="module")
def onnx_weights_dir(tmp_path_factory, tiny_model_dir) -> Path:
    """A copy of the tiny model's weights folder, exported to ONNX (never the shared fixture)."""
    from mlflow_model.onnx_export import export_to_weights_dir

    folder = tmp_path_factory.mktemp("onnx") / "model"
    shutil.copytree(tiny_model_dir / "model", folder)
    export_to_weights_dir(folder)
    return folder


@pytest.fixture(scope="module")
def predictors(onnx_weights_dir):
    import mlflow_model
    from scoring.runtimes.onnx_rtmdet import load_onnx_predictor

    torch_predictor = mlflow_model.load_predictor(onnx_weights_dir, device="cpu", batch_size=1)
    return torch_predictor, load_onnx_predictor(onnx_weights_dir, num_threads=2)


@pytest.fixture(scope="module")
def images() -> list[np.ndarray]:
    return [scene_image(w, h, seed) for w, h, seed in IMAGE_SIZES]


def _copy(folder: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(folder, tmp_path / "model"))


# ----------------------------------------------------------------------------- equality


def test_preprocessing_gives_the_network_mmdets_tensor(predictors, images):
    import torch

    torch_predictor, onnx_predictor = predictors
    for image in images:
        batch = torch_predictor.preprocess([image])
        data = torch_predictor.detector.data_preprocessor(batch, False)
        want = data["inputs"].numpy()
        ours = onnx_predictor.preprocess([image])
        assert ours["inputs"].shape == want.shape
        assert float(np.abs(ours["inputs"] - want).max()) == 0.0, image.shape
        meta, their_meta = ours["metas"][0], data["data_samples"][0].metainfo
        assert meta.scale_factor == pytest.approx(their_meta["scale_factor"], abs=1e-12)
        assert tuple(meta.img_hw) == tuple(their_meta["img_shape"])
        assert tuple(meta.ori_hw) == tuple(their_meta["ori_shape"])
    assert isinstance(want, np.ndarray) and not isinstance(want, torch.Tensor)


def _detections(predictor, image, params):
    [dets] = predictor([image], params)
    masks = list(dets.iter_masks(params.mask_threshold))
    return dets, masks


def _mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def _compare(torch_predictor, onnx_predictor, images, params) -> tuple[int, int, list[float]]:
    """(matched, total, mask IoUs of the matched): a detection matches one of the other runtime's
    with the same label, box within 0.5 px and score within 1e-4."""
    matched = total = 0
    ious = []
    for image in images:
        want, want_masks = _detections(torch_predictor, image, params)
        got, got_masks = _detections(onnx_predictor, image, params)
        assert got.image_size == want.image_size
        total += max(len(want), len(got))
        used = set()
        for i in range(len(want)):
            for j in range(len(got)):
                if j in used or got.labels[j] != want.labels[i]:
                    continue
                if (np.abs(got.boxes[j] - want.boxes[i]).max() <= 0.5
                        and abs(float(got.scores[j]) - float(want.scores[i])) <= 1e-4):
                    used.add(j)
                    matched += 1
                    ious.append(_mask_iou(got_masks[j], want_masks[i]))
                    break
    return matched, total, ious


@pytest.mark.parametrize("param_values", [{}, {"score_threshold": 0.05, "iou_threshold": 0.5},
                                          {"max_detections": 7, "mask_threshold": 0.3}])
def test_detections_and_masks_equal_the_torch_runtime(predictors, images, param_values):
    torch_predictor, onnx_predictor = predictors
    params = torch_predictor.default_params.updated(param_values)
    matched, total, ious = _compare(torch_predictor, onnx_predictor, images, params)
    assert total >= 3 * len(images), f"only {total} detections: the test model should see things"
    assert matched >= 0.99 * total, f"{matched} of {total} detections identical"
    assert min(ious) >= 0.99, f"worst matched mask IoU {min(ious):.4f}"


def test_class_agnostic_nms_equals_the_torch_runtime(predictors, images):
    torch_predictor, onnx_predictor = predictors
    params = _with_class_agnostic_nms(torch_predictor.default_params)
    matched, total, ious = _compare(torch_predictor, onnx_predictor, images, params)
    assert matched >= 0.99 * total and min(ious) >= 0.99


def test_class_agnostic_nms_keeps_one_box_per_place(predictors, images):
    """The same boxes as mmcv's batched_nms with class_agnostic=True (mmdet's nms cfg option)."""
    import torch
    from mmcv.ops import batched_nms as mmcv_batched_nms

    from scoring.runtimes.rtmdet_numpy import batched_nms

    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 300, (400, 2)).astype(np.float32)
    boxes = np.concatenate([xy, xy + rng.uniform(5, 80, (400, 2)).astype(np.float32)], axis=1)
    scores = rng.uniform(0, 1, 400).astype(np.float32)
    labels = rng.integers(0, 4, 400)
    for agnostic in (False, True):
        ours = batched_nms(boxes, scores, labels, 0.5, class_agnostic=agnostic)
        _, theirs = mmcv_batched_nms(torch.from_numpy(boxes), torch.from_numpy(scores),
                                     torch.from_numpy(labels),
                                     {"type": "nms", "iou_threshold": 0.5}, class_agnostic=agnostic)
        assert ours.tolist() == theirs.tolist()
        # stopping at max_per_img boxes gives the first of the full answer
        assert batched_nms(boxes, scores, labels, 0.5, agnostic, max_num=7).tolist() == \
            theirs[:7].tolist()

    _, onnx_predictor = predictors
    base = onnx_predictor.default_params.updated({"score_threshold": 0.05})
    agnostic = _with_class_agnostic_nms(base)
    aware = onnx_predictor([images[2]], base)[0]
    merged = onnx_predictor([images[2]], agnostic)[0]
    assert 0 < len(merged) <= len(aware)
    from scoring.runtimes.rtmdet_numpy import nms

    # no two surviving boxes overlap beyond the threshold, whatever their classes
    assert len(nms(merged.boxes, merged.scores, base.iou_threshold)) == len(merged)


def _with_class_agnostic_nms(params):
    if hasattr(params, "class_agnostic_nms"):
        import dataclasses

        return dataclasses.replace(params, class_agnostic_nms=True)
    return _AgnosticParams(params)


class _AgnosticParams:
    """PredictParams with class_agnostic_nms=True until the field lands in scoring.schema."""

    def __init__(self, params):
        self._params = params
        self.class_agnostic_nms = True

    def __getattr__(self, name):
        return getattr(self._params, name)


def test_runtime_is_named_and_batches_as_single_images(predictors, images):
    _, onnx_predictor = predictors
    assert onnx_predictor.runtime == "onnx" and onnx_predictor.batch_size == 1
    params = onnx_predictor.default_params
    one_by_one = [onnx_predictor([img], params)[0] for img in images[:3]]
    onnx_predictor.batch_size = 3
    try:
        batched = onnx_predictor(images[:3], params)
    finally:
        onnx_predictor.batch_size = 1
    for a, b in zip(one_by_one, batched):
        assert len(a) == len(b)
        assert np.abs(a.boxes - b.boxes).max(initial=0) <= 1e-2
        assert np.abs(a.scores - b.scores).max(initial=0) <= 1e-4


# ----------------------------------------------------------------------------- the export


def test_export_records_its_settings_and_the_measured_difference(onnx_weights_dir):
    info = json.loads((onnx_weights_dir / "model.json").read_text())["onnx"]
    assert info["preprocess"]["input_hw"] == list(TINY_TEST_SCALE[::-1])
    assert info["preprocess"]["pad_value"] == [114.0, 114.0, 114.0]
    assert info["preprocess"]["bgr_to_rgb"] is False
    assert info["head"]["strides"] == [8, 16, 32] and info["head"]["num_classes"] == 80
    record = info["files"]["model.onnx"]
    assert record["max_abs_diff_vs_torch"] < 1e-3
    assert len(record["sha256"]) == 64
    # the weights lie beside the graph (ONNX external data), recorded as well
    data = onnx_weights_dir / "model.onnx.data"
    assert record["data"] == {"file": "model.onnx.data", "sha256": record["data"]["sha256"],
                              "bytes": data.stat().st_size}
    assert len(record["data"]["sha256"]) == 64
    assert data.stat().st_size > 10 * (onnx_weights_dir / "model.onnx").stat().st_size


def test_export_refuses_outputs_that_differ_from_torch(onnx_weights_dir, tmp_path, capsys):
    """An ONNX file from other weights must not pass the torch comparison."""
    import torch

    from mlflow_model.onnx_export import (OnnxExportError, compare_with_torch, network_inputs,
                                          sample_images)

    from scoring.model_dir import WeightsDir
    from scoring.runtimes.torch_mmdet import load_detector

    detector, _ = load_detector(WeightsDir(onnx_weights_dir), device="cpu")
    spec = json.loads((onnx_weights_dir / "model.json").read_text())["onnx"]
    with torch.no_grad():
        # the file now answers for other weights: box distances +0.5 x stride 8
        detector.bbox_head.rtm_reg[0].bias.add_(0.5)
    with pytest.raises(OnnxExportError, match=r"bbox_pred_s8: max \|ORT - torch\| = 4 > "):
        compare_with_torch(detector, onnx_weights_dir / "model.onnx", spec,
                           network_inputs(spec, sample_images(2)))
    assert "max |ORT - torch|" in capsys.readouterr().out


def test_int8_model_is_recorded_loads_and_finds_what_fp32_finds(onnx_weights_dir, tmp_path,
                                                                 images):
    """Static QDQ int8: a smaller file, recorded in model.json, served by the same runtime.
    Random weights say nothing about accuracy (the bench prints it); this checks it is the same
    model: most fp32 detections are found again within 2 px and 0.05 score."""
    from mlflow_model.onnx_export import add_int8_to_weights_dir, sample_images
    from scoring.runtimes.onnx_rtmdet import load_onnx_predictor

    folder = _copy(onnx_weights_dir, tmp_path)
    record = add_int8_to_weights_dir(folder, sample_images(4))
    info = json.loads((folder / "model.json").read_text())["onnx"]["files"]
    assert info["model.int8.onnx"] == record and record["precision"] == "int8"
    assert set(record["data"]) == {"file", "sha256", "bytes"}
    size = {name: sum((folder / f).stat().st_size for f in (name, name + ".data"))
            for name in ("model.onnx", "model.int8.onnx")}
    assert size["model.int8.onnx"] < 0.5 * size["model.onnx"]

    fp32 = load_onnx_predictor(folder, num_threads=2)
    int8 = load_onnx_predictor(folder, num_threads=2, onnx_file="model.int8.onnx")
    params = fp32.default_params
    found, close = found_again(fp32, int8, images[:3], params)
    assert found > 0 and close >= 0.5 * found, f"int8 found {close} of fp32's {found} detections"


# ----------------------------------------------------------------------------- loading


def test_a_model_saved_with_its_weights_in_the_graph_file_still_loads(onnx_weights_dir, tmp_path,
                                                                    images):
    """Models saved before the weights moved to model.onnx.data: one file, recorded without "data"."""
    import onnx

    from mlflow_model.onnx_export import file_record
    from scoring.runtimes.onnx_rtmdet import load_onnx_predictor

    folder = _copy(onnx_weights_dir, tmp_path)
    onnx.save_model(onnx.load(str(folder / "model.onnx")), str(folder / "model.onnx"))
    (folder / "model.onnx.data").unlink()
    info = json.loads((folder / "model.json").read_text())
    record = info["onnx"]["files"]["model.onnx"]
    del record["data"]
    record.update(file_record(folder / "model.onnx"))  # the one file's sha256 and size
    (folder / "model.json").write_text(json.dumps(info))

    embedded, external = load_onnx_predictor(folder), load_onnx_predictor(onnx_weights_dir)
    params = external.default_params
    [a], [b] = embedded([images[0]], params), external([images[0]], params)
    assert len(b) > 0 and np.array_equal(a.boxes, b.boxes) and np.array_equal(a.scores, b.scores)


def test_missing_onnx_file_is_refused(onnx_weights_dir, tmp_path):
    from scoring.runtimes.onnx_rtmdet import OnnxModelError, load_onnx_predictor

    folder = _copy(onnx_weights_dir, tmp_path)
    (folder / "model.onnx").unlink()
    with pytest.raises(OnnxModelError, match="model.onnx is missing"):
        load_onnx_predictor(folder)


@pytest.mark.parametrize("changed", ["model.onnx.data", "model.onnx"])
def test_a_different_onnx_file_is_refused_by_its_checksum(onnx_weights_dir, tmp_path, changed):
    from scoring.runtimes.onnx_rtmdet import OnnxModelError, load_onnx_predictor

    folder = _copy(onnx_weights_dir, tmp_path)
    with open(folder / changed, "r+b") as f:  # one flipped byte: deep in the weights, or the graph
        f.seek(f.seek(0, 2) // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(OnnxModelError, match=f"{changed} is not the file exported with this model"):
        load_onnx_predictor(folder)


def test_a_missing_weights_file_is_refused(onnx_weights_dir, tmp_path):
    from scoring.runtimes.onnx_rtmdet import OnnxModelError, load_onnx_predictor

    folder = _copy(onnx_weights_dir, tmp_path)
    (folder / "model.onnx.data").unlink()
    with pytest.raises(OnnxModelError, match="weights file .*model.onnx.data is missing"):
        load_onnx_predictor(folder)
    _forget_checksum(folder)  # without model.json's record ORT's own refusal comes through
    with pytest.raises(OnnxModelError, match="is not a loadable ONNX model"):
        load_onnx_predictor(folder)


def test_a_damaged_file_is_reported_by_its_checksum_though_the_session_fails_too(onnx_weights_dir, tmp_path):
    # The checksum is computed while the session is built; the clearer of the two reasons wins.
    from scoring.runtimes.onnx_rtmdet import OnnxModelError, load_onnx_predictor

    folder = _copy(onnx_weights_dir, tmp_path)
    data = (folder / "model.onnx").read_bytes()
    (folder / "model.onnx").write_bytes(data[: len(data) // 3])  # truncated, checksum kept
    with pytest.raises(OnnxModelError, match="not the file exported with this model"):
        load_onnx_predictor(folder)


def _forget_checksum(folder: Path) -> None:
    info = json.loads((folder / "model.json").read_text())
    info["onnx"]["files"] = {}
    (folder / "model.json").write_text(json.dumps(info))


WHEEL_RUNTIMES = {  # the runtimes serving the exported graph: loader, what it says of a cut graph
    "onnx": ("scoring.runtimes.onnx_rtmdet:load_onnx_predictor", "is not a loadable ONNX model"),
    "openvino": ("scoring.runtimes.openvino_rtmdet:load_openvino_predictor",
                 r"model.onnx is not an ONNX model OpenVINO [\d.]+.* can read"),
}


def _loader(runtime: str):
    import importlib

    module, function = WHEEL_RUNTIMES[runtime][0].split(":")
    return getattr(importlib.import_module(module), function)


@pytest.mark.parametrize("runtime", WHEEL_RUNTIMES)
def test_a_corrupt_onnx_file_is_refused(onnx_weights_dir, tmp_path, runtime):
    from scoring.runtimes.onnx_rtmdet import OnnxModelError

    folder = copied_model_folder(onnx_weights_dir, tmp_path, forget_checksums=True)
    truncate_graph(folder)
    with pytest.raises(OnnxModelError, match=WHEEL_RUNTIMES[runtime][1]):
        _loader(runtime)(folder)


@pytest.mark.parametrize("runtime", WHEEL_RUNTIMES)
def test_a_graph_that_does_not_fit_model_json_is_refused(onnx_weights_dir, tmp_path, runtime):
    from scoring.runtimes.onnx_rtmdet import OnnxModelError

    folder = copied_model_folder(onnx_weights_dir, tmp_path, forget_checksums=True)
    claim_classes(folder, 3)
    width, height = TINY_TEST_SCALE
    with pytest.raises(OnnxModelError, match=r"output 'cls_score_s8' has shape .*80.*expected "
                                             rf"\['batch', 3, {height // 8}, {width // 8}\]"):
        _loader(runtime)(folder)


def test_an_input_size_that_does_not_fit_the_config_is_refused(onnx_weights_dir, tmp_path):
    from scoring.runtimes.onnx_rtmdet import OnnxModelError, load_onnx_predictor

    folder = copied_model_folder(onnx_weights_dir, tmp_path, forget_checksums=True)
    info = json.loads((folder / "model.json").read_text())
    info["onnx"]["preprocess"]["input_hw"] = [2 * size for size in TINY_TEST_SCALE[::-1]]
    (folder / "model.json").write_text(json.dumps(info))
    with pytest.raises(OnnxModelError, match="input shape"):
        load_onnx_predictor(folder)


def test_a_model_without_an_onnx_export_is_refused(tiny_model_dir):
    from scoring.runtimes.onnx_rtmdet import OnnxModelError, load_onnx_predictor

    with pytest.raises(OnnxModelError, match="was not exported to ONNX"):
        load_onnx_predictor(tiny_model_dir / "model")


# ----------------------------------------------------------------------------- without torch


NO_TRAINING_STACK = """
import json, sys
for name in ("torch", "torchvision", "mmcv", "mmdet", "mmengine"):
    sys.modules[name] = None  # any import of them now raises ImportError
sys.path.insert(0, sys.argv[1])
import cv2
from scoring.runtimes.onnx_rtmdet import load_onnx_predictor
predictor = load_onnx_predictor(sys.argv[2])
image = cv2.imread(sys.argv[3])
[dets] = predictor([image])
masks = list(dets.iter_masks(0.5))
print(json.dumps({"n": len(dets), "labels": [dets.label_name(i) for i in range(len(dets))],
                  "boxes": dets.boxes.tolist(), "mask_pixels": [int(m.sum()) for m in masks],
                  "mask_shapes": [list(m.shape) for m in masks],
                  "loaded": sorted(m for m in ("torch", "mmcv", "mmdet", "mmengine")
                                   if sys.modules.get(m) is not None)}))
"""


def test_predicts_in_a_process_where_torch_cannot_be_imported(onnx_weights_dir, predictors,
                                                               image_files):
    result = subprocess.run([sys.executable, "-c", NO_TRAINING_STACK, str(ROOT),
                             str(onnx_weights_dir), str(image_files[0])],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    answer = json.loads(result.stdout.strip().splitlines()[-1])
    assert answer["loaded"] == []
    import cv2

    image = cv2.imread(str(image_files[0]))
    [want] = predictors[1]([image])
    assert answer["n"] == len(want) > 0
    assert np.allclose(answer["boxes"], want.boxes, atol=1e-3)
    assert all(shape == [image.shape[0], image.shape[1]] for shape in answer["mask_shapes"])
    assert answer["mask_pixels"] == [int(m.sum()) for m in want.iter_masks(0.5)]


def test_package_int8_prints_its_speed_and_accuracy_cost(tmp_path, tiny_checkpoint):
    """`package --quantize int8` measures what int8 costs against the model's own fp32 network on
    images of the calibration data: speed end to end, detections found again, and segm mAP of
    both where the data are annotated with labels the model knows."""
    import re
    import subprocess
    import sys

    from mmdet_mlflow.data import Dataset, load_dataset, write_coco
    from mmdet_mlflow.synth import generate

    generate(tmp_path / "fridge", num_images=6, seed=4, progress=False)
    fridge = load_dataset(tmp_path / "fridge" / "train.jsonl")
    for record in fridge.images:   # labels the COCO model knows
        for instance in record.instances:
            instance.label = "bottle"
    data = write_coco(Dataset(images=fridge.images, classes=["bottle"]), tmp_path / "bottles.coco.json")
    done = subprocess.run([sys.executable, "-m", "mmdet_mlflow.cli", "package", "--config",
                           "rtmdet-ins_tiny_8xb32-300e_coco", "--checkpoint", str(tiny_checkpoint),
                           "--output", str(tmp_path / "int8"), "--runtime", "onnx", "--quantize", "int8",
                           "--calibration-data", str(data), "--calibration-images", "3"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    speed = re.search(r"int8 vs fp32 on (\d+) images of .*: ([\d.]+)x the speed end to end", done.stdout)
    assert speed and int(speed.group(1)) == 5 and float(speed.group(2)) > 0, done.stdout
    assert re.search(r"int8 finds \d+ of fp32's \d+ detections", done.stdout), done.stdout
    assert re.search(r"segm mAP@\[\.5:\.95\] on them: fp32 [\d.]+, int8 [\d.]+ \([+-][\d.]+\)", done.stdout), \
        done.stdout


def test_evaluation_gives_both_runtimes_the_same_segm_ap(predictors, images, tiny_model_dir, tmp_path):
    """`evaluate` scores the ONNX runtime as it scores torch: on ground truth made of the torch
    runtime's own first detections' masks (so AP is far from 0 for random weights), segm and bbox
    mAP@[.5:.95] of the two agree within 0.002."""
    import cv2

    from mmdet_mlflow.data import Dataset, ImageRecord, Instance, write_coco
    from mmdet_mlflow.evaluate import evaluate
    from scoring.encode import mask_polygons

    torch_predictor, onnx_predictor = predictors
    params = torch_predictor.default_params.updated({"score_threshold": 0.0, "max_detections": 15})
    records = []
    for index, image in enumerate(images):
        path = tmp_path / f"{index}.png"  # lossless: both read the very pixels the answer came from
        cv2.imwrite(str(path), image)
        dets, masks = _detections(torch_predictor, image, params)
        height, width = image.shape[:2]
        instances = []
        for label, mask in zip(dets.labels, masks):
            polygons = [p.ravel().astype(float).tolist() for p in mask_polygons(mask, 0.5)]
            if polygons and mask.sum() >= 16:
                instances.append(Instance(label=torch_predictor.class_names[int(label)], polygons=polygons))
        records.append(ImageRecord(path=path, width=width, height=height, instances=instances))
    assert sum(len(r.instances) for r in records) >= 10
    test = write_coco(Dataset(images=records, classes=list(torch_predictor.class_names)), tmp_path / "test.coco.json")
    scores = {name: evaluate(tiny_model_dir, test, tmp_path / name, predictor=predictor, progress=False,
                             num_samples=0, track=False)
              for name, predictor in (("torch", torch_predictor), ("onnx", onnx_predictor))}
    assert scores["torch"]["segm"]["AP"] > 0.5, scores["torch"]["segm"]
    for section in ("segm", "bbox"):
        assert abs(scores["onnx"][section]["AP"] - scores["torch"][section]["AP"]) <= 0.002, \
            (section, scores["torch"][section]["AP"], scores["onnx"][section]["AP"])
