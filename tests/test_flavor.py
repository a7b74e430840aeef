"""The mmdet flavor: what a saved model holds, and that its predictions are mmdet's own."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import yaml

import mlflow_model
from helpers import TINY, b64

COCO_TEST_SETTINGS = {"score_threshold": 0.05, "polygon_tolerance": 0.0}


def test_mlmodel_is_a_loader_module_pyfunc_with_an_mmdet_flavor(tiny_model_dir):
    mlmodel = yaml.safe_load((tiny_model_dir / "MLmodel").read_text())
    pyfunc = mlmodel["flavors"]["python_function"]
    assert pyfunc["loader_module"] == "scoring.pyfunc"  # the serving core loads it
    assert pyfunc["code"] == "code" and pyfunc["data"] == "model"
    assert not list(tiny_model_dir.rglob("*.pkl")), "nothing is pickled"
    # the mmdet flavor says where the files are; model.json alone says what the model is
    assert mlmodel["flavors"]["mmdet"] == {"config": "model/config.py", "weights": "model/weights.pth",
                                           "info": "model/model.json"}
    info = json.loads((tiny_model_dir / "model" / "model.json").read_text())
    assert len(info["classes"]) == 80 and info["classes"][0] == "person"
    assert info["versions"]["mmdet_version"] == "3.3.0" and info["versions"]["mmcv_version"] == "2.1.0"
    assert info["config_name"] == TINY and info["runtime"] == "torch"
    assert len(info["checkpoint"]["sha256"]) == 64
    assert mlmodel["metadata"] == {"base_model_task": "image-instance-segmentation"}
    assert (tiny_model_dir / "code" / "scoring" / "__init__.py").is_file()
    for packaging_only in ("mlflow_model", "mmdet_mlflow"):  # see tests/test_architecture.py
        assert not (tiny_model_dir / "code" / packaging_only).exists()


def test_signature_declares_the_image_column_boxes_and_params(tiny_model_dir):
    from mlflow.models import Model

    signature = Model.load(str(tiny_model_dir)).signature
    assert signature.inputs.input_names() == ["image"]
    # one {"boxes": [...]} object per image: what spark_udf turns into a struct (see
    # scoring.schema.mlflow_signature) and what the served "predictions" hold
    (record,) = signature.outputs.inputs
    assert [p.name for p in record.type.properties] == ["boxes"]
    params = {p.name: p.default for p in signature.params}
    classes = params.pop("classes")  # every class of the model: none filtered out by default
    assert len(classes) == 80 and classes[:2] == ["person", "bicycle"]
    assert params == {"score_threshold": 0.3, "iou_threshold": 0.6, "max_detections": 100,
                      "mask_threshold": 0.5, "polygon_tolerance": 1.0,
                      "class_agnostic_nms": False, "mask_format": "polygon",
                      "tile_grid_size": "", "tile_overlap_ratio": 0.25, "tile_predictions_nms_thresh": 0.25}
    assert (tiny_model_dir / "input_example.json").is_file()
    assert (tiny_model_dir / "serving_input_example.json").is_file()


def test_serving_input_example_replays(tiny_model_dir):
    from mlflow.models import validate_serving_input

    example = (tiny_model_dir / "serving_input_example.json").read_text()
    result = validate_serving_input(str(tiny_model_dir), example)
    assert len(result) == 2 and "boxes" in result.columns


def test_environment_files_pin_the_stack_and_build_mmcv_ops(tiny_model_dir):
    pins = mlflow_model.pinned_requirements()
    onnx_only = ("onnxruntime", "onnx", "ml_dtypes", "azureml-ai-monitoring",  # ONNX models' or export's
                 "openvino")  # the OpenVINO model's
    assert (tiny_model_dir / "requirements.txt").read_text().split() == \
        [pin for pin in pins if pin.split("==")[0] not in onnx_only]
    pins = mlflow_model.get_default_pip_requirements("torch")
    python_env = yaml.safe_load((tiny_model_dir / "python_env.yaml").read_text())
    build = python_env["build_dependencies"]
    assert "torch==2.13.0" in build and any(b.startswith("setuptools") for b in build)
    assert "pip==25.2" in build, "pip >= 25.3 would isolate mmcv's build from torch"
    assert python_env["dependencies"] == ["-r requirements.txt"]
    conda = yaml.safe_load((tiny_model_dir / "conda.yaml").read_text())
    conda_pip = next(d for d in conda["dependencies"] if isinstance(d, dict))["pip"]
    assert set(pins) <= set(conda_pip)


def test_weights_are_plain_tensors(tiny_model_dir, tiny_checkpoint):
    import torch

    weights = torch.load(tiny_model_dir / "model" / "weights.pth", weights_only=True)
    original = torch.load(tiny_checkpoint, weights_only=True)["state_dict"]
    assert weights.keys() == original.keys()
    assert all(torch.equal(weights[k], original[k]) for k in weights)


def _mmdet_reference(model_dir, checkpoint, image_path):
    """mmdet's own answer, from the config the model was packaged with and the checkpoint."""
    from mmdet.apis import inference_detector, init_detector

    detector = init_detector(str(model_dir / "model" / "config.py"), str(checkpoint), device="cpu")
    return inference_detector(detector, str(image_path)).pred_instances


