"""The OpenVINO runtime: the ONNX model's graph and numpy steps with OpenVINO executing the
network. At fp32 it answers as the torch model does (the ONNX runtime's tolerances); bf16 (where
the CPU has it) finds what fp32 finds; the precision is chosen at load and reported; a bad
precision name or a file OpenVINO cannot read is a clear error at load. Real tiny models on CPU."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from helpers import found_again, scene_image
from test_onnx_runtime import IMAGE_SIZES, _compare

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def ov_weights_dir(tmp_path_factory, tiny_onnx_model_dir) -> Path:
    """A copy of the ONNX model's weights folder, its model.json naming the openvino runtime."""
    folder = tmp_path_factory.mktemp("openvino") / "model"
    shutil.copytree(tiny_onnx_model_dir / "model", folder)
    info = json.loads((folder / "model.json").read_text())
    info["runtime"] = "openvino"
    (folder / "model.json").write_text(json.dumps(info))
    return folder


@pytest.fixture(scope="module")
def predictors(ov_weights_dir, tiny_model_dir):
    import mlflow_model
    from scoring.runtimes.openvino_rtmdet import load_openvino_predictor

    torch_predictor = mlflow_model.load_predictor(tiny_model_dir / "model", device="cpu", batch_size=1)
    return torch_predictor, load_openvino_predictor(ov_weights_dir, precision="fp32", num_threads=2)


@pytest.fixture(scope="module")
def images() -> list[np.ndarray]:
    return [scene_image(w, h, seed) for w, h, seed in IMAGE_SIZES]


def _copy(folder: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(folder, tmp_path / "model"))


def _forget_checksum(folder: Path) -> None:
    info = json.loads((folder / "model.json").read_text())
    info["onnx"]["files"] = {}
    (folder / "model.json").write_text(json.dumps(info))


# ----------------------------------------------------------------------------- the seam


def test_only_loading_and_forward_are_its_own():
    from scoring.runtimes.onnx_rtmdet import OnnxPredictor
    from scoring.runtimes.openvino_rtmdet import OpenVinoPredictor

    assert OpenVinoPredictor.preprocess is OnnxPredictor.preprocess
    assert OpenVinoPredictor.postprocess is OnnxPredictor.postprocess
    assert OpenVinoPredictor.forward is not OnnxPredictor.forward


# ----------------------------------------------------------------------------- equality


@pytest.mark.parametrize("param_values", [{}, {"score_threshold": 0.05, "iou_threshold": 0.5},
                                          {"max_detections": 7, "mask_threshold": 0.3}])
def test_fp32_detections_and_masks_equal_the_torch_runtime(predictors, images, param_values):
    torch_predictor, ov_predictor = predictors
    assert ov_predictor.precision == "fp32" and ov_predictor.runtime == "openvino"
    params = torch_predictor.default_params.updated(param_values)
    matched, total, ious = _compare(torch_predictor, ov_predictor, images, params)
    assert total >= 3 * len(images), f"only {total} detections: the test model should see things"
    assert matched >= 0.99 * total, f"{matched} of {total} detections identical"
    assert min(ious) >= 0.99, f"worst matched mask IoU {min(ious):.4f}"


def test_auto_is_bf16_where_the_cpu_has_it_and_finds_what_fp32_finds(ov_weights_dir, predictors, images):
    """Random weights say nothing about accuracy (packaging measures it on real data): this
    checks it is the same model, most fp32 detections found again within 2 px and 0.05 score."""
    from scoring.runtimes.openvino_rtmdet import cpu_has_bf16, load_openvino_predictor

    auto = load_openvino_predictor(ov_weights_dir, num_threads=2)
    assert auto.precision == ("bf16" if cpu_has_bf16() else "fp32")
    fp32 = predictors[1]
    params = fp32.default_params
    found, close = found_again(fp32, auto, images[:3], params)
    assert found > 0 and close >= 0.8 * found, f"{auto.precision} found {close} of fp32's {found}"


def test_the_precision_comes_from_the_environment_and_is_printed_at_load(ov_weights_dir, monkeypatch,
                                                                         capfd):
    from scoring.runtimes import load_predictor

    monkeypatch.setenv("MMDET_MLFLOW_PRECISION", "FP32")
    predictor = load_predictor(ov_weights_dir)  # model.json names the runtime
    assert type(predictor).__name__ == "OpenVinoPredictor" and predictor.precision == "fp32"
    assert "openvino runtime, precision fp32 (MMDET_MLFLOW_PRECISION=fp32" in capfd.readouterr().err


