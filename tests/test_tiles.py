"""AutoML's tiling: the one tile geometry (scoring.tiles) and fine-tuning data cut into tiles
(mmdet_mlflow.training.tiles), on tiny synthetic pictures."""
from __future__ import annotations

import json

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from scoring.errors import InputError
from scoring.tiles import (MAX_TILES, MIN_TILE_SIDE, TileGridError, check_overlap_ratio,
                           effective_grid, format_tile_grid, parse_tile_grid, tile_rectangles)


def test_grid_strings_are_automls():
    assert parse_tile_grid("3x2") == (3, 2)
    assert parse_tile_grid(" 5X3 ") == (5, 3)
    assert parse_tile_grid("1x1") == (1, 1)
    assert parse_tile_grid(None) is None and parse_tile_grid("") is None and parse_tile_grid("  ") is None
    assert format_tile_grid((3, 2)) == "3x2" and format_tile_grid(None) == ""
    for bad, problem in [("0x4", "at least one column"), ("4by4", "MxN"), ("3x", "MxN"), ("x2", "MxN"),
                         ("-1x2", "MxN"), ("2.5x2", "MxN"), ("9x9", f"at most {MAX_TILES}"),
                         (32, "must be a string"), ("3x2x1", "MxN")]:
        with pytest.raises(TileGridError, match=problem) as caught:
            parse_tile_grid(bad)
        assert "tile_grid_size" in str(caught.value)
        assert isinstance(caught.value, InputError)  # a 4xx in a request
    assert check_overlap_ratio(0) == 0 and check_overlap_ratio("0.5") == 0.5
    for bad in (1, 1.5, -0.1, float("nan"), "much", True, None):
        with pytest.raises(TileGridError, match="tile_overlap_ratio"):
            check_overlap_ratio(bad)


@pytest.mark.parametrize("width, height", [(4032, 3024), (640, 480), (1001, 333), (97, 131)])
@pytest.mark.parametrize("grid", [(3, 2), (1, 1), (4, 4), (2, 5)])
@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.6])
def test_tiles_cover_the_picture_with_the_overlap(width, height, grid, overlap):
    tiles = tile_rectangles(width, height, grid, overlap)
    columns, rows = effective_grid(width, height, grid)
    assert len(tiles) == columns * rows
    covered = np.zeros((height, width), np.int32)
    for x0, y0, x1, y1 in tiles:
        assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height
        covered[y0:y1, x0:x1] += 1
    assert covered.min() >= 1  # every pixel is in a tile
    assert tiles[0][:2] == (0, 0) and tiles[-1][2:] == (width, height)
    widths = [x1 - x0 for x0, _, x1, _ in tiles[:columns]]
    assert max(widths) - min(widths) <= 2  # tiles of one size, give or take rounding
    if columns > 1:
        tile = width / (columns - (columns - 1) * overlap)
        assert widths[0] == pytest.approx(tile, abs=1.5)
        shared = tiles[0][2] - tiles[1][0]  # pixels the first two columns share
        assert shared == pytest.approx(overlap * tile, abs=2)


