"""Data formats: AutoML JSONL, MLTable and COCO read into one form, converted every way, and
validated with errors that name the file, the line (or record) and the field."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from mmdet_mlflow import cli
from mmdet_mlflow.data import (INSTANCE_SEGMENTATION, OBJECT_DETECTION, DataError, Dataset, ImageRecord, Instance,
                               MAX_REPORTED_PROBLEMS, load_dataset, response_boxes, to_coco, to_jsonl_rows,
                               write_coco, write_jsonl, write_mltable)
from mmdet_mlflow.synth import generate


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("synth")
    generate(folder, num_images=6, seed=11, progress=False)
    return folder


@pytest.fixture(scope="module")
def od_synth_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("synth-od")
    generate(folder, num_images=6, seed=11, progress=False, task=OBJECT_DETECTION)
    return folder


def write_image(path: Path, width: int, height: int) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (width, height), (120, 130, 140)).save(path)
    return path


def write_lines(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def row(url="images/a.png", width=200, height=100, labels=None):
    return {"image_url": url, "image_details": {"format": "png", "width": width, "height": height},
            "label": labels if labels is not None else
            [{"label": "can", "isCrowd": 0, "polygon": [[0.1, 0.1, 0.5, 0.1, 0.5, 0.5]]}]}


def od_row(url="images/a.png", width=200, height=100, boxes=None):
    """An AutoML object-detection row: labels with a normalized box and no polygon."""
    return row(url, width, height, labels=boxes if boxes is not None else
               [{"label": "can", "topX": 0.1, "topY": 0.2, "bottomX": 0.5, "bottomY": 0.6, "isCrowd": 0}])


def assert_same_content(a: Dataset, b: Dataset, tolerance_px: float = 1e-3):
    assert a.classes == b.classes and a.task == b.task
    assert [r.path for r in a.images] == [r.path for r in b.images]
    for ra, rb in zip(a.images, b.images):
        assert (ra.width, ra.height) == (rb.width, rb.height)
        assert [(i.label, i.iscrowd) for i in ra.instances] == [(i.label, i.iscrowd) for i in rb.instances]
        for ia, ib in zip(ra.instances, rb.instances):
            np.testing.assert_allclose(ia.bbox(), ib.bbox(), atol=tolerance_px)
            if a.task == OBJECT_DETECTION:
                assert ia.polygons is None and ib.polygons is None
                continue
            assert len(ia.polygons) == len(ib.polygons)
            for sa, sb in zip(ia.polygons, ib.polygons):
                np.testing.assert_allclose(sa, sb, atol=tolerance_px)


# ------------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("data", ["synth_dir", "od_synth_dir"], ids=["instance-segmentation", "object-detection"])
def test_round_trips_jsonl_coco_mltable_keep_instances_and_pixels(data, request, tmp_path):
    synth_dir = request.getfixturevalue(data)
    original = load_dataset(synth_dir / "train.jsonl")
    assert original.classes == ["can", "carton", "milk_bottle", "water_bottle"]
    assert sum(len(r.instances) for r in original.images) > 0

    coco = load_dataset(write_coco(original, tmp_path / "a.coco.json"))
    assert_same_content(original, coco)
    again = load_dataset(write_jsonl(coco, tmp_path / "b.jsonl"))
    assert_same_content(original, again)
    table = load_dataset(write_mltable(tmp_path / "table", tmp_path / "b.jsonl"))
    assert_same_content(original, table)
    # the files synth wrote describe the same data in all three forms
    assert_same_content(original, load_dataset(synth_dir / "train.coco.json"))
    assert_same_content(original, load_dataset(synth_dir / "train"))


def test_to_coco_areas_and_boxes_follow_pycocotools(synth_dir):
    dataset = load_dataset(synth_dir / "validation.coco.json")
    coco = to_coco(dataset)
    assert [a["id"] for a in coco["annotations"]] == list(range(1, len(coco["annotations"]) + 1))
    size = {im["id"]: (im["height"], im["width"]) for im in coco["images"]}
    for ann in coco["annotations"]:
        h, w = size[ann["image_id"]]
        rle = mask_utils.merge(mask_utils.frPyObjects(ann["segmentation"], h, w))
        assert ann["area"] == float(mask_utils.area(rle))
        points = np.concatenate([np.reshape(s, (-1, 2)) for s in ann["segmentation"]])
        x0, y0 = points.min(0)
        assert ann["bbox"] == pytest.approx([x0, y0, *(points.max(0) - (x0, y0))])
    assert all(Path(im["file_name"]).is_absolute() and Path(im["file_name"]).is_file() for im in coco["images"])


def coco_doc(tmp_path: Path) -> Path:
    """COCO with non-contiguous ids, polygon, compressed and uncompressed RLE annotations."""
    write_image(tmp_path / "pics" / "x.png", 64, 48)
    write_image(tmp_path / "pics" / "y.png", 32, 40)
    mask = np.zeros((48, 64), np.uint8, order="F")
    mask[10:30, 5:25] = 1
    mask[12:20, 40:50] = 1                                       # two parts
    compressed = mask_utils.encode(mask)
    compressed["counts"] = compressed["counts"].decode()
    doc = {
        "images": [{"id": 42, "file_name": "pics/x.png", "width": 64, "height": 48},
                   {"id": 7, "file_name": "pics/y.png", "width": 32, "height": 40}],
        "categories": [{"id": 9, "name": "zebra"}, {"id": 3, "name": "apple"}],
        "annotations": [
            {"id": 100, "image_id": 42, "category_id": 3, "iscrowd": 0,
             "segmentation": [[1, 1, 20, 1, 20, 15, 1, 15]], "area": 266, "bbox": [1, 1, 19, 14]},
            {"id": 101, "image_id": 42, "category_id": 9, "iscrowd": 1, "segmentation": compressed},
            {"id": 102, "image_id": 7, "category_id": 9, "iscrowd": 1,
             "segmentation": {"size": [40, 32], "counts": [100, 50, 1130]}},
        ]}
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(doc, indent=2))               # pretty-printed, as people write it
    return path


def test_coco_image_and_category_ids_and_rle_are_kept(tmp_path):
    path = coco_doc(tmp_path)
    dataset = load_dataset(path)
    assert dataset.classes == ["zebra", "apple"] and dataset.category_ids == [9, 3]
    assert [r.image_id for r in dataset.images] == [42, 7]
    assert dataset.images[0].path == tmp_path / "pics" / "x.png"
    coco = to_coco(dataset)
    assert [im["id"] for im in coco["images"]] == [42, 7]
    assert coco["categories"] == [{"id": 9, "name": "zebra"}, {"id": 3, "name": "apple"}]
    assert [(a["image_id"], a["category_id"], a["iscrowd"]) for a in coco["annotations"]] == \
        [(42, 3, 0), (42, 9, 1), (7, 9, 1)]
    original = json.loads(path.read_text())["annotations"]
    assert coco["annotations"][1]["segmentation"] == original[1]["segmentation"]   # RLE as read
    assert coco["annotations"][1]["area"] == 20 * 20 + 8 * 10
    assert coco["annotations"][1]["bbox"] == [5.0, 10.0, 45.0, 20.0]
    assert coco["annotations"][2]["area"] == 50
    # written and read back: the same ids
    again = to_coco(load_dataset(write_coco(dataset, tmp_path / "out" / "copy.json")))
    assert [im["id"] for im in again["images"]] == [42, 7]
    assert [c["id"] for c in again["categories"]] == [9, 3]
    # classes given in another order: ids follow their names
    reordered = load_dataset(path, classes=["apple", "zebra"])
    assert reordered.category_ids == [3, 9]


def test_coco_rle_to_jsonl_keeps_the_mask(tmp_path):
    dataset = load_dataset(coco_doc(tmp_path))
    back = load_dataset(write_jsonl(dataset, tmp_path / "rle.jsonl"))
    rle = dataset.images[0].instances[1].rle
    truth = mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode()}).astype(bool)
    polygons = back.images[0].instances[1].polygons
    assert len(polygons) == 2                                     # both parts survive
    traced = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(polygons, 48, 64))).astype(bool)
    assert (traced & truth).sum() / (traced | truth).sum() > 0.85  # contours run on pixel centres


def test_jsonl_without_coco_ids_gets_1_to_n(tmp_path):
    write_image(tmp_path / "images" / "a.png", 200, 100)
    dataset = load_dataset(write_lines(tmp_path / "t.jsonl", [row(), row(labels=[])]))
    coco = to_coco(dataset)
    assert [im["id"] for im in coco["images"]] == [1, 2]
    assert coco["categories"] == [{"id": 1, "name": "can"}]
    assert coco["annotations"][0]["segmentation"] == [[20.0, 10.0, 100.0, 10.0, 100.0, 50.0]]
    assert coco["annotations"][0]["bbox"] == [20.0, 10.0, 80.0, 40.0]


# ------------------------------------------------------------------------------- image paths


def test_image_paths_resolve_against_the_annotation_folder(tmp_path):
    data = tmp_path / "data"
    a = write_image(data / "images" / "a.png", 200, 100)
    b = write_image(tmp_path / "elsewhere" / "b.png", 200, 100)
    c = write_image(data / "fridge" / "images" / "c.png", 200, 100)
    d = write_image(data / "images" / "d.png", 200, 100)
    rows = [row("images/a.png"), row("../elsewhere/b.png"), row(str(a)),
            row("azureml://subscriptions/s/resourcegroups/g/workspaces/w/datastores/blob/paths/fridge/images/c.png"),
            row("AmlDatastore://workspaceblobstore/some/where/images/d.png")]
    jsonl = write_lines(data / "train.jsonl", rows)
    assert [r.path for r in load_dataset(jsonl).images] == [a, b, a, c, d]
    # an MLTable in a sibling folder reads ../train.jsonl; images still resolve against data/
    table = write_mltable(data / "train", jsonl)
    assert (table / "MLTable").read_text().count("file: ../train.jsonl") == 1
    assert [r.path for r in load_dataset(table).images] == [a, b, a, c, d]
    assert [r.path for r in load_dataset(table / "MLTable").images] == [a, b, a, c, d]


def test_confined_image_paths_stay_in_the_annotation_folder(tmp_path):
    """By default an image may be anywhere (the test above); confined (the CLI's
    --confine-images, the Azure fine-tune component), only inside the annotation file's folder."""
    data = tmp_path / "data"
    a = write_image(data / "images" / "a.png", 200, 100)
    write_image(tmp_path / "elsewhere" / "b.png", 200, 100)
    inside = [row("images/a.png"), row(str(a)), row("images/../images/a.png"), row(f"file://{a}")]
    assert [r.path for r in load_dataset(write_lines(data / "ok.jsonl", inside), confine_images=True).images] == [a] * 4
    outside = ["../elsewhere/b.png", str(tmp_path / "elsewhere" / "b.png"), f"file://{tmp_path}/elsewhere/b.png",
               "images/../../elsewhere/b.png"]
    jsonl = write_lines(data / "t.jsonl", [row(url) for url in outside])
    with pytest.raises(DataError) as caught:
        load_dataset(jsonl, confine_images=True)
    assert len(caught.value.problems) == len(outside)
    for line, problem in enumerate(caught.value.problems, 1):
        assert problem.startswith(f"{jsonl}:{line}: image_url: ") and f"outside the data folder {data}" in problem

    coco = coco_doc(data)
    doc = json.loads(coco.read_text())
    doc["images"][0]["file_name"] = "../elsewhere/b.png"
    coco.write_text(json.dumps(doc))
    with pytest.raises(DataError, match=r"images\[0\] \(id 42\): file_name: .*outside the data folder"):
        load_dataset(coco, confine_images=True)


