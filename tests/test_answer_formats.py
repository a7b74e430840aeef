"""Answer formats: ``mask_format`` "polygon" / "rle" / "none" and the ``classes``
filter, on the real tiny model in both runtimes, through the one runner and the one encoder."""
from __future__ import annotations

import dataclasses
import json

import cv2
import numpy as np
import pytest
from pycocotools import mask as mask_util

from helpers import scene_image
from scoring.encode import encode_detections, mask_polygons
from scoring.errors import InputError
from scoring.runner import score_images
from scoring.runtimes.base import ImageDetections, Predictor
from scoring.schema import PredictParams

RUNTIMES = ("torch", "onnx")
IMAGES = [scene_image(320, 240, 0), scene_image(200, 300, 1), scene_image(97, 131, 4)]


@pytest.fixture(scope="module", params=RUNTIMES)
def predictor(request, tiny_model_dir):
    import mlflow_model
    from scoring.model_dir import ModelDir

    folder = tiny_model_dir if request.param == "torch" else request.getfixturevalue("tiny_onnx_model_dir")
    predictor = mlflow_model.load_predictor(ModelDir(folder).data.path, device="cpu", batch_size=1)
    assert predictor.runtime == request.param
    return predictor


def answers(predictor, params: dict, images=IMAGES) -> list:
    return list(score_images(predictor, enumerate(images), params, keep_images=True,
                             decode=lambda key, image: image))


def coco_decode(rle: dict) -> np.ndarray:
    return mask_util.decode({"size": rle["size"], "counts": rle["counts"].encode()}).astype(bool)


# --- rle -----------------------------------------------------------------------------------------

def test_rle_answers_decode_to_the_models_masks_pixel_for_pixel(predictor):
    params = {"mask_format": "rle", "score_threshold": 0.05}
    found = 0
    for scored in answers(predictor, params):
        boxes = scored.response["boxes"]
        masks = list(scored.detections.iter_masks(predictor.default_params.mask_threshold))
        assert len(boxes) == len(masks)
        height, width = scored.image.shape[:2]
        for box, mask in zip(boxes, masks):
            assert "polygon" not in box and set(box["rle"]) == {"size", "counts"}
            assert box["rle"]["size"] == [height, width]
            assert np.array_equal(coco_decode(box["rle"]), mask)
            # byte for byte what pycocotools writes for that mask
            want = mask_util.encode(np.asfortranarray(mask, dtype=np.uint8))["counts"].decode()
            assert box["rle"]["counts"] == want
            found += int(mask.any())
    assert found >= 5, "the test model should make non-empty masks"


def test_rle_answers_carry_the_same_detections_as_polygon_answers(predictor):
    polygon = answers(predictor, {"score_threshold": 0.05})
    rle = answers(predictor, {"score_threshold": 0.05, "mask_format": "rle"})
    none = answers(predictor, {"score_threshold": 0.05, "mask_format": "none"})
    for a, b, c in zip(polygon, rle, none):
        strip = lambda boxes: [{k: v for k, v in box.items() if k not in ("polygon", "rle")} for box in boxes]
        assert strip(a.response["boxes"]) == strip(b.response["boxes"]) == c.response["boxes"]
        assert all(set(box) == {"box", "label", "score"} for box in c.response["boxes"])
        assert all("polygon" in box and "rle" not in box for box in a.response["boxes"])


class _CountingMasks:
    """A MaskSource that counts the masks it is asked to make."""

    def __init__(self, masks):
        self.masks, self.made = masks, 0

    def __len__(self) -> int:
        return len(self.masks)

    def iter_masks(self, threshold):
        for mask in self.masks.iter_masks(threshold):
            self.made += 1
            yield mask


