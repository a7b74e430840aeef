"""The object-detection families with an exported graph (RTMDet box-only, YOLOF) on ONNX Runtime
and OpenVINO (fp32) answer as their torch runtime does on the same saved model: the same count
and labels, boxes within 0.5 px, scores within 1e-4, the ``classes`` param applied, no masks.
The families without an export are refused by ``package --runtime onnx|openvino`` before
anything is written. Small configs (test resize scaled down), one or two pictures, each model
built and exported once per module."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import mlflow_model
from helpers import make_official_checkpoint, scene_image
from test_families import CLASSES, small_config

EXPORTED = {"rtmdet_tiny_8xb32-300e_coco": "rtmdet", "yolof_r50-c5_8xb8-1x_coco": "yolof"}


@pytest.fixture(scope="module", params=list(EXPORTED))
def runtimes(request, tmp_path_factory):
    """(family name, {runtime: detector}) of one family's saved model, exported once."""
    from mlflow_model.onnx_export import export_to_weights_dir
    from scoring.families import family_named

    name = request.param
    folder = tmp_path_factory.mktemp(EXPORTED[name])
    config = small_config(name, folder)
    checkpoint = make_official_checkpoint(folder / "official.pth", str(config), classes=CLASSES)
    mlflow_model.save_model(folder / "model", str(config), str(checkpoint))
    weights = folder / "model" / "model"
    export_to_weights_dir(weights)
    info = json.loads((weights / "model.json").read_text())
    family = family_named(info["family"])
    loaded = {runtime: family.loader(runtime)(weights, info=info, device="cpu", batch_size=1)
              for runtime in ("torch", "onnx")}
    from scoring.runtimes.openvino_rtmdet import load_openvino_predictor

    loaded["openvino"] = load_openvino_predictor(weights, batch_size=1, precision="fp32", quiet=True)
    return EXPORTED[name], loaded


@pytest.fixture(scope="module")
def pictures() -> list[np.ndarray]:
    return [scene_image(320, 240, 0), scene_image(200, 300, 1)]


def test_the_export_records_the_familys_head(runtimes):
    family, loaded = runtimes
    spec = loaded["onnx"].spec
    assert spec.head_kind == family and not spec.with_masks
    assert sorted(spec.outputs) == ["bbox_preds", "cls_scores"]
    if family == "yolof":  # the pipeline pads to a multiple of 32, not to a fixed size
        assert spec.input_hw is None and spec.anchors_per_cell == 5
        assert spec.coder["add_ctr_clamp"] is True


def test_preprocessing_gives_the_network_mmdets_tensor(runtimes, pictures):
    _, loaded = runtimes
    torch_runtime, onnx_runtime = loaded["torch"], loaded["onnx"]
    for batch in ([pictures[0]], [pictures[1]], pictures):
        data = torch_runtime.detector.data_preprocessor(torch_runtime.preprocess(batch), False)
        ours = onnx_runtime.preprocess(batch)
        assert ours["inputs"].shape == tuple(data["inputs"].shape)
        assert float(np.abs(ours["inputs"] - data["inputs"].numpy()).max()) == 0.0
        for meta, sample in zip(ours["metas"], data["data_samples"]):
            assert tuple(meta.img_hw) == tuple(sample.metainfo["img_shape"])
            assert meta.scale_factor == pytest.approx(sample.metainfo["scale_factor"], abs=1e-12)


def _same_detections(want, got) -> None:
    assert got.image_size == want.image_size and got.masks is None and want.masks is None
    assert len(got) == len(want) and len(want) > 0
    # in one order: random weights tie scores across classes, which NMS may order either way
    order_want, order_got = (np.lexsort((*dets.boxes.T.round(), -dets.scores.round(4), dets.labels))
                             for dets in (want, got))
    assert got.labels[order_got].tolist() == want.labels[order_want].tolist()
    assert np.abs(got.boxes[order_got] - want.boxes[order_want]).max() <= 0.5
    assert np.abs(got.scores[order_got] - want.scores[order_want]).max() <= 1e-4