def test_a_datastore_uri_never_leaves_the_annotation_folder(tmp_path):
    data = tmp_path / "data"
    write_image(tmp_path / "secret.png", 200, 100)
    data.mkdir()
    jsonl = write_lines(data / "t.jsonl", [row("AmlDatastore://workspaceblobstore/../secret.png")])
    with pytest.raises(DataError, match="outside the data folder"):
        load_dataset(jsonl)


def write_png_header(path: Path, width: int, height: int) -> Path:
    """A PNG that claims ``width`` x ``height`` pixels and holds none (a decompression bomb's
    header: PIL refuses it on opening, before decoding anything)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))
    return path


def test_a_decompression_bomb_is_a_data_error_naming_the_file(tmp_path):
    bomb = write_png_header(tmp_path / "images" / "bomb.png", 30000, 30000)
    jsonl = write_lines(tmp_path / "t.jsonl", [row("images/bomb.png", 30000, 30000)])
    with pytest.raises(DataError) as caught:
        load_dataset(jsonl)
    assert str(caught.value).startswith(f"{jsonl}:1: image_url: image {bomb} is too large to decode safely")


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "TIFF"])
def test_a_training_picture_cut_short_is_a_data_error_naming_the_file(tmp_path, fmt):
    # mmdet's loading (cv2.imdecode) trains on a cut baseline JPEG's missing rows as whatever
    # memory held: the validation refuses it, naming the file, as it does other bad files
    whole = write_image(tmp_path / "images" / f"a.{fmt.lower()}", 200, 100)
    from PIL import Image

    Image.effect_noise((200, 100), 60).convert("RGB").save(whole, fmt)
    cut = tmp_path / "images" / f"cut.{fmt.lower()}"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size * 2 // 3])
    jsonl = write_lines(tmp_path / "t.jsonl", [row(f"images/a.{fmt.lower()}"), row(f"images/cut.{fmt.lower()}")])
    with pytest.raises(DataError) as caught:
        load_dataset(jsonl)
    assert str(caught.value).startswith(f"{jsonl}:2: image_url: cannot decode image {cut}: "
                                        "the image data ends early")


def test_hand_written_mltable_with_azure_layout(tmp_path):
    write_image(tmp_path / "images" / "a.png", 200, 100)
    write_lines(tmp_path / "train_annotations.jsonl", [row()])
    (tmp_path / "MLTable").write_text(
        "paths:\n  - file: ./train_annotations.jsonl\ntransformations:\n  - read_json_lines:\n"
        "        encoding: utf8\n        invalid_lines: error\n        include_path_column: false\n"
        "  - convert_column_types:\n      - columns: image_url\n        column_type: stream_info\n")
    assert len(load_dataset(tmp_path).images[0].instances) == 1


@pytest.mark.parametrize("text, problem", [
    (None, "has no MLTable file"),
    ("paths: []\n", "paths: missing or empty"),
    ("paths:\n  - file: ./nope.jsonl\ntransformations:\n  - read_json_lines: {}\n", "file not found"),
    ("paths:\n  - file: ./t.jsonl\ntransformations:\n  - read_delimited: {}\n", "no read_json_lines"),
])
def test_bad_mltable_is_named(tmp_path, text, problem):
    write_lines(tmp_path / "t.jsonl", [row()])
    if text is not None:
        (tmp_path / "MLTable").write_text(text)
    with pytest.raises(DataError, match=problem):
        load_dataset(tmp_path)


# ------------------------------------------------------------------------------- validation


JSONL_ERRORS = [  # (row, classes, field, problem)
    (row("images/missing.png"), None, "image_url", "image file not found"),
    (row("images/garbage.png"), None, "image_url", "cannot decode image"),
    (row(labels=[{"label": "cheese", "isCrowd": 0, "polygon": [[0.1, 0.1, 0.5, 0.1, 0.5, 0.5]]}]),
     ["can"], "label[0].label", "unknown label 'cheese'"),
    (row(labels=[{"label": " ", "isCrowd": 0, "polygon": [[0.1, 0.1, 0.5, 0.1, 0.5, 0.5]]}]),
     None, "label[0].label", "missing or empty"),
    (row(labels=[{"label": "can", "isCrowd": 0, "polygon": [[0.1, 0.1, 0.5, 0.1]]}]),
     None, "label[0].polygon[0]", "2 point(s): a polygon needs at least 3"),
    (row(labels=[{"label": "can", "isCrowd": 0, "polygon": [[0.1, 0.1, 0.5, 0.1, 0.5, 0.5], [10, 20, 30, 20, 30, 40]]}]),
     None, "label[0].polygon[1]", "outside 0..1"),
    (row(labels=[{"label": "can", "isCrowd": 0, "polygon": []}]), None, "label[0].polygon", "missing or empty"),
    (row(width=201), None, "image_details.width/height", "say 201x100 but"),
]


@pytest.mark.parametrize("bad, classes, fld, problem", JSONL_ERRORS,
                         ids=["missing", "undecodable", "unknown-label", "empty-label", "two-points",
                              "outside", "no-polygon", "size"])
def test_each_jsonl_problem_names_file_line_and_field(tmp_path, bad, classes, fld, problem):
    write_image(tmp_path / "images" / "a.png", 200, 100)
    (tmp_path / "images" / "garbage.png").write_bytes(b"not an image at all")
    path = write_lines(tmp_path / "t.jsonl", [row(), bad])       # the bad one on line 2
    with pytest.raises(DataError) as caught:
        load_dataset(path, classes=classes)
    assert caught.value.problems == [str(caught.value)]
    message = str(caught.value)
    assert message.startswith(f"{path}:2: {fld}: "), message
    assert problem in message


def test_all_problems_reported_in_one_error_up_to_a_cap(tmp_path):
    write_image(tmp_path / "images" / "a.png", 200, 100)
    rows = [row()] + [row(f"images/gone{i}.png") for i in range(MAX_REPORTED_PROBLEMS + 5)] + ["{broken"]
    path = write_lines(tmp_path / "t.jsonl", rows)
    with pytest.raises(DataError) as caught:
        load_dataset(path)
    err = caught.value
    assert len(err.problems) == MAX_REPORTED_PROBLEMS + 6
    message = str(err)
    assert message.splitlines()[0] == f"{MAX_REPORTED_PROBLEMS + 6} problems in {path}:"
    assert f"{path}:2: image_url: image file not found" in message
    assert message.splitlines()[-1] == "  ... and 6 more"
    assert err.problems[-1] == f"{path}:{MAX_REPORTED_PROBLEMS + 7}: line: not valid JSON " \
                               "(Expecting property name enclosed in double quotes at column 2)"


def test_no_images_is_an_error(tmp_path):
    path = write_lines(tmp_path / "t.jsonl", [])
    with pytest.raises(DataError, match="no images"):
        load_dataset(path)


def test_validate_false_does_not_open_images(tmp_path):
    path = write_lines(tmp_path / "t.jsonl", [row("images/not-yet-there.png")])
    dataset = load_dataset(path, validate=False)
    assert (dataset.images[0].width, dataset.images[0].height) == (200, 100)
    with pytest.raises(DataError, match="image file not found"):
        load_dataset(path)


COCO_ERRORS = [  # (change to the document, where, field, problem)
    (lambda d: d["images"][0].update(file_name="pics/none.png"), "images[0] (id 42)", "file_name",
     "image file not found"),
    (lambda d: d["images"][1].update(width=33), "images[1] (id 7)", "width/height", "say 33x40 but"),
    (lambda d: d["annotations"][0].update(segmentation=[[1, 1, 90, 1, 20, 15]]),
     "annotations[0] (id 100)", "segmentation[0]", "point (90, 1) is outside the image (0..64 x 0..48"),
    (lambda d: d["annotations"][0].update(segmentation=[[1, 1, 20, 1]]),
     "annotations[0] (id 100)", "segmentation[0]", "2 point(s)"),
    (lambda d: d["annotations"][0].update(category_id=5), "annotations[0] (id 100)", "category_id",
     "no category with id 5"),
    (lambda d: d["annotations"][0].update(image_id=5), "annotations[0] (id 100)", "image_id",
     "no image with id 5"),
    (lambda d: d["categories"][0].update(name=""), "categories[0]", "name", "missing or empty (id 9)"),
    (lambda d: d["annotations"][2].update(segmentation={"size": [40, 32], "counts": [1280]}),
     "annotations[2] (id 102)", "segmentation", "RLE mask is empty"),
    (lambda d: d["annotations"][2].update(segmentation={"size": [40, 31], "counts": [1240]}),
     "annotations[2] (id 102)", "segmentation", "invalid RLE: size [40, 31] differs"),
]


@pytest.mark.parametrize("change, where, fld, problem", COCO_ERRORS,
                         ids=["missing", "size", "outside", "two-points", "category", "image", "empty-name",
                              "empty-rle", "rle-size"])
def test_each_coco_problem_names_file_record_and_field(tmp_path, change, where, fld, problem):
    path = coco_doc(tmp_path)
    doc = json.loads(path.read_text())
    change(doc)
    path.write_text(json.dumps(doc))
    with pytest.raises(DataError) as caught:
        load_dataset(path)
    assert caught.value.problems == [str(caught.value)]          # one problem, not a cascade
    message = str(caught.value)
    assert message.startswith(f"{path}: {where}: {fld}"), message
    assert problem in message


def test_coco_unknown_label_when_classes_given(tmp_path):
    path = coco_doc(tmp_path)
    with pytest.raises(DataError, match=r"image id 42 \(x.png\), annotation 0: category: unknown label 'apple'"):
        load_dataset(path, classes=["zebra"])


def test_coco_polygon_overshooting_by_under_a_pixel_is_clipped(tmp_path):
    path = coco_doc(tmp_path)
    doc = json.loads(path.read_text())
    doc["annotations"][0]["segmentation"] = [[-0.4, 1, 64.5, 1, 20, 48.9]]
    path.write_text(json.dumps(doc))
    assert load_dataset(path).images[0].instances[0].polygons == [[0.0, 1.0, 64.0, 1.0, 20.0, 48.0]]


# ------------------------------------------------------------------------------- convert CLI


@pytest.mark.parametrize("data", ["synth_dir", "od_synth_dir"], ids=["instance-segmentation", "object-detection"])
def test_convert_command_every_direction(data, request, tmp_path, capsys):
    source = request.getfixturevalue(data) / "validation.jsonl"
    assert cli.main(["convert", "--input", str(source), "--output", str(tmp_path / "v.json")]) == 0
    assert cli.main(["convert", "--input", str(tmp_path / "v.json"), "--output", str(tmp_path / "v.jsonl")]) == 0
    assert cli.main(["convert", "--input", str(tmp_path / "v.jsonl"), "--output", str(tmp_path / "table")]) == 0
    assert "images" in capsys.readouterr().out
    assert (tmp_path / "table" / "MLTable").is_file()
    assert_same_content(load_dataset(source), load_dataset(tmp_path / "table"))
    assert json.loads((tmp_path / "v.json").read_text())["images"][0]["file_name"].startswith("/")


def test_convert_command_reports_bad_data_without_traceback(tmp_path, capsys):
    path = write_lines(tmp_path / "t.jsonl", [row("images/missing.png")])
    assert cli.main(["convert", "--input", str(path), "--output", str(tmp_path / "o.json")]) == 2
    err = capsys.readouterr().err
    assert f"mmdet-mlflow convert: error: {path}:1: image_url: image file not found" in err
    assert "Traceback" not in err
    assert not (tmp_path / "o.json").exists()


def test_written_files_are_complete_or_absent(tmp_path):
    write_image(tmp_path / "images" / "a.png", 200, 100)
    dataset = Dataset(images=[ImageRecord(tmp_path / "images" / "a.png", 200, 100,
                                          [Instance("can", [[1, 1, 5, 1, 5, 5]])])], classes=["cat"])
    with pytest.raises(DataError, match="label 'can' is not one of the dataset's classes"):
        write_coco(dataset, tmp_path / "x.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images"]   # no leftovers
    dataset.classes = ["can"]
    written = [write_coco(dataset, tmp_path / "x.json"), write_jsonl(dataset, tmp_path / "x.jsonl"),
               write_mltable(tmp_path / "table", tmp_path / "x.jsonl") / "MLTable"]
    assert [p.stat().st_mode & 0o777 for p in written] == [0o644] * 3   # results to share, not mkstemp's 0600


@pytest.mark.parametrize("data", ["synth_dir", "od_synth_dir"], ids=["instance-segmentation", "object-detection"])
def test_mmdet_reads_our_coco_as_written(data, request, tmp_path):
    """The fine-tune and evaluate code feeds our COCO to mmdet's CocoDataset: same images,
    instances, boxes and masks (none for object detection)."""
    from mmdet.datasets import CocoDataset
    from mmengine.registry import init_default_scope

    dataset = load_dataset(request.getfixturevalue(data) / "train.jsonl")
    coco_path = write_coco(dataset, tmp_path / "elsewhere" / "train.json")    # absolute file names
    init_default_scope("mmdet")
    mm = CocoDataset(ann_file=str(coco_path), data_prefix=dict(img=""), metainfo=dict(classes=tuple(dataset.classes)),
                     filter_cfg=dict(filter_empty_gt=False),
                     pipeline=[dict(type="LoadImageFromFile"),
                               dict(type="LoadAnnotations", with_bbox=True, with_mask=dataset.has_masks,
                                    poly2mask=True)])
    assert len(mm) == len(dataset.images)
    for i, record in enumerate(dataset.images):
        item = mm[i]
        assert item["img_path"] == str(record.path) and item["img"].shape[:2] == (record.height, record.width)
        assert [dataset.classes[k] for k in item["gt_bboxes_labels"]] == [inst.label for inst in record.instances]
        boxes = [[x, y, x + w, y + h] for x, y, w, h in (inst.bbox() for inst in record.instances)]
        np.testing.assert_allclose(item["gt_bboxes"].numpy(), np.reshape(boxes, (-1, 4)), atol=1e-4)
        if dataset.has_masks:
            assert item["gt_masks"].masks.shape == (len(record.instances), record.height, record.width)
        else:
            assert "gt_masks" not in item


# ------------------------------------------------------------------------------- object detection


def test_automl_object_detection_jsonl_reads_boxes_in_pixels(tmp_path):
    write_image(tmp_path / "images" / "a.png", 200, 100)
    boxes = [{"label": "can", "topX": 0.1, "topY": 0.2, "bottomX": 0.5, "bottomY": 0.6, "isCrowd": 0},
             {"label": "carton", "topX": 0, "topY": 0, "bottomX": 1 + 1e-7, "bottomY": 1, "isCrowd": 1},
             {"label": "can", "topX": 0.5, "topY": 0.5, "bottomX": 0.75, "bottomY": 1.0}]  # isCrowd is optional
    dataset = load_dataset(write_lines(tmp_path / "od.jsonl", [od_row(boxes=boxes), od_row(boxes=[])]))
    assert dataset.task == OBJECT_DETECTION and not dataset.has_masks
    assert dataset.classes == ["can", "carton"]
    first = dataset.images[0].instances
    assert [(i.label, i.iscrowd) for i in first] == [("can", False), ("carton", True), ("can", False)]
    np.testing.assert_allclose([i.bbox() for i in first], [[20, 20, 80, 40], [0, 0, 200, 100], [100, 50, 50, 50]])
    assert dataset.images[1].instances == []
    # nothing that reads masks fails on a box-only instance: it finds none
    for inst in first:
        assert inst.polygons is None and inst.outline() is None and inst.coco_segmentation() is None
    assert first[0].area(100, 200) == 80 * 40
    assert [set(b) for b in response_boxes(dataset.images[0])] == [{"box", "label"}] * 3
    assert response_boxes(dataset.images[0])[0]["box"] == pytest.approx(
        {"topX": 0.1, "topY": 0.2, "bottomX": 0.5, "bottomY": 0.6})


def test_an_instance_segmentation_dataset_says_so(synth_dir, tmp_path):
    assert load_dataset(synth_dir / "train.jsonl").task == INSTANCE_SEGMENTATION
    assert load_dataset(synth_dir / "train.coco.json").has_masks
    write_image(tmp_path / "images" / "a.png", 200, 100)
    assert load_dataset(write_lines(tmp_path / "empty.jsonl", [row(labels=[])])).task == INSTANCE_SEGMENTATION


def test_coco_without_segmentation_is_object_detection(tmp_path):
    path = coco_doc(tmp_path)
    doc = json.loads(path.read_text())
    annotations = doc["annotations"]
    del annotations[0]["segmentation"]                              # missing
    annotations[1].update(segmentation=[], bbox=[5, 10, 45, 20])   # empty
    annotations[2].update(segmentation=None, bbox=[0, 0, 32.4, 40])  # null; within a pixel of the edge
    path.write_text(json.dumps(doc))
    dataset = load_dataset(path)
    assert dataset.task == OBJECT_DETECTION
    assert [i.bbox() for r in dataset.images for i in r.instances] == \
        [(1.0, 1.0, 19.0, 14.0), (5.0, 10.0, 45.0, 20.0), (0.0, 0.0, 32.0, 40.0)]
    coco = to_coco(dataset)
    assert all("segmentation" not in a for a in coco["annotations"])
    assert [a["area"] for a in coco["annotations"]] == [19 * 14, 45 * 20, 32 * 40]
    assert [a["iscrowd"] for a in coco["annotations"]] == [0, 1, 1]
    assert [c["id"] for c in coco["categories"]] == [9, 3]


def test_mltable_reading_object_detection_jsonl(tmp_path):
    write_image(tmp_path / "images" / "a.png", 200, 100)
    table = write_mltable(tmp_path / "table", write_lines(tmp_path / "od.jsonl", [od_row(), od_row()]))
    dataset = load_dataset(table)
    assert dataset.task == OBJECT_DETECTION
    assert [i.bbox() for r in dataset.images for i in r.instances] == [pytest.approx((20, 20, 80, 40))] * 2


def test_a_jsonl_file_mixing_polygons_and_boxes_is_refused_at_the_first_odd_label(tmp_path):
    write_image(tmp_path / "images" / "a.png", 200, 100)
    path = write_lines(tmp_path / "mixed.jsonl", [row(), row(), od_row(boxes=[od_row()["label"][0]] * 2)])
    with pytest.raises(DataError) as caught:
        load_dataset(path)
    assert caught.value.problems == [
        f"{path}:3: label[0]: box-only, but {path}:1: label[0] has a mask: a dataset is one task, every "
        "instance with a mask (instance segmentation) or every one box-only (object detection) "
        "(2 of 4 labels are like this one)"]
    # the other way round, across the files of an MLTable: the first file's first label sets the task
    other = write_lines(tmp_path / "more.jsonl", [row()])
    (tmp_path / "table").mkdir()
    (tmp_path / "table" / "MLTable").write_text(
        "paths:\n  - file: ../od.jsonl\n  - file: ../more.jsonl\ntransformations:\n  - read_json_lines: {}\n")
    od = write_lines(tmp_path / "od.jsonl", [od_row()])
    with pytest.raises(DataError, match=rf"^{re.escape(str(other))}:1: label\[0\]: has a mask, "
                                        rf"but {re.escape(str(od))}:1: label\[0\] is box-only"):
        load_dataset(tmp_path / "table")


def test_a_coco_file_mixing_masks_and_boxes_is_refused_at_the_first_odd_annotation(tmp_path):
    path = coco_doc(tmp_path)
    doc = json.loads(path.read_text())
    del doc["annotations"][1]["segmentation"]
    doc["annotations"][1]["bbox"] = [5, 10, 45, 20]
    path.write_text(json.dumps(doc))
    with pytest.raises(DataError) as caught:
        load_dataset(path)
    assert caught.value.problems == [
        f"{path}: annotations[1] (id 101): segmentation: box-only, but annotations[0] (id 100) has a mask: "
        "a dataset is one task, every instance with a mask (instance segmentation) or every one box-only "
        "(object detection)"]


def test_a_dataset_made_in_code_is_one_task_too(tmp_path):
    record = ImageRecord(tmp_path / "a.png", 200, 100, [Instance("can", [[1, 1, 5, 1, 5, 5]]),
                                                        Instance.boxed("can", (1, 1, 4, 4))])
    with pytest.raises(DataError, match=r"instance 1: box-only, but .*a.png instance 0 has a mask"):
        Dataset(images=[record], classes=["can"])
    with pytest.raises(DataError, match="the dataset's task is object-detection but its instances are for instance-segmentation"):
        Dataset(images=[ImageRecord(tmp_path / "a.png", 200, 100, [record.instances[0]])], classes=["can"],
                task=OBJECT_DETECTION)
    with pytest.raises(ValueError, match="neither a mask nor a box"):
        Instance("can", None)


def box(**change):
    return [{"label": "can", "topX": 0.1, "topY": 0.2, "bottomX": 0.5, "bottomY": 0.6, "isCrowd": 0, **change}]


OD_JSONL_ERRORS = [  # (labels, field, problem)
    (box(topX=-0.01), "label[0].topX", "-0.01 is outside 0..1 (AutoML polygons and boxes are normalized"),
    (box(bottomY=1.2), "label[0].bottomY", "1.2 is outside 0..1"),
    (box(bottomX=0.1), "label[0].bottomX", "0.1 is not right of label[0].topX 0.1 (an empty box)"),
    (box(topY=0.7), "label[0].bottomY", "0.6 is not below label[0].topY 0.7 (an empty box)"),
    (box(topY="0.2"), "label[0].topY", "expected a number, got '0.2'"),
    (box(bottomX=None), "label[0].bottomX", "expected a number, got None"),
    ([{k: v for k, v in box()[0].items() if k != "bottomY"}], "label[0].bottomY", "expected a number, got None"),
    ([{"label": "can", "isCrowd": 0}], "label[0]", "no polygon (instance segmentation) and no topX, topY, "
                                                   "bottomX, bottomY (object detection)"),
    (box(label=""), "label[0].label", "missing or empty"),
]


@pytest.mark.parametrize("labels, fld, problem", OD_JSONL_ERRORS,
                         ids=["left-outside", "bottom-outside", "no-width", "upside-down", "text", "null",
                              "missing", "neither", "empty-label"])
def test_each_bad_box_names_file_line_and_field(tmp_path, labels, fld, problem):
    write_image(tmp_path / "images" / "a.png", 200, 100)
    path = write_lines(tmp_path / "t.jsonl", [od_row(), od_row(boxes=labels)])   # the bad one on line 2
    with pytest.raises(DataError) as caught:
        load_dataset(path)
    assert caught.value.problems == [str(caught.value)]          # one problem, not a cascade
    message = str(caught.value)
    assert message.startswith(f"{path}:2: {fld}: {problem}"), message


def test_every_bad_box_is_reported_at_once(tmp_path):
    write_image(tmp_path / "images" / "a.png", 200, 100)
    path = write_lines(tmp_path / "t.jsonl", [od_row(boxes=box(topX=2) + box(topY=None, bottomY=-1)),
                                              od_row(boxes=box(bottomX=0.05))])
    with pytest.raises(DataError) as caught:
        load_dataset(path)
    assert caught.value.problems == [
        f"{path}:1: label[0].topX: 2 is outside 0..1 (AutoML polygons and boxes are normalized by the image "
        "width and height)",
        f"{path}:1: label[1].topY: expected a number, got None",
        f"{path}:2: label[0].bottomX: 0.05 is not right of label[0].topX 0.1 (an empty box)"]


@pytest.mark.parametrize("bbox, fld, problem", [
    ([60, 1, 10, 10], "bbox x + width", "70 is outside the image (0..64 x 0..48 pixels)"),
    ([1, 1, 0, 10], "bbox x + width", "1 is not right of bbox x 1 (an empty box)"),
    ([1, 1, 10, -3], "bbox y + height", "-2 is outside the image"),
    ([1, 1, 10], "bbox", "expected [x, y, width, height] (an annotation without a segmentation is its box alone)"),
    (None, "bbox", "expected [x, y, width, height]"),
    ([1, "1", 10, 10], "bbox y", "expected a number, got '1'"),
], ids=["right-outside", "no-width", "negative-height", "three-values", "none", "text"])
def test_each_bad_coco_box_names_record_and_field(tmp_path, bbox, fld, problem):
    path = coco_doc(tmp_path)
    doc = json.loads(path.read_text())
    for ann in doc["annotations"]:
        ann.pop("segmentation")
    doc["annotations"][0]["bbox"] = bbox
    for ann in doc["annotations"][1:]:
        ann["bbox"] = [1, 1, 5, 5]
    path.write_text(json.dumps(doc))
    with pytest.raises(DataError) as caught:
        load_dataset(path)
    assert len(caught.value.problems) == 1
    assert str(caught.value).startswith(f"{path}: annotations[0] (id 100): {fld}: {problem}"), str(caught.value)


def test_object_detection_is_written_as_boxes_alone(od_synth_dir):
    dataset = load_dataset(od_synth_dir / "train.coco.json")
    assert dataset.task == OBJECT_DETECTION and sum(len(r.instances) for r in dataset.images) > 0
    assert all(set(label) == {"label", "topX", "topY", "bottomX", "bottomY", "isCrowd"}
               for r in to_jsonl_rows(dataset) for label in r["label"])
    for ann in to_coco(dataset)["annotations"]:
        assert "segmentation" not in ann and ann["area"] == pytest.approx(ann["bbox"][2] * ann["bbox"][3])