def _rasterize(polygons, width, height):
    import cv2

    canvas = np.zeros((height, width), np.uint8)
    pts = [np.round(np.asarray(seg).reshape(-1, 2) * [width, height]).astype(np.int32)
           for seg in polygons]
    if pts:
        cv2.fillPoly(canvas, pts, 1)
    return canvas.astype(bool)


EXACT = {"torch_exact": True}  # the network as mmdet builds it: bit for bit mmdet's arithmetic


@pytest.mark.parametrize("form, tolerance", [("exact", 1e-6), ("served", 1e-4)])
def test_pyfunc_predictions_equal_mmdet_inference_detector(tiny_model_dir, tiny_checkpoint, image_files,
                                                           form, tolerance):
    """Same labels, boxes and scores as mmdet's own API on the same files and weights (mmdet
    reads the file itself, in BGR: equal results also prove our channel order), and polygons
    that rasterize back onto mmdet's masks. Exact: the network as mmdet builds it
    (``torch_exact``), the same arithmetic; served: the default form (batch norms folded,
    channels-last memory), the same answers within float rounding."""
    import mlflow.pyfunc

    model = mlflow.pyfunc.load_model(str(tiny_model_dir), model_config=EXACT if form == "exact" else None)
    classes = mlflow_model.load_model(str(tiny_model_dir)).dataset_meta["classes"]
    compared = 0
    for path in image_files:
        # One image per call, as inference_detector runs: bit for bit the same arithmetic.
        # (Batches pad and convolve several images at once; that float noise is tested below.)
        ours = model.predict(pd.DataFrame({"image": [b64(path)]}), params=COCO_TEST_SETTINGS)
        assert list(ours.columns) == ["boxes"] and len(ours) == 1
        boxes = ours["boxes"][0]
        ref = _mmdet_reference(tiny_model_dir, tiny_checkpoint, path)
        height, width = ref.masks.shape[1:]
        assert len(boxes) == len(ref) > 0
        for det, box, score, label, mask in zip(boxes, ref.bboxes.numpy(), ref.scores.numpy(),
                                                ref.labels.numpy(), ref.masks.numpy()):
            assert det["label"] == classes[label]
            assert det["score"] == pytest.approx(float(score), abs=tolerance)
            expected = np.clip(box / [width, height, width, height], 0, 1)
            got = [det["box"][k] for k in ("topX", "topY", "bottomX", "bottomY")]
            assert got == pytest.approx(expected.tolist(), abs=tolerance)
            if mask.sum() >= 200:  # contours of specks are dominated by their boundary pixels
                drawn = _rasterize(det["polygon"], width, height)
                iou = (drawn & mask).sum() / (drawn | mask).sum()
                assert iou > 0.9, iou
                compared += 1
    assert compared >= 10