class _Counting(Predictor):
    """A real predictor whose detections' masks are counted as they are made."""

    def __init__(self, inner: Predictor):
        self.inner = inner
        self.class_names, self.default_params = inner.class_names, inner.default_params
        self.batch_size, self.input_scale = inner.batch_size, inner.input_scale
        self.sources: list[_CountingMasks] = []

    def __call__(self, images, params=None):
        out = []
        for dets in self.inner(images, params):
            source = _CountingMasks(dets.masks)
            self.sources.append(source)
            out.append(dataclasses.replace(dets, masks=source))
        return out


@pytest.mark.parametrize("mask_format", ["none", "polygon", "rle"])
def test_none_makes_no_mask_at_all(predictor, mask_format):
    counting = _Counting(predictor)
    scored = answers(counting, {"mask_format": mask_format, "score_threshold": 0.05})
    detections = sum(len(s.response["boxes"]) for s in scored)
    assert detections >= 3
    made = sum(source.made for source in counting.sources)
    assert made == (0 if mask_format == "none" else detections)


def test_none_is_not_held_to_the_mask_work_limit(predictor, monkeypatch):
    """MMDET_MLFLOW_MAX_MASK_PIXELS bounds max_detections x pixels of mask work: without masks
    there is none, so the request is served."""
    monkeypatch.setenv("MMDET_MLFLOW_MAX_MASK_PIXELS", "1000")
    with pytest.raises(InputError, match="mask pixels, over the limit"):
        answers(predictor, {"mask_format": "polygon"}, IMAGES[:1])
    assert answers(predictor, {"mask_format": "none"}, IMAGES[:1])[0].ok


# --- the encoder on known masks --------------------------------------------------------------------

class _Masks:
    def __init__(self, masks):
        self.masks = masks

    def __len__(self):
        return len(self.masks)

    def iter_masks(self, threshold):
        return iter(self.masks)


def _detections(masks: list[np.ndarray]) -> ImageDetections:
    height, width = masks[0].shape
    n = len(masks)
    return ImageDetections(image_size=(width, height), boxes=np.tile([[1.0, 1.0, 50.0, 40.0]], (n, 1)),
                           scores=np.full(n, 0.9), labels=np.zeros(n, int), class_names=["thing"],
                           masks=_Masks(masks))


def ring(height=90, width=120) -> np.ndarray:
    mask = np.zeros((height, width), np.uint8)
    cv2.circle(mask, (60, 45), 40, 1, -1)
    cv2.circle(mask, (60, 45), 18, 0, -1)
    return mask.astype(bool)


def test_a_ring_keeps_its_hole_in_rle_and_loses_it_in_polygons():
    mask = ring()
    [rle_box] = encode_detections(_detections([mask]), PredictParams(mask_format="rle"))["boxes"]
    assert np.array_equal(coco_decode(rle_box["rle"]), mask)
    assert not coco_decode(rle_box["rle"])[45, 60]  # the hole
    [polygon_box] = encode_detections(_detections([mask]), PredictParams(polygon_tolerance=0))["boxes"]
    assert len(polygon_box["polygon"]) == 1  # the outer outline only: documented
    outline = (np.asarray(polygon_box["polygon"][0]).reshape(-1, 2) * (120, 90)).ravel().tolist()
    filled = mask_util.decode(mask_util.merge(mask_util.frPyObjects([outline], 90, 120)))
    assert filled[45, 60]  # rasterized back, the hole is filled


def test_polygons_put_the_largest_part_first():
    mask = np.zeros((100, 200), np.uint8)
    cv2.rectangle(mask, (10, 70), (30, 90), 1, -1)  # small, lower: OpenCV lists it first
    cv2.rectangle(mask, (100, 5), (190, 60), 1, -1)  # large
    parts = mask_polygons(mask.astype(bool), 0)
    assert len(parts) == 2
    assert cv2.contourArea(parts[0].astype(np.float32)) > cv2.contourArea(parts[1].astype(np.float32))
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    assert cv2.contourArea(contours[0]) < cv2.contourArea(contours[1])  # so the order did change