def test_a_grid_finer_than_the_picture_is_clipped():
    assert effective_grid(97, 131, (8, 8)) == (97 // MIN_TILE_SIDE, 131 // MIN_TILE_SIDE)
    assert tile_rectangles(20, 1, (8, 8)) == [(0, 0, 20, 1)]  # one tile: the picture
    assert tile_rectangles(640, 480, None) == [(0, 0, 640, 480)]
    with pytest.raises(TileGridError):
        tile_rectangles(640, 480, (2, 2), overlap=1.0)


# ----------------------------------------------------------------------------- fine-tuning


def _picture_with_objects(tmp_path):
    """A 400x300 picture with a square wholly in the top-left tile, a wide bar across the
    vertical tile border, and a sliver poking into the right tiles."""
    import cv2

    from mmdet_mlflow.data import Dataset, ImageRecord, Instance

    image = np.full((300, 400, 3), 90, np.uint8)
    square = [20.0, 20.0, 80.0, 20.0, 80.0, 80.0, 20.0, 80.0]
    bar = [100.0, 200.0, 300.0, 200.0, 300.0, 240.0, 100.0, 240.0]
    sliver = [150.0, 10.0, 215.0, 10.0, 215.0, 30.0, 150.0, 30.0]  # 15 of 65 px right of x=200
    for polygon, colour in ((square, 200), (bar, 150), (sliver, 50)):
        cv2.fillPoly(image, [np.array(polygon).reshape(-1, 2).astype(np.int32)], (colour,) * 3)
    path = tmp_path / "shelf.png"
    cv2.imwrite(str(path), image)
    record = ImageRecord(path=path, width=400, height=300,
                         instances=[Instance("can", [square]), Instance("carton", [bar]),
                                    Instance("can", [sliver])])
    return Dataset(images=[record], classes=["can", "carton"])


def test_training_pictures_are_cut_into_the_inference_tiles(tmp_path):
    import cv2

    from mmdet_mlflow.training.tiles import TrainingTiles, tile_dataset

    dataset = _picture_with_objects(tmp_path)
    tiling = TrainingTiles.from_settings("2x1", 0.0)
    tiled = tile_dataset(dataset, tiling, tmp_path / "tiles", progress=False)
    whole, *tiles = tiled.images
    assert whole.path == dataset.images[0].path and len(whole.instances) == 3  # kept whole too
    assert [(r.width, r.height) for r in tiles] == [(200, 300), (200, 300)]
    assert [r.image_id for r in tiled.images] == [1, 2, 3]
    left, right = tiles
    picture = cv2.imread(str(dataset.images[0].path))
    assert np.array_equal(cv2.imread(str(left.path)), picture[:, :200])  # PNG: lossless
    assert np.array_equal(cv2.imread(str(right.path)), picture[:, 200:])
    # left: the square whole (its polygon as given), the bar's left half, the sliver's 50 px
    assert [i.label for i in left.instances] == ["can", "carton", "can"]
    assert left.instances[0].polygons == dataset.images[0].instances[0].polygons
    x, y, w, h = left.instances[1].bbox()
    assert (x, y, x + w, y + h) == pytest.approx((100, 200, 199, 240), abs=1)
    # right: the bar's right half in tile coordinates; the sliver (15/65 < 0.25) dropped
    assert [i.label for i in right.instances] == ["carton"]
    x, y, w, h = right.instances[0].bbox()
    assert (x, y, x + w, y + h) == pytest.approx((0, 200, 100, 240), abs=1)
    area = right.instances[0].area(300, 200)
    assert area == pytest.approx(100 * 40, rel=0.05)


def test_box_only_objects_are_cut_into_the_tiles_as_boxes(tmp_path):
    """Object-detection data: each box clipped to the tile, dropped under the same visible
    fraction (of the box) as a mask's piece."""
    from mmdet_mlflow.data import OBJECT_DETECTION, Dataset
    from mmdet_mlflow.training.tiles import TrainingTiles, tile_dataset

    segmented = _picture_with_objects(tmp_path)
    record = segmented.images[0]
    record.instances = [inst.box_only() for inst in record.instances]
    dataset = Dataset(images=[record], classes=segmented.classes)
    tiled = tile_dataset(dataset, TrainingTiles.from_settings("2x1", 0.0), tmp_path / "tiles", progress=False)
    assert tiled.task == OBJECT_DETECTION
    whole, left, right = tiled.images
    assert whole.instances == record.instances
    assert [(i.label, i.bbox()) for i in left.instances] == [
        ("can", (20.0, 20.0, 60.0, 60.0)), ("carton", (100.0, 200.0, 100.0, 40.0)), ("can", (150.0, 10.0, 50.0, 20.0))]
    assert [(i.label, i.bbox()) for i in right.instances] == [("carton", (0.0, 200.0, 100.0, 40.0))]
    assert all(i.polygons is None for r in tiled.images for i in r.instances)


def test_a_tiled_finetune_prepares_tiles_as_coco(tmp_path):
    """prepare_data with tiling (what ``finetune --tile-grid-size`` does) writes the tiles'
    COCO file for mmdet; validation stays whole pictures. Bad grids are refused up front."""
    from mmdet_mlflow.data import write_jsonl
    from mmdet_mlflow.training import FinetuneError, FinetuneSettings
    from mmdet_mlflow.training.data_prep import prepare_data
    from mmdet_mlflow.training.tiles import TrainingTiles

    dataset = _picture_with_objects(tmp_path)
    write_jsonl(dataset, tmp_path / "train.jsonl")
    coco = (tmp_path / "out" / "train.coco.json", tmp_path / "out" / "validation.coco.json")
    coco[0].parent.mkdir()
    data = prepare_data(tmp_path / "train.jsonl", tmp_path / "train.jsonl", coco,
                        tiling=TrainingTiles.from_settings("2x2", 0.25))
    train = json.loads(coco[0].read_text())
    val = json.loads(coco[1].read_text())
    assert len(val["images"]) == 1 and data.val_images == 1
    assert len(train["images"]) == 1 + 4 and data.train_images == 5
    for image in train["images"][1:]:
        assert (coco[0].parent / "train_tiles") in __import__("pathlib").Path(image["file_name"]).parents
    for annotation in train["annotations"]:  # every clipped piece rasterizes inside its tile
        image = next(i for i in train["images"] if i["id"] == annotation["image_id"])
        rles = mask_utils.frPyObjects(annotation["segmentation"], image["height"], image["width"])
        assert mask_utils.area(mask_utils.merge(rles)) > 0
    with pytest.raises(FinetuneError, match="tile_grid_size"):
        FinetuneSettings(tile_grid_size="4by4").check()
    with pytest.raises(FinetuneError, match="tile_overlap_ratio"):
        FinetuneSettings(tile_grid_size="2x2", tile_overlap_ratio=1.0).check()
    with pytest.raises(FinetuneError, match="at most"):
        TrainingTiles.from_settings("20x20", 0.25)
    assert TrainingTiles.from_settings(None, None) is None


def test_finetune_on_tiles_of_large_pictures(tiny_checkpoint, tmp_path):
    """A real (tiny, 2-step) fine-tune with --tile-grid-size on mosaic pictures: mmdet trains on
    the tiles and the whole pictures, and the run records the tiling settings."""
    import torch

    from mmdet_mlflow.synth import generate
    from mmdet_mlflow.training import FinetuneSettings, finetune

    data = tmp_path / "large"
    generate(data, num_images=3, seed=4, mosaic=2, progress=False)  # 1280x960, 2 train + 1 val
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = finetune(data / "train.jsonl", data / "validation.jsonl", tmp_path / "run",
                          config="rtmdet-ins_tiny_8xb32-300e_coco", checkpoint=str(tiny_checkpoint),
                          progress=False, track=False,
                          settings=FinetuneSettings(number_of_epochs=1, max_steps=2, image_size=128,
                                                    training_batch_size=4, validation_batch_size=4,
                                                    warmup_steps=1, tile_grid_size="2x2",
                                                    tile_overlap_ratio=0.25))
    finally:
        torch.set_num_threads(before)
    assert result.steps == 2 and result.mlflow_model_dir.exists()
    train = json.loads((tmp_path / "run" / "data" / "train.coco.json").read_text())
    sizes = sorted({(i["width"], i["height"]) for i in train["images"]})
    assert (1280, 960) in sizes and len(sizes) >= 2 and len(train["images"]) > 2  # wholes + tiles
    assert all(w <= 1280 and h <= 960 for w, h in sizes)
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["settings"]["tile_grid_size"] == "2x2"
