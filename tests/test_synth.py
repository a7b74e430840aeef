"""The synthetic fridge-objects set: deterministic, annotated with the visible part of each
object, written in every format with paths that resolve."""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from pycocotools import mask as mask_utils

from mmdet_mlflow import cli
from mmdet_mlflow.data import OBJECT_DETECTION, load_dataset
from mmdet_mlflow.synth import (CLASSES, MIN_VISIBLE_FRACTION, OBJECT_HEIGHT, OBJECTS_PER_IMAGE, SceneStyle, SynthError,
                                 generate, scene_instances, synth_scene)


def all_files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("synth") / "fridge"
    assert cli.main(["synth", "--output", str(folder), "--num-images", "10", "--seed", "5"]) == 0
    return folder


def test_same_seed_same_bytes_other_seed_other_images(synth_dir, tmp_path):
    generate(tmp_path / "again", num_images=10, seed=5, progress=False)
    assert all_files(tmp_path / "again") == all_files(synth_dir)
    generate(tmp_path / "other", num_images=10, seed=6, progress=False)
    other = all_files(tmp_path / "other")
    assert other.keys() == all_files(synth_dir).keys()
    assert other["images/0001.jpg"] != all_files(synth_dir)["images/0001.jpg"]


def test_layout_and_every_form_loads_the_same_validated_data(synth_dir):
    assert sorted(p.name for p in synth_dir.iterdir()) == [
        "images", "preview.png", "train", "train.coco.json", "train.jsonl", "validation",
        "validation.coco.json", "validation.jsonl"]
    preview = cv2.imread(str(synth_dir / "preview.png"))
    assert preview.shape == (600, 1200, 3)               # 2 rows x 3 columns of 400x300 tiles
    assert len(list((synth_dir / "images").glob("*.jpg"))) == 10
    splits = {}
    for split in ("train", "validation"):
        first = json.loads((synth_dir / f"{split}.jsonl").read_text().splitlines()[0])
        assert first["image_url"].startswith("images/") and first["image_details"]["format"] == "jpg"
        assert "file: ../" in (synth_dir / split / "MLTable").read_text()
        forms = [load_dataset(synth_dir / f"{split}.jsonl", classes=CLASSES),   # validate=True
                 load_dataset(synth_dir / split, classes=CLASSES),
                 load_dataset(synth_dir / f"{split}.coco.json")]
        assert forms[2].classes == CLASSES
        for form in forms[1:]:
            assert [r.path for r in form.images] == [r.path for r in forms[0].images]
            assert [[i.label for i in r.instances] for r in form.images] == \
                [[i.label for i in r.instances] for r in forms[0].images]
        assert all(r.path.parent == synth_dir / "images" for r in forms[0].images)
        splits[split] = {r.path.name for r in forms[0].images}
    assert len(splits["train"]) == 8 and len(splits["validation"]) == 2
    assert not splits["train"] & splits["validation"]


def test_objects_are_sized_and_counted_as_intended():
    labels = set()
    for index in range(30):
        scene = synth_scene(0, index)
        height, width = scene.image.shape[:2]
        assert 480 <= width <= 640 and 360 <= height <= 480 and scene.image.dtype == np.uint8
        assert OBJECTS_PER_IMAGE[0] <= len(scene.objects) <= OBJECTS_PER_IMAGE[1]
        for obj in scene.objects:
            labels.add(obj.label)
            ys, xs = np.nonzero(obj.mask)
            assert max(ys.ptp(), xs.ptp()) + 1 <= OBJECT_HEIGHT[1] + 10  # a few degrees of tilt
    assert labels == set(CLASSES)


def test_masks_are_the_visible_parts_and_polygons_trace_them():
    occluded = 0
    for index in range(30):
        scene = synth_scene(1, index)
        height, width = scene.image.shape[:2]
        assert np.sum([o.mask for o in scene.objects], axis=0).max() <= 1   # visible parts are disjoint
        instances = scene_instances(scene)
        assert [i.label for i in instances] == [o.label for o in scene.objects]
        for obj, inst in zip(scene.objects, instances):
            visible = obj.mask.sum()
            assert visible >= MIN_VISIBLE_FRACTION * (visible + obj.hidden_pixels)
            occluded += obj.hidden_pixels > 0
            rle = mask_utils.merge(mask_utils.frPyObjects(inst.polygons, height, width))
            traced = mask_utils.decode(rle).astype(bool)
            iou = (traced & obj.mask).sum() / (traced | obj.mask).sum()
            assert iou > 0.9, (index, obj.label, iou)
    assert occluded >= 5                                # occlusion is common, not a corner case