def test_masks_are_bit_identical_to_mmdet_even_in_small_chunks(tiny_model_dir, tiny_checkpoint,
                                                               image_files, monkeypatch):
    import scoring.runtimes.torch_rtmdet
    from scoring.decode import decode_image
    from scoring.schema import PredictParams

    predictor = mlflow_model.load_predictor(tiny_model_dir / "model", device="cpu", model_config=EXACT)
    # A budget of one full-size mask per chunk: the chunked path must change nothing.
    monkeypatch.setattr(scoring.runtimes.torch_rtmdet, "MASK_CHUNK_BYTES", 1)
    image = decode_image(image_files[0].read_bytes())
    dets = predictor([image], PredictParams(score_threshold=0.05))[0]
    ref = _mmdet_reference(tiny_model_dir, tiny_checkpoint, image_files[0])
    ours = np.stack(list(dets.iter_masks(0.5)))
    assert ours.shape == tuple(ref.masks.shape) and ours.any()
    assert np.array_equal(ours, ref.masks.numpy())


def test_on_another_mmdet_the_masks_are_mmdets_own_with_a_warning(tiny_model_dir, tiny_checkpoint,
                                                                  image_files, monkeypatch):
    """The deferred-mask post-processing copies a private mmdet method: on another mmdet (its
    version value faked) the head keeps mmdet's own, a warning says so, and the answers are
    still mmdet's, masks bit for bit."""
    import mmdet

    from scoring.decode import decode_image
    from scoring.schema import PredictParams
    from scoring.version_guard import UntestedVersionWarning

    monkeypatch.setattr(mmdet, "__version__", "3.9.0")
    with pytest.warns(UntestedVersionWarning, match="mmdet 3.9.0 is installed.*mmdet's own post-processing"):
        predictor = mlflow_model.load_predictor(tiny_model_dir / "model", device="cpu",
                                                model_config=EXACT)
    assert "_bbox_mask_post_process" not in vars(predictor.detector.bbox_head)
    dets = predictor([decode_image(image_files[0].read_bytes())], PredictParams(score_threshold=0.05))[0]
    ref = _mmdet_reference(tiny_model_dir, tiny_checkpoint, image_files[0])
    assert len(dets) == len(ref) > 0
    np.testing.assert_allclose(dets.boxes, ref.bboxes.numpy(), atol=1e-4)
    assert np.array_equal(np.stack(list(dets.iter_masks(0.5))), ref.masks.numpy())


def test_a_batch_is_one_forward_pass_with_the_same_results(tiny_model_dir, image_files):
    from scoring.decode import decode_image

    predictor = mlflow_model.load_predictor(tiny_model_dir / "model", device="cpu", batch_size=8)
    images = [decode_image(p.read_bytes()) for p in image_files]
    calls = []
    original = predictor.detector.extract_feat
    predictor.detector.extract_feat = lambda x: calls.append(x.shape) or original(x)
    together = predictor(images)
    assert len(calls) == 1 and calls[0][0] == 2
    alone = [predictor([img])[0] for img in images]
    for a, b in zip(together, alone):
        # Batched convolutions differ from single ones in the last float bits, which can swap
        # near-tied detections (this untrained model has many): match them as sets.
        matched = sum(
            any(a.labels[i] == b.labels[j] and np.allclose(a.boxes[i], b.boxes[j], atol=1e-2)
                and abs(a.scores[i] - b.scores[j]) < 1e-4 for j in range(len(b)))
            for i in range(len(a)))
        assert len(a) == len(b) and matched >= 0.9 * len(a)
        np.testing.assert_allclose(a.scores[:5], b.scores[:5], atol=1e-4)