def test_a_bad_precision_name_is_refused_at_load(ov_weights_dir, monkeypatch):
    from scoring.runtimes.onnx_rtmdet import OnnxModelError
    from scoring.runtimes.openvino_rtmdet import load_openvino_predictor
    from scoring.settings import SettingError

    with pytest.raises(OnnxModelError, match="precision 'fp16' is not one of auto, fp32, bf16"):
        load_openvino_predictor(ov_weights_dir, precision="fp16")
    monkeypatch.setenv("MMDET_MLFLOW_PRECISION", "half")
    with pytest.raises(SettingError, match="MMDET_MLFLOW_PRECISION='half' is not valid: not one of "
                                           "auto, fp32, bf16"):
        load_openvino_predictor(ov_weights_dir)


def test_batches_as_single_images(predictors, images):
    _, predictor = predictors
    params = predictor.default_params
    one_by_one = [predictor([img], params)[0] for img in images[:3]]
    predictor.batch_size = 3  # the graph's batch axis is dynamic
    try:
        batched = predictor(images[:3], params)
    finally:
        predictor.batch_size = 1
    for a, b in zip(one_by_one, batched):
        assert len(a) == len(b)
        assert np.abs(a.boxes - b.boxes).max(initial=0) <= 1e-2


# ----------------------------------------------------------------------------- bad files


def test_a_changed_file_is_refused_by_its_checksum(ov_weights_dir, tmp_path):
    from scoring.runtimes.onnx_rtmdet import OnnxModelError
    from scoring.runtimes.openvino_rtmdet import load_openvino_predictor

    folder = _copy(ov_weights_dir, tmp_path)
    with open(folder / "model.onnx.data", "r+b") as f:
        f.seek(f.seek(0, 2) // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(OnnxModelError, match="model.onnx.data is not the file exported with this model"):
        load_openvino_predictor(folder)


# ----------------------------------------------------------------------------- without torch


NO_TRAINING_STACK = """
import json, sys
for name in ("torch", "torchvision", "mmcv", "mmdet", "mmengine", "onnxruntime"):
    sys.modules[name] = None  # any import of them now raises ImportError
sys.path.insert(0, sys.argv[1])
import cv2
from scoring.runtimes import load_predictor
predictor = load_predictor(sys.argv[2])
[dets] = predictor([cv2.imread(sys.argv[3])])
print(json.dumps({"n": len(dets), "boxes": dets.boxes.tolist(), "precision": predictor.precision}))
"""


def test_predicts_in_a_process_without_torch_or_onnxruntime(ov_weights_dir, predictors, image_files):
    import os

    result = subprocess.run([sys.executable, "-c", NO_TRAINING_STACK, str(ROOT), str(ov_weights_dir),
                             str(image_files[0])], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "MMDET_MLFLOW_PRECISION": "fp32"})
    assert result.returncode == 0, result.stderr[-3000:]
    answer = json.loads(result.stdout.strip().splitlines()[-1])
    import cv2

    [want] = predictors[1]([cv2.imread(str(image_files[0]))])
    assert answer["precision"] == "fp32" and answer["n"] == len(want) > 0
    assert np.allclose(answer["boxes"], want.boxes, atol=1e-3)


# ----------------------------------------------------------------------------- packaging


@pytest.fixture(scope="module")
def bottles(tmp_path_factory) -> Path:
    """A small COCO set whose labels the COCO-class test model knows (its instances: bottles)."""
    from mmdet_mlflow.data import Dataset, load_dataset, write_coco
    from mmdet_mlflow.synth import generate

    folder = tmp_path_factory.mktemp("bottles")
    generate(folder / "fridge", num_images=6, seed=4, progress=False)
    fridge = load_dataset(folder / "fridge" / "train.jsonl")
    for record in fridge.images:
        for instance in record.instances:
            instance.label = "bottle"
    return write_coco(Dataset(images=fridge.images, classes=["bottle"]), folder / "bottles.coco.json")