def test_difficulty_is_a_style_the_command_takes(tmp_path, capsys):
    """Larger objects and less occlusion: what the demo's recipe search varies."""
    style = SceneStyle(object_size=(120, 240), min_visible_fraction=0.7)
    for index in range(20):
        scene = synth_scene(2, index, style)
        for obj in scene.objects:
            visible = obj.mask.sum()
            assert visible >= 0.7 * (visible + obj.hidden_pixels)
            ys, xs = np.nonzero(obj.mask)
            if not obj.hidden_pixels:   # whole and upright within a few degrees' tilt
                assert 110 <= max(np.ptp(ys), np.ptp(xs)) + 1 <= 250
    folder = tmp_path / "easy"
    assert cli.main(["synth", "--output", str(folder), "--num-images", "3", "--seed", "2",
                     "--object-size", "120", "240", "--min-visible-fraction", "0.7"]) == 0
    written = load_dataset(folder / "train.jsonl")
    first = written.images[0]   # images/0001.jpg is scene 0
    expected = scene_instances(synth_scene(2, int(first.path.stem) - 1, style))
    assert [i.label for i in first.instances] == [i.label for i in expected]

    with pytest.raises(SynthError, match="object size"):
        SceneStyle(object_size=(300, 100))
    assert cli.main(["synth", "--output", str(tmp_path / "bad"), "--min-visible-fraction", "1.5"]) != 0
    assert "min visible fraction" in capsys.readouterr().err


def test_mosaic_pictures_are_ordinary_scenes_side_by_side(tmp_path, capsys):
    """--mosaic N: large pictures with the usual objects (what tiling is for): scene k of picture
    i is scene i * N^2 + k of the ordinary set, its annotations shifted with it."""
    from mmdet_mlflow.synth import MAX_MOSAIC, MOSAIC_CELL, mosaic_scene

    image, instances = mosaic_scene(3, 1, 2)
    cell_w, cell_h = MOSAIC_CELL
    assert image.shape == (2 * cell_h, 2 * cell_w, 3)
    expected = []
    for k in range(4):
        scene = synth_scene(3, 4 + k, SceneStyle())
        top, left = (k // 2) * cell_h, (k % 2) * cell_w
        height, width = scene.image.shape[:2]
        assert np.array_equal(image[top:top + height, left:left + width], scene.image)
        for inst in scene_instances(scene):
            expected.append((inst.label, [(np.reshape(p, (-1, 2)) + (left, top)).ravel().tolist()
                                          for p in inst.polygons]))
    assert [(i.label, i.polygons) for i in instances] == expected
    for inst in instances:  # objects keep their size: each within its own cell
        x, y, w, h = inst.bbox()
        assert max(w, h) <= OBJECT_HEIGHT[1] + 10
        assert int(x // cell_w) == int((x + w - 1) // cell_w) and int(y // cell_h) == int((y + h - 1) // cell_h)

    folder = tmp_path / "large"
    assert cli.main(["synth", "--output", str(folder), "--num-images", "3", "--seed", "3",
                     "--mosaic", "2"]) == 0
    written = load_dataset(folder / "train.jsonl", classes=CLASSES)
    first = written.images[0]
    assert (first.width, first.height) == (2 * cell_w, 2 * cell_h)
    index = int(first.path.stem) - 1
    assert [i.label for i in first.instances] == [i.label for i in mosaic_scene(3, index, 2)[1]]
    again = tmp_path / "again"
    generate(again, num_images=3, seed=3, mosaic=2, progress=False)
    assert all_files(again) == all_files(folder)
    assert cli.main(["synth", "--output", str(tmp_path / "bad"), "--mosaic", str(MAX_MOSAIC + 1)]) != 0
    assert "mosaic" in capsys.readouterr().err


def test_object_detection_set_has_the_same_pictures_and_the_polygons_boxes(synth_dir, tmp_path, capsys):
    """--task object-detection: the same pictures, split and objects as the instance-segmentation
    set of the same seed, each annotated with its polygons' box alone, in every format."""
    folder = tmp_path / "od"
    assert cli.main(["synth", "--output", str(folder), "--num-images", "10", "--seed", "5",
                     "--task", "object-detection"]) == 0
    assert "train: 8 images" in capsys.readouterr().out
    od_files, is_files = all_files(folder), all_files(synth_dir)
    assert od_files.keys() == is_files.keys()
    assert all(od_files[name] == is_files[name] for name in od_files if name.startswith("images/"))
    for split in ("train", "validation"):
        rows = [json.loads(line) for line in (folder / f"{split}.jsonl").read_text().splitlines()]
        assert all("polygon" not in label and {"topX", "topY", "bottomX", "bottomY"} <= set(label)
                   for r in rows for label in r["label"])
        annotations = json.loads((folder / f"{split}.coco.json").read_text())["annotations"]
        assert annotations and all("segmentation" not in a for a in annotations)
        segmented = load_dataset(synth_dir / f"{split}.jsonl", classes=CLASSES)
        for form in (folder / f"{split}.jsonl", folder / split, folder / f"{split}.coco.json"):
            boxed = load_dataset(form, classes=CLASSES)
            assert boxed.task == OBJECT_DETECTION
            assert [r.path.name for r in boxed.images] == [r.path.name for r in segmented.images]
            for a, b in zip(boxed.images, segmented.images):
                assert [i.label for i in a.instances] == [i.label for i in b.instances]
                assert all(i.polygons is None for i in a.instances)
                np.testing.assert_allclose([i.bbox() for i in a.instances], [i.bbox() for i in b.instances],
                                           atol=1e-3)
    assert cv2.imread(str(folder / "preview.png")).shape == (600, 1200, 3)
    again = tmp_path / "again"
    generate(again, num_images=10, seed=5, progress=False, task=OBJECT_DETECTION)
    assert all_files(again) == od_files
    with pytest.raises(SystemExit):
        cli.main(["synth", "--output", str(tmp_path / "bad"), "--task", "classification"])
    assert "invalid choice: 'classification'" in capsys.readouterr().err