def test_forward_batches_are_single_images_on_cpu_unless_asked(tiny_model_dir, monkeypatch):
    """On CPU one image per pass is fastest (bench/predict.py); the model's 8 is for GPUs."""
    assert mlflow_model.load_predictor(tiny_model_dir / "model", device="cpu").batch_size == 1
    monkeypatch.setenv("MMDET_MLFLOW_BATCH_SIZE", "4")
    assert mlflow_model.load_predictor(tiny_model_dir / "model", device="cpu").batch_size == 4


def test_params_change_the_result(tiny_model_dir, image_files):
    import mlflow.pyfunc

    model = mlflow.pyfunc.load_model(str(tiny_model_dir))
    frame = pd.DataFrame({"image": [b64(image_files[0])]})
    default = model.predict(frame)["boxes"][0]
    median = float(np.median([d["score"] for d in default]))
    strict = model.predict(frame, params={"score_threshold": median})["boxes"][0]
    few = model.predict(frame, params={"max_detections": 3})["boxes"][0]
    assert all(d["score"] >= 0.3 for d in default)
    assert all(d["score"] > median for d in strict) and 0 < len(strict) < len(default)
    assert len(few) == 3
    raw = model.predict(frame, params={"polygon_tolerance": 0.0})["boxes"][0]
    simple = model.predict(frame, params={"polygon_tolerance": 2.0})["boxes"][0]
    assert sum(map(len, json.dumps([d["polygon"] for d in simple]))) < \
        sum(map(len, json.dumps([d["polygon"] for d in raw])))


def test_log_model_registers_and_load_model_returns_the_mmdet_detector(tmp_path, tiny_checkpoint, monkeypatch):
    import mlflow
    from mmdet.models.detectors import RTMDet

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    for inherited in ("MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID"):
        monkeypatch.delenv(inherited, raising=False)  # another test's experiment lives elsewhere
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    experiment = mlflow.create_experiment("flavor-test")
    with mlflow.start_run(experiment_id=experiment):
        info = mlflow_model.log_model(TINY, str(tiny_checkpoint), name="model",
                                      registered_model_name="rtmdet-tiny-test")
    assert info.registered_model_version == 1
    detector = mlflow_model.load_model("models:/rtmdet-tiny-test/1")
    assert isinstance(detector, RTMDet) and not detector.training
    assert len(detector.dataset_meta["classes"]) == 80


def test_saved_model_loads_and_predicts_without_this_repository(tiny_model_dir, image_files, tmp_path):
    """Only the model directory: a Python without our editable install (no site .pth files),
    started elsewhere, loads it through MLflow and finds our modules in the model's code/."""
    import site

    site_packages = [p for p in site.getsitepackages() if p.endswith("site-packages")][0]
    script = f"""
import sys
sys.path.append({site_packages!r})
import mlflow.pyfunc, pandas as pd
model = mlflow.pyfunc.load_model({str(tiny_model_dir)!r})
out = model.predict(pd.DataFrame({{"image": [{b64(image_files[0])!r}]}}))
import scoring
assert scoring.__file__.startswith({str(tiny_model_dir)!r}), scoring.__file__
assert "mlflow_model" not in sys.modules and "mmdet_mlflow" not in sys.modules, "packaging code loaded"
print("boxes", len(out["boxes"][0]))
"""
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    (tmp_path / "load.py").write_text(script)
    result = subprocess.run([sys.executable, "-S", "load.py"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "boxes" in result.stdout


def test_save_model_refuses_an_argument_it_does_not_know(tmp_path, tiny_checkpoint):
    # a misspelled option (here runtime) must not be dropped silently, leaving a torch model
    with pytest.raises(TypeError, match="runtim"):
        mlflow_model.save_model(tmp_path / "model", TINY, str(tiny_checkpoint), runtim="onnx")
    assert not (tmp_path / "model").exists()