def test_rle_answers_are_json(predictor):
    scored = answers(predictor, {"mask_format": "rle", "max_detections": 3}, IMAGES[:1])[0]
    assert json.loads(json.dumps(scored.response)) == scored.response


# --- classes -------------------------------------------------------------------------------------

def _labels(scored) -> list[str]:
    return [box["label"] for box in scored.response["boxes"]]


def test_classes_filter_before_top_k_so_max_detections_counts_kept_classes(predictor):
    """The answer with classes=C and max_detections=K is the unfiltered answer's detections of C,
    first K: the filter acts before the top-k and NMS (class-aware NMS: other classes never
    suppressed those of C)."""
    base = {"score_threshold": 0.05, "mask_format": "none"}
    everything = answers(predictor, {**base, "max_detections": 1000})
    counts = {}
    for scored in everything:
        for label in _labels(scored):
            counts[label] = counts.get(label, 0) + 1
    kept = sorted(counts, key=counts.get, reverse=True)[1:3]  # not the most frequent one
    assert sum(counts[name] for name in kept) >= 4, counts
    limit = 3
    for comma_separated in (False, True):
        classes = ", ".join(kept) if comma_separated else kept
        filtered = answers(predictor, {**base, "classes": classes, "max_detections": limit})
        for full, got in zip(everything, filtered):
            want = [box for box in full.response["boxes"] if box["label"] in kept][:limit]
            assert got.response["boxes"] == want
    # and without the filter the first `limit` detections of the picture are of other classes too
    assert any(set(_labels(s)[:limit]) - set(kept) for s in everything)


def test_classes_naming_every_class_is_no_filter(predictor):
    params = {"score_threshold": 0.05, "mask_format": "none"}
    assert [s.response for s in answers(predictor, {**params, "classes": list(predictor.class_names)})] == \
        [s.response for s in answers(predictor, params)]


def test_both_runtimes_filter_alike(tiny_model_dir, tiny_onnx_model_dir):
    import mlflow_model
    from helpers import assert_same_detections
    from scoring.model_dir import ModelDir

    params = {"score_threshold": 0.05, "mask_format": "none", "classes": ["person", "car", "dog"],
              "max_detections": 5}
    got = {}
    for name, folder in (("torch", tiny_model_dir), ("onnx", tiny_onnx_model_dir)):
        predictor = mlflow_model.load_predictor(ModelDir(folder).data.path, device="cpu", batch_size=1)
        got[name] = answers(predictor, params)
    for a, b in zip(got["torch"], got["onnx"]):
        assert set(_labels(a)) <= {"person", "car", "dog"}
        assert_same_detections(a.response, b.response, share=1.0)


@pytest.mark.parametrize("params, message", [
    ({"mask_format": "mask"}, "param 'mask_format' must be one of 'polygon', 'rle', 'none'"),
    ({"mask_format": ["rle"]}, "param 'mask_format' must be one of"),
    ({"classes": []}, "param 'classes' is empty"),
    ({"classes": ""}, "param 'classes' is empty"),
    ({"classes": "person,,car"}, "param 'classes' has an empty name"),
    ({"classes": ["person", 3]}, "param 'classes' must be a list of class names"),
    ({"classes": {"person": True}}, "param 'classes' must be a list of class names"),
    ({"classes": 7}, "param 'classes' must be a list of class names"),
    ({"classes": ["person", ["car"]]}, "param 'classes' must be a list of class names"),
])
def test_bad_values_name_the_param(params, message):
    with pytest.raises(InputError, match=message):
        PredictParams().updated(params)


def test_an_unknown_class_is_refused_before_any_image_listing_the_models_classes(predictor):
    def never(key, value):
        raise AssertionError("no image is decoded for a request with a bad param")

    with pytest.raises(InputError) as refused:
        list(score_images(predictor, [(0, "x")], {"classes": ["person", "unicorn"]}, decode=never))
    message = str(refused.value)
    assert "param 'classes'" in message and "'unicorn'" in message
    assert "the model's classes: person, bicycle, car" in message