def test_package_measures_bf16_against_fp32_and_records_it(tmp_path, tiny_checkpoint, bottles):
    output = tmp_path / "ov"
    done = subprocess.run([sys.executable, "-m", "mmdet_mlflow.cli", "package", "--config",
                           "rtmdet-ins_tiny_8xb32-300e_coco", "--checkpoint", str(tiny_checkpoint),
                           "--output", str(output), "--runtime", "openvino",
                           "--calibration-data", str(bottles), "--accept-accuracy-drop"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert re.search(r"bf16 vs fp32 on 5 images of .*: [\d.]+x the speed end to end", done.stdout), done.stdout
    assert re.search(r"bf16 finds \d+ of fp32's \d+ detections", done.stdout), done.stdout
    assert re.search(r"segm mAP@\[\.5:\.95\] on them: fp32 [\d.]+, bf16 [\d.]+ \([+-][\d.]+\)",
                     done.stdout), done.stdout
    assert "openvino runtime" in done.stdout
    info = json.loads((output / "model" / "model.json").read_text())
    assert info["runtime"] == "openvino"
    check = info["precision_checks"]["bf16"]
    assert check["images"] == 5 and check["accepted"] is True and check["max_segm_AP_drop"] == 0.01
    assert set(check["segm_AP"]) == {"fp32", "bf16"}
    assert not (output / "model" / "weights.pth").exists()
    requirements = (output / "requirements.txt").read_text().split()
    assert {r.split("==")[0] for r in requirements} == {
        "mlflow-skinny", "openvino", "numpy", "pandas", "pillow", "opencv-python-headless"}
    assert all("==" in r for r in requirements)
    assert [p.name for p in tmp_path.iterdir()] == ["ov"], "no staging folder left behind"


def test_package_refuses_a_drop_beyond_the_gate_and_writes_nothing(tmp_path, tiny_checkpoint, bottles):
    """The gate itself, in process, with a threshold no model can pass (it must gain 1.0 mAP)."""
    import mlflow_model
    from mmdet_mlflow.precision_check import AccuracyDropError, ImageSource, package_gated

    output = tmp_path / "refused"
    source = ImageSource.read(bottles)

    def save(path):
        return mlflow_model.save_model(path, "rtmdet-ins_tiny_8xb32-300e_coco", str(tiny_checkpoint),
                                       runtime="openvino")

    with pytest.raises(AccuracyDropError, match=r"bf16 loses -?[\d.]+ segm mAP against fp32 on 5 "
                                                r"images .*nothing written.*--accept-accuracy-drop"):
        package_gated(output, save, source, accept_drop=False, max_drop=-1.0)
    assert list(tmp_path.iterdir()) == [], "nothing written, no staging folder left"


@pytest.mark.parametrize("env, threads", [({"OMP_NUM_THREADS": "1"}, 1),
                                          ({"OMP_NUM_THREADS": "2", "MMDET_MLFLOW_NUM_THREADS": "1"}, 1)])
def test_wheel_runtimes_take_the_thread_count_spark_gives_each_task(monkeypatch, ov_weights_dir,
                                                                    tiny_onnx_model_dir, env, threads):
    """ONNX Runtime and OpenVINO ignore OMP_NUM_THREADS, which PySpark sets to each task's cores:
    both take it (or MMDET_MLFLOW_NUM_THREADS, first), so two Spark workers on two cores run a
    thread each instead of two each."""
    from scoring.runtimes.onnx_rtmdet import load_onnx_predictor
    from scoring.runtimes.openvino_rtmdet import load_openvino_predictor

    for name, value in env.items():
        monkeypatch.setenv(name, value)
    onnx = load_onnx_predictor(tiny_onnx_model_dir / "model", device="cpu")
    assert onnx.session.get_session_options().intra_op_num_threads == threads
    openvino = load_openvino_predictor(ov_weights_dir, precision="fp32", quiet=True)
    assert int(openvino.compiled_model.get_property("INFERENCE_NUM_THREADS")) == threads


def test_a_thread_count_below_one_is_refused_at_load(monkeypatch, tiny_onnx_model_dir):
    from scoring.runtimes.onnx_rtmdet import load_onnx_predictor
    from scoring.settings import SettingError

    monkeypatch.setenv("MMDET_MLFLOW_NUM_THREADS", "0")
    with pytest.raises(SettingError, match="MMDET_MLFLOW_NUM_THREADS"):
        load_onnx_predictor(tiny_onnx_model_dir / "model", device="cpu")