@pytest.mark.parametrize("runtime", ["onnx", "openvino"])
@pytest.mark.parametrize("param_values", [{}, {"score_threshold": 0.2, "iou_threshold": 0.5,
                                               "max_detections": 7}, {"classes": ["dog", "bird"]}])
def test_detections_equal_the_torch_runtime(runtimes, pictures, runtime, param_values):
    _, loaded = runtimes
    torch_runtime, other = loaded["torch"], loaded[runtime]
    assert other.task == "object-detection" and other.runtime == runtime
    params = torch_runtime.default_params.updated(param_values)
    for picture in pictures:
        [want] = torch_runtime([picture], params)
        [got] = other([picture], params)
        _same_detections(want, got)
        if "classes" in param_values:
            assert set(got.labels.tolist()) <= {1, 2}


def test_a_batch_answers_as_the_torch_runtimes_batch(runtimes, pictures):
    """Pictures of two sizes in one pass: padded alike (YOLOF: to the larger one), so the
    answers stay the torch runtime's."""
    _, loaded = runtimes
    for runtime in loaded.values():
        runtime.batch_size = 2
    try:
        params = loaded["torch"].default_params
        want = loaded["torch"](pictures, params)
        for got in (loaded["onnx"](pictures, params), loaded["openvino"](pictures, params)):
            for one_want, one_got in zip(want, got):
                _same_detections(one_want, one_got)
    finally:
        for runtime in loaded.values():
            runtime.batch_size = 1


def test_package_onnx_serves_the_model_without_torch_weights(tmp_path):
    """The packaging path for a box-only family: the family's exporter, model.json's record,
    and the MLflow model predicting through the ONNX runtime."""
    name = "rtmdet_tiny_8xb32-300e_coco"
    config = small_config(name, tmp_path)
    checkpoint = make_official_checkpoint(tmp_path / "official.pth", str(config), classes=CLASSES)
    mlflow_model.save_model(tmp_path / "model", str(config), str(checkpoint), runtime="onnx")
    info = json.loads((tmp_path / "model" / "model" / "model.json").read_text())
    assert (info["family"], info["task"], info["runtime"]) == ("rtmdet", "object-detection", "onnx")
    assert info["onnx"]["head"]["kind"] == "rtmdet" and "mask_feat" not in info["onnx"]["outputs"]
    assert not (tmp_path / "model" / "model" / "weights.pth").exists()
    predictor = mlflow_model.load_predictor(tmp_path / "model" / "model")
    assert predictor.runtime == "onnx" and predictor.task == "object-detection"
    [answer] = predictor([scene_image(320, 240, 0)])
    assert answer.masks is None


@pytest.mark.parametrize("runtime", ["onnx", "openvino"])
def test_package_refuses_a_runtime_the_family_lacks_before_writing(tmp_path, runtime):
    output = tmp_path / "model"
    done = subprocess.run([sys.executable, "-m", "mmdet_mlflow.cli", "package", "--config",
                           "mask-rcnn_r50_fpn_1x_coco", "--checkpoint", tmp_path / "absent.pth",
                           "--output", output, "--runtime", runtime],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert f"Mask R-CNN models have no {runtime!r} runtime here (runtimes: torch)" in done.stderr
    assert "Traceback" not in done.stderr
    assert not output.exists() and list(tmp_path.iterdir()) == []


def test_package_openvino_measures_bf16_for_a_box_only_model(tmp_path):
    """The bf16 check at packaging on an object-detection model (no --calibration-data:
    synthetic pictures, speed and agreement, no mAP and so no gate)."""
    config = small_config("rtmdet_tiny_8xb32-300e_coco", tmp_path)
    checkpoint = make_official_checkpoint(tmp_path / "official.pth", str(config), classes=CLASSES)
    output = tmp_path / "model"
    done = subprocess.run([sys.executable, "-m", "mmdet_mlflow.cli", "package", "--config", config,
                           "--checkpoint", checkpoint, "--output", output, "--runtime", "openvino"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    info = json.loads((output / "model" / "model.json").read_text())
    assert (info["family"], info["runtime"]) == ("rtmdet", "openvino")
    report = info["precision_checks"]["bf16"]
    assert report["accepted"] and "segm_AP" not in report
