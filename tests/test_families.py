"""The model families (``scoring.families``): each named family, and a config no named family
covers (the generic path), packaged from a checkpoint in the official layout (random weights,
class biases lifted so there is something to compare) and answering as mmdet's own
``inference_detector`` on the same picture and weights: the same count and labels, boxes within
0.5 px, scores within 1e-3, and (instance segmentation) polygons at tolerance 0 that rasterize
back onto mmdet's masks. Object-detection models answer without masks and refuse mask params,
naming their task. What is not a detector is refused at packaging.

The heavy families run on one picture, with their configs' test resize scaled down (the same
config for mmdet and for us), to keep the suite's time.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import mlflow_model
from helpers import b64, config_with_test_scale, make_official_checkpoint, scene_image, write_png
from scoring.errors import MmdetMlflowError
from scoring.families import NAMED
from scoring.model_dir import ModelDir

CLASSES = ["cat", "dog", "bird"]
SMALL_SCALE = (480, 320)
# config -> (family, task)
FAMILY_CONFIGS = {
    "rtmdet_tiny_8xb32-300e_coco": ("rtmdet", "object-detection"),
    "yolof_r50-c5_8xb8-1x_coco": ("yolof", "object-detection"),
    "vfnet_r50-mdconv-c3-c5_fpn_ms-2x_coco": ("vfnet", "object-detection"),
    "deformable-detr-refine-twostage_r50_16xb2-50e_coco": ("deformable-detr", "object-detection"),
    "sparse-rcnn_r50_fpn_300-proposals_crop-ms-480-800-3x_coco": ("sparse-rcnn", "object-detection"),
    "mask-rcnn_r50_fpn_1x_coco": ("mask-rcnn", "instance-segmentation"),
    "mask-rcnn_swin-t-p4-w7_fpn_1x_coco": ("mask-rcnn", "instance-segmentation"),
    # no named family: mmdet's own predict
    "retinanet_r18_fpn_1x_coco": ("mmdet-detection", "object-detection"),
}
# The larger published variants: always recognised with their published checkpoints; their
# answers take the same code paths as the variants above with more layers, so the comparison with
# mmdet runs on them when asked (minutes each on a small CPU, not in every run):
#   MMDET_MLFLOW_TEST_LARGER_VARIANTS=1 .venv/bin/python -m pytest tests/test_families.py
LARGER_VARIANTS = {
    "rtmdet_s_8xb32-300e_coco": ("rtmdet", "object-detection"),
    "rtmdet_m_8xb32-300e_coco": ("rtmdet", "object-detection"),
    "rtmdet_l_8xb32-300e_coco": ("rtmdet", "object-detection"),
    "rtmdet_x_8xb32-300e_coco": ("rtmdet", "object-detection"),
    "vfnet_x101-64x4d-mdconv-c3-c5_fpn_ms-2x_coco": ("vfnet", "object-detection"),
    "sparse-rcnn_r101_fpn_300-proposals_crop-ms-480-800-3x_coco": ("sparse-rcnn", "object-detection"),
}
# seed 0's untrained RTMDet-s finds nothing on the test picture: nothing to compare
SEEDS = {"rtmdet_s_8xb32-300e_coco": 1}
if os.environ.get("MMDET_MLFLOW_TEST_LARGER_VARIANTS"):
    FAMILY_CONFIGS.update(LARGER_VARIANTS)


def small_config(name: str, folder: Path) -> Path:
    """The shipped config with its test resize scaled down (the tiny RTMDet's is small already),
    as a config file of the same name."""
    if name.startswith("rtmdet_tiny"):
        from mlflow_model.configs import load_config

        path = folder / f"{name}.py"
        load_config(name).dump(str(path))
        return path
    return config_with_test_scale(name, folder, SMALL_SCALE)


@pytest.fixture(scope="module")
def picture_file(tmp_path_factory) -> Path:
    return write_png(tmp_path_factory.mktemp("pictures") / "scene.png", scene_image(320, 240, 4))


@pytest.fixture(scope="module", params=list(FAMILY_CONFIGS))
def packaged(request, tmp_path_factory):
    """(config name, config file, checkpoint, saved model folder) of one family."""
    name = request.param
    folder = tmp_path_factory.mktemp(name.split("_")[0])
    config = small_config(name, folder)
    checkpoint = make_official_checkpoint(folder / "official.pth", str(config), classes=CLASSES,
                                          seed=SEEDS.get(name, 0))
    model_dir = folder / "model"
    mlflow_model.save_model(model_dir, str(config), str(checkpoint))
    return name, config, checkpoint, model_dir


@pytest.fixture(scope="module")
def loaded(packaged):
    """The family's packaged model as MLflow loads it, loaded once for the tests that ask it."""
    import mlflow.pyfunc

    return mlflow.pyfunc.load_model(str(packaged[3]))


def mmdet_answer(config: Path, checkpoint: Path, picture: Path):
    from mmdet.apis import inference_detector, init_detector

    detector = init_detector(str(config), str(checkpoint), device="cpu")
    return inference_detector(detector, str(picture)).pred_instances


def config_settings(config: Path) -> dict:
    """Predict params equal to the config's own test settings (what inference_detector uses)."""
    from mmengine.config import Config

    from scoring.families import Family

    test_cfg = Family.detection_cfg(dict(Config.fromfile(str(config)).model.test_cfg))
    return {"score_threshold": float(test_cfg.get("score_thr", 0.0))}


def rasterize(polygons, width: int, height: int) -> np.ndarray:
    import cv2

    canvas = np.zeros((height, width), np.uint8)
    points = [np.round(np.asarray(seg).reshape(-1, 2) * [width, height]).astype(np.int32) for seg in polygons]
    if points:
        cv2.fillPoly(canvas, points, 1)
    return canvas.astype(bool)



def paired_with_mmdets(answer: list[dict], reference, width: int, height: int) -> list[tuple[int, int]]:
    """Each of our answers' rank with the index of the one of mmdet's it is (the same label, the score
    within 1e-3, the box within 0.5 px), one to one and rank for rank, but for answers whose
    scores tie within 1e-3, which either side may order either way (float rounding decides)."""
    scores, labels = reference.scores.numpy(), reference.labels.numpy()
    boxes = np.clip(reference.bboxes.numpy(), 0, [width, height, width, height])
    unpaired, pairs = list(range(len(reference))), []
    for rank, got in enumerate(answer):
        corners = np.asarray([got["box"][k] for k in ("topX", "topY", "bottomX", "bottomY")])
        corners = corners * [width, height, width, height]
        index = next((i for i in unpaired if CLASSES[labels[i]] == got["label"]
                      and abs(float(scores[i]) - got["score"]) <= 1e-3
                      and np.abs(corners - boxes[i]).max() <= 0.5), None)
        assert index is not None, f"our answer {rank} {got} is none of mmdet's: {reference[rank]}"
        assert abs(float(scores[index]) - float(scores[rank])) <= 2e-3  # rank for rank but ties
        unpaired.remove(index)
        pairs.append((rank, index))
    return pairs

def test_each_family_answers_as_mmdets_inference_detector(packaged, loaded, picture_file):
    name, config, checkpoint, model_dir = packaged
    family, task = FAMILY_CONFIGS[name]
    info = json.loads((model_dir / "model" / "model.json").read_text())
    assert (info["family"], info["task"]) == (family, task)
    model = loaded
    params = config_settings(model_dir / "model" / "config.py")
    if task == "instance-segmentation":
        params["polygon_tolerance"] = 0.0
    answer = model.predict(pd.DataFrame({"image": [b64(picture_file)]}), params=params)["boxes"][0]
    # the config as saved: its heads sized for the checkpoint's classes; best first, as we
    # answer (Sparse R-CNN's top-k is unsorted)
    reference = mmdet_answer(model_dir / "model" / "config.py", checkpoint, picture_file)
    reference = reference[np.argsort(-reference.scores.numpy(), kind="stable")]
    height, width = 240, 320
    assert len(answer) == len(reference) > 0
    if task == "instance-segmentation":
        from scoring.runner import score_images

        raw = model.get_raw_model()
        found = next(score_images(raw, [(0, picture_file.read_bytes())], params, keep_images=True))
        masks = list(found.detections.iter_masks(raw.default_params.mask_threshold))
    ious = []
    for rank, index in paired_with_mmdets(answer, reference, width, height):
        got = answer[rank]
        if task == "object-detection":
            assert set(got) == {"box", "label", "score"}
        else:
            mask = reference.masks[index].numpy()
            assert np.array_equal(masks[rank], mask)  # pasted per box, pixel for pixel mmdet's
            if mask.sum() >= 100:
                drawn = rasterize(got["polygon"], width, height)
                ious.append((drawn & mask).sum() / (drawn | mask).sum())
    if task == "instance-segmentation":
        assert ious and float(np.median(ious)) >= 0.95, ious


def test_the_model_records_its_task_where_mlflow_and_azure_read_it(packaged):
    from mlflow.models import Model

    name, _, _, model_dir = packaged
    family, task = FAMILY_CONFIGS[name]
    mlmodel = Model.load(str(model_dir))
    assert mlmodel.metadata["base_model_task"] == f"image-{task}"
    assert mlmodel.flavors["mmdet"]["info"] == "model/model.json"  # model.json says what it is
    assert ModelDir(model_dir).read_info()["task"] == task
    detection = mlmodel.signature.outputs.to_dict()[0]["properties"]["boxes"]["items"]["properties"]
    params = {spec.name: spec.default for spec in mlmodel.signature.params.params}
    if task == "object-detection":
        assert set(detection) == {"box", "label", "score"}
        assert params["mask_format"] == "none"
        assert "mask_threshold" not in params and "polygon_tolerance" not in params
    else:
        assert {"polygon", "rle"} <= set(detection) and params["mask_format"] == "polygon"


def test_an_object_detection_model_refuses_mask_params_naming_its_task(packaged, loaded, picture_file):
    from mlflow.exceptions import MlflowException

    name = packaged[0]
    if FAMILY_CONFIGS[name][1] != "object-detection":
        return
    model = loaded
    frame = pd.DataFrame({"image": [b64(picture_file)]})
    for params, named in (({"mask_format": "polygon"}, "mask_format 'polygon'"),
                          ({"mask_format": "rle"}, "mask_format 'rle'"),
                          ({"mask_threshold": 0.4}, "'mask_threshold'")):
        with pytest.raises(MlflowException, match="this model does object-detection") as refused:
            model.predict(frame, params=params)
        assert named in str(refused.value)


def test_the_classes_param_acts_before_the_cut_to_max_detections(loaded, picture_file):
    """``classes`` with ``max_detections`` m answers the model's best m of those classes: the
    answers at a large ``max_detections`` (beyond what some heads can give: capped, not an
    error), filtered to the class and cut to m. Not the best m of all classes, filtered."""
    model = loaded
    frame = pd.DataFrame({"image": [b64(picture_file)]})
    settings = {"score_threshold": 0.0, "mask_format": "none"}  # every answer the head gives
    everything = model.predict(frame, params={**settings, "max_detections": 10_000})["boxes"][0]
    counts = {name: sum(answer["label"] == name for answer in everything) for name in CLASSES}
    few = min(3, max(counts.values()))  # the untrained RTMDet's NMS leaves one answer a class
    assert few > 0
    # the class the best few answers hold least of, among those with at least a few
    top = [answer["label"] for answer in everything[:few]]
    asked = min((name for name in CLASSES if counts[name] >= few), key=top.count)
    assert top.count(asked) < few  # filtering the best few of all classes would leave fewer
    expected = [answer for answer in everything if answer["label"] == asked][:few]
    got = model.predict(frame, params={**settings, "classes": [asked], "max_detections": few})["boxes"][0]
    assert len(got) == len(expected) == few
    for mine, theirs in zip(got, expected):
        assert mine["label"] == asked
        assert mine["score"] == pytest.approx(theirs["score"], abs=1e-6)
        # answers of equal score may come in either order (an untrained head scores many alike)
        alike = [answer["box"] for answer in everything
                 if answer["label"] == asked and abs(answer["score"] - mine["score"]) <= 1e-6]
        assert any(mine["box"] == pytest.approx(box, abs=1e-6) for box in alike)


def test_a_batch_answers_as_pictures_one_at_a_time():
    """Two pictures of different sizes in one forward pass: the answers of each alone (batches
    pad; the boxes agree within float noise)."""
    import tempfile

    from scoring.runner import score_images

    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        checkpoint = make_official_checkpoint(folder / "rtmdet.pth", "rtmdet_tiny_8xb32-300e_coco",
                                              classes=CLASSES)
        mlflow_model.save_model(folder / "model", "rtmdet_tiny_8xb32-300e_coco", str(checkpoint))
        alone = mlflow_model.load_predictor(folder / "model" / "model", device="cpu", batch_size=1)
        batched = mlflow_model.load_predictor(folder / "model" / "model", device="cpu", batch_size=2)
    pictures = [(0, scene_image(320, 240, 1)), (1, scene_image(200, 300, 2))]
    params = {"score_threshold": 0.05}
    one = [s.response["boxes"] for s in score_images(alone, pictures, params, decode=lambda k, v: v)]
    two = [s.response["boxes"] for s in score_images(batched, pictures, params, decode=lambda k, v: v)]
    assert sum(map(len, one)) > 0
    for a, b in zip(one, two):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert x["label"] == y["label"] and x["score"] == pytest.approx(y["score"], abs=1e-3)


@pytest.mark.parametrize("name", list(LARGER_VARIANTS))
def test_the_larger_variants_are_recognised_with_their_published_checkpoints(name):
    from mlflow_model.configs import load_config, official_checkpoint
    from scoring.families import family_of_config

    assert family_of_config(load_config(name).model).name == LARGER_VARIANTS[name][0]
    published = official_checkpoint(name)
    assert published.url.startswith("https://download.openmmlab.com/") and len(published.sha256_prefix) == 8


def test_yolofs_published_checkpoint_is_found_under_its_old_name():
    from mlflow_model.configs import official_checkpoint

    published = official_checkpoint("yolof_r50-c5_8xb8-1x_coco")
    assert "yolof_r50_c5_8x8_1x_coco" in published.url and published.sha256_prefix == "8e864411"


@pytest.mark.parametrize("config, named", [
    ("panoptic-fpn_r50_fpn_1x_coco", "PanopticFPN"),
    ("bytetrack_yolox_x_8xb4-amp-80e_crowdhuman-mot17halftrain_test-mot17halfval", "ByteTrack"),
])
def test_what_is_not_an_image_detector_is_refused_naming_what_is_supported(config, named, tmp_path):
    with pytest.raises(MmdetMlflowError) as refused:
        mlflow_model.save_model(tmp_path / "m", config, str(tmp_path / "none.pth"))
    assert named in str(refused.value) and "object detector or instance segmenter" in str(refused.value)
    assert not (tmp_path / "m").exists()


def test_a_text_file_is_not_a_config(tmp_path):
    text = tmp_path / "notes.py"
    text.write_text("this is not python = = =\n")
    with pytest.raises(MmdetMlflowError, match="is not an mmdet config"):
        mlflow_model.save_model(tmp_path / "m", str(text), str(tmp_path / "none.pth"))
    assert not (tmp_path / "m").exists()


def test_a_runtime_the_family_lacks_is_refused_before_anything_is_written(tmp_path):
    with pytest.raises(MmdetMlflowError, match=r"VFNet models have no 'onnx' runtime here \(runtimes: torch\)"):
        mlflow_model.save_model(tmp_path / "m", "vfnet_r50-mdconv-c3-c5_fpn_ms-2x_coco", "official",
                                runtime="onnx")
    assert not (tmp_path / "m").exists()


def test_a_checkpoint_of_another_family_or_class_count_is_named(tmp_path):
    yolof = make_official_checkpoint(tmp_path / "yolof.pth", "rtmdet_tiny_8xb32-300e_coco", classes=CLASSES)
    with pytest.raises(MmdetMlflowError, match="trained for 3 classes but the model is set up for 5"):
        mlflow_model.save_model(tmp_path / "a", "rtmdet_tiny_8xb32-300e_coco", str(yolof),
                                classes=["a", "b", "c", "d", "e"])
    with pytest.raises(MmdetMlflowError, match="looks like a RTMDet checkpoint .* the config is YOLOF's"):
        mlflow_model.save_model(tmp_path / "b", "yolof_r50-c5_8xb8-1x_coco", str(yolof))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.parametrize("name", [name for family in NAMED for name in family.shipped_configs])
def test_a_dumped_config_reads_back_as_the_config(name, tmp_path):
    """A model folder's config.py (mmengine's dump of ``load_config``'s config, unformatted) is
    read by mmengine to the values it was written from, for every config a named family ships
    (sized for 3 classes, as packaging does)."""
    from mmengine.config import Config

    from mlflow_model.configs import load_config

    cfg = load_config(name, num_classes=3)
    cfg.dump(str(tmp_path / "config.py"))
    assert Config.fromfile(str(tmp_path / "config.py")).to_dict() == cfg.to_dict()