def test_params_round_trip_through_model_json():
    params = PredictParams().updated({"classes": "person, car", "mask_format": "rle"})
    assert params.classes == ("person", "car")
    stored = json.loads(json.dumps(params.as_dict()))
    assert PredictParams.from_dict(stored) == params
    assert PredictParams.from_dict(json.loads(json.dumps(PredictParams().as_dict()))) == PredictParams()


def test_the_signature_declares_both_params_and_the_rle_key(tiny_model_dir):
    from mlflow.models import Model

    signature = Model.load(str(tiny_model_dir / "MLmodel")).signature
    specs = {spec.name: spec for spec in signature.params.params}
    assert specs["mask_format"].default == "polygon" and specs["mask_format"].shape is None
    assert specs["classes"].shape == (-1,)
    assert specs["classes"].default[:3] == ["person", "bicycle", "car"] and len(specs["classes"].default) == 80
    # one {"boxes": [detection, ...]} object per image (an object, as spark_udf needs)
    detection = json.loads(signature.outputs.to_json())[0]["properties"]["boxes"]["items"]["properties"]
    assert detection["polygon"]["required"] is False and detection["rle"]["required"] is False
    assert set(detection["rle"]["properties"]) == {"size", "counts"}


LEAN_PROCESS = """
import json, sys
for name in ("torch", "torchvision", "mmcv", "mmdet", "mmengine", "pycocotools"):
    sys.modules[name] = None  # any import of them now raises ImportError
sys.path.insert(0, sys.argv[1])
import cv2
from scoring.runner import score_images
from scoring.runtimes.onnx_rtmdet import load_onnx_predictor
predictor = load_onnx_predictor(sys.argv[2])
params = {"mask_format": "rle", "classes": "person, car, dog", "score_threshold": 0.05}
[scored] = score_images(predictor, [(0, cv2.imread(sys.argv[3]))], params, decode=lambda k, v: v)
print(json.dumps(scored.response))
"""


def test_rle_and_classes_serve_without_pycocotools_or_torch(tiny_onnx_model_dir, image_files):
    """The lean ONNX serving environment has neither: its RLE answers are the same."""
    import subprocess
    import sys
    from pathlib import Path

    import mlflow_model
    from scoring.model_dir import ModelDir

    weights = ModelDir(tiny_onnx_model_dir).data.path
    root = Path(__file__).resolve().parent.parent
    result = subprocess.run([sys.executable, "-c", LEAN_PROCESS, str(root), str(weights), str(image_files[0])],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lean = json.loads(result.stdout.strip().splitlines()[-1])
    predictor = mlflow_model.load_predictor(weights, device="cpu", batch_size=1)
    [want] = score_images(predictor, [(0, cv2.imread(str(image_files[0])))],
                          {"mask_format": "rle", "classes": "person, car, dog", "score_threshold": 0.05},
                          decode=lambda key, value: value)
    assert lean["boxes"] and [b["rle"] for b in lean["boxes"]] == [b["rle"] for b in want.response["boxes"]]
    assert [b["label"] for b in lean["boxes"]] == [b["label"] for b in want.response["boxes"]]


def test_batch_jobs_refuse_an_unknown_class_before_any_file(tiny_model_dir, image_files, tmp_path):
    from mmdet_mlflow.batch import run_batch

    out = tmp_path / "out.jsonl"
    with pytest.raises(InputError, match="does not have: 'unicorn'"):
        run_batch(tiny_model_dir, image_files[0].parent, out, params={"classes": ["unicorn"]})
    assert not out.exists()
    counts = run_batch(tiny_model_dir, image_files[0].parent, out,
                       params={"classes": "person,car", "mask_format": "rle", "score_threshold": 0.05})
    assert counts["errors"] == 0 and counts["images"] == len(image_files)
    for line in out.read_text().splitlines():
        for box in json.loads(line)["prediction"]["boxes"]:
            assert box["label"] in ("person", "car") and "rle" in box
