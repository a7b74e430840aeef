"""Tiled inference (scoring.tiling): the merge of tile and whole-picture detections with their
masks, the request params, and tiling through the real tiny model on both runtimes."""
from __future__ import annotations

import base64
import dataclasses

import numpy as np
import pandas as pd
import pytest

from helpers import assert_object_detection_answers, scene_image
from scoring.errors import InputError
from scoring.runtimes.base import ImageDetections
from scoring.schema import PredictParams
from scoring.tiling import merge_tiles, tiles_for

CLASSES = ["bottle", "can"]


class ArrayMasks:
    """A MaskSource over masks already made (each in its own source's pixels): what the merge
    receives from a runtime, without a network in the way, so the cases are exact."""

    def __init__(self, masks):
        self.masks = list(masks)

    def __len__(self):
        return len(self.masks)

    def iter_masks(self, threshold):
        return iter(self.masks)

    def select(self, indices):
        return ArrayMasks([self.masks[i] for i in indices])


def rect_mask(hw, box):
    mask = np.zeros(hw, bool)
    x0, y0, x1, y1 = box
    mask[y0:y1, x0:x1] = True
    return mask


def found(hw, boxes, scores, labels):
    """One source's detections: box masks (filled boxes) in that source's pixels."""
    return ImageDetections(image_size=(hw[1], hw[0]), boxes=np.asarray(boxes, np.float32).reshape(-1, 4),
                           scores=np.asarray(scores, np.float32), labels=np.asarray(labels),
                           class_names=CLASSES, masks=ArrayMasks([rect_mask(hw, b) for b in boxes]))


def crop_box(box, rect):
    """A picture box as a tile sees it: moved into the tile and cut at its edges."""
    x0, y0, x1, y1 = rect
    return (max(box[0], x0) - x0, max(box[1], y0) - y0, min(box[2], x1) - x0, min(box[3], y1) - y0)


def iou(a, b):
    return (a & b).sum() / (a | b).sum()


# A 400 x 200 picture in two columns with overlap 0.25: tiles [0, 229) and [171, 400).
PICTURE_HW = (200, 400)
PARAMS = PredictParams(tile_grid_size="2x1", tile_overlap_ratio=0.25)


def sources():
    return [(0, 0, 400, 200)] + tiles_for(PICTURE_HW, PARAMS)


def test_the_tiles_of_the_cases_below():
    assert sources() == [(0, 0, 400, 200), (0, 0, 229, 200), (171, 0, 400, 200)]


def test_an_object_cut_by_a_border_and_whole_in_the_other_tile_comes_back_once_whole():
    """The object spans x 190..260: the left tile cuts it at 229, the right tile sees it whole,
    and the shrunk whole picture missed it. One detection, the whole object's mask and box, the
    best piece's score."""
    whole_object = (190, 50, 260, 120)
    left, right = sources()[1], sources()[2]
    merged = merge_tiles([found(PICTURE_HW, [], [], []),
                          found((200, 229), [crop_box(whole_object, left)], [0.9], [0]),
                          found((200, 229), [crop_box(whole_object, right)], [0.7], [0])],
                         sources(), PICTURE_HW, PARAMS)
    assert len(merged) == 1
    mask = next(merged.iter_masks(0.5))
    assert mask.shape == PICTURE_HW
    assert iou(mask, rect_mask(PICTURE_HW, whole_object)) >= 0.9
    np.testing.assert_allclose(merged.boxes[0], whole_object)
    assert merged.scores[0] == pytest.approx(0.9) and merged.label_name(0) == "bottle"


def test_an_object_only_seen_in_pieces_is_their_union():
    """Wider than the overlap and cut by both tiles: the pieces make one object."""
    whole_object = (120, 60, 300, 140)
    left, right = sources()[1], sources()[2]
    merged = merge_tiles([found(PICTURE_HW, [], [], []),
                          found((200, 229), [crop_box(whole_object, left)], [0.6], [1]),
                          found((200, 229), [crop_box(whole_object, right)], [0.8], [1])],
                         sources(), PICTURE_HW, PARAMS)
    assert len(merged) == 1 and merged.label_name(0) == "can"
    assert iou(next(merged.iter_masks(0.5)), rect_mask(PICTURE_HW, whole_object)) >= 0.99
    np.testing.assert_allclose(merged.boxes[0], whole_object)


def test_a_piece_inside_a_larger_box_of_something_else_stays_its_own_object():
    """The shrunk whole picture sees one large box over a group of objects (as a coarse pass
    does); a tile finds a small object cut by its border inside that box. The piece is not what
    the large box looks like from its tile, so it stays an object of its own."""
    coarse = (100, 20, 380, 190)
    small = (200, 80, 240, 130)  # cut by the left tile's right border at 229
    left, right = sources()[1], sources()[2]
    merged = merge_tiles([found(PICTURE_HW, [coarse], [0.6], [0]),
                          found((200, 229), [crop_box(small, left)], [0.5], [0]),
                          found((200, 229), [crop_box(small, right)], [0.4], [0])],
                         sources(), PICTURE_HW, PARAMS)
    assert len(merged) == 2
    np.testing.assert_allclose(merged.boxes[1], small)  # the two pieces, joined


def test_neighbours_are_not_chained_into_one_object_by_boxes_between_them():
    """Each candidate is compared with a group's keeper only: a low-score box overlapping two
    neighbouring objects joins at most one of them and never merges the two."""
    a, b = (20, 20, 80, 120), (90, 20, 150, 120)
    between = (50, 20, 120, 120)  # IoU 0.27 with a and with b
    merged = merge_tiles([found(PICTURE_HW, [between], [0.2], [0]),
                          found((200, 229), [a, b], [0.9, 0.8], [0, 0]),
                          found((200, 229), [], [], [])],
                         sources(), PICTURE_HW, PARAMS)
    assert len(merged) == 2
    np.testing.assert_allclose(merged.boxes, [a, b])
    # two detections of one source are two objects (the model's own NMS kept both), however
    # much they overlap
    same_tile = merge_tiles([found(PICTURE_HW, [], [], []),
                             found((200, 229), [a, between], [0.9, 0.2], [0, 0]),
                             found((200, 229), [], [], [])],
                            sources(), PICTURE_HW, PARAMS)
    assert len(same_tile) == 2


def test_the_same_object_in_a_tile_and_in_the_whole_picture_is_one_detection():
    obj = (20, 20, 60, 70)
    merged = merge_tiles([found(PICTURE_HW, [obj], [0.5], [0]),
                          found((200, 229), [crop_box(obj, sources()[1])], [0.8], [0]),
                          found((200, 229), [], [], [])],
                         sources(), PICTURE_HW, PARAMS)
    assert len(merged) == 1 and merged.scores[0] == pytest.approx(0.8)


def test_separate_objects_and_other_classes_stay_apart():
    a, b = (20, 20, 60, 70), (300, 20, 340, 70)
    merged = merge_tiles([found(PICTURE_HW, [], [], []),
                          found((200, 229), [crop_box(a, sources()[1]), crop_box(a, sources()[1])],
                                [0.9, 0.4], [0, 1]),
                          found((200, 229), [crop_box(b, sources()[2])], [0.7], [0])],
                         sources(), PICTURE_HW, PARAMS)
    assert len(merged) == 3
    assert list(merged.scores) == pytest.approx([0.9, 0.7, 0.4])
    agnostic = merge_tiles([found(PICTURE_HW, [a], [0.4], [1]),
                            found((200, 229), [crop_box(a, sources()[1])], [0.9], [0]),
                            found((200, 229), [], [], [])],
                           sources(), PICTURE_HW, PredictParams(tile_grid_size="2x1",
                                                                class_agnostic_nms=True))
    assert len(agnostic) == 1


def test_max_detections_counts_merged_objects():
    boxes = [(10 + 20 * i, 10, 25 + 20 * i, 30) for i in range(8)]
    merged = merge_tiles([found(PICTURE_HW, boxes, np.linspace(0.9, 0.2, 8), [0] * 8),
                          found((200, 229), [], [], []), found((200, 229), [], [], [])],
                         sources(), PICTURE_HW, PredictParams(tile_grid_size="2x1", max_detections=5))
    assert len(merged) == 5 and len(list(merged.iter_masks(0.5))) == 5


def merged_pair_by_pair(detections, rects, image_hw, params):
    """The merge's rules applied the plain way, every candidate against every group in order
    (what the merge did before it looked its neighbours up), as the oracle the indexed merge
    must equal: (box, score, label, [(source, index) of the members shaping it]) per object."""
    from scoring.boxes import box_iou
    from scoring.tiling import PIECE_IOU, _Candidate, _Group, _inner_borders, _touches

    def clip(box, rect):
        return np.array([min(max(box[0], rect[0]), rect[2]), min(max(box[1], rect[1]), rect[3]),
                         min(max(box[2], rect[0]), rect[2]), min(max(box[3], rect[1]), rect[3])])

    def same_cut_object(a, b):
        both = (max(a.tile[0], b.tile[0]), max(a.tile[1], b.tile[1]),
                min(a.tile[2], b.tile[2]), min(a.tile[3], b.tile[3]))
        return (both[2] > both[0] and both[3] > both[1]
                and box_iou(clip(a.box, both), clip(b.box, both)) >= PIECE_IOU)

    def takes(group, c):
        keeper, thresh = group.keeper, params.tile_predictions_nms_thresh
        if not params.class_agnostic_nms and c.label != keeper.label:
            return False
        if not c.cut:
            return c.source != keeper.source and box_iou(c.box, keeper.box) > thresh
        if not keeper.cut:
            return box_iou(c.box, clip(keeper.box, c.tile)) >= PIECE_IOU
        if c.source in group.pieces:
            return box_iou(c.box, group.pieces[c.source].box) > thresh
        return any(same_cut_object(c, piece) for piece in group.pieces.values())

    height, width = image_hw
    candidates = []
    for source, (dets, rect) in enumerate(zip(detections, rects)):
        inner = _inner_borders(rect, width, height)
        for i in range(len(dets)):
            box = np.asarray(dets.boxes[i], np.float64) + (rect[0], rect[1], rect[0], rect[1])
            candidates.append(_Candidate(source, i, box, float(dets.scores[i]), int(dets.labels[i]),
                                         cut=_touches(box, inner), tile=tuple(rect)))
    candidates.sort(key=lambda c: (c.cut, c.source == 0, -c.score))
    groups = []
    for c in candidates:
        group = next((g for g in groups if takes(g, c)), None)
        if group is None:
            groups.append(_Group.start(c))
            continue
        group.members.append(c)
        if c.cut and c.source not in group.pieces and (group.keeper.cut or group.keeper.source == 0):
            group.pieces[c.source] = c
    groups.sort(key=lambda g: -g.best.score)
    return [(g.box().astype(np.float32).tolist(), g.best.score, g.best.label,
             [(m.source, m.index) for m in g.mask_members()]) for g in groups[:params.max_detections]]


def random_sources(rng, image_hw, params, per_source, objects):
    """Detections of each source of a picture: jittered views of a few objects, cut at the
    source's edges (pieces where a tile cuts them), random scores and labels."""
    height, width = image_hw
    rects = [(0, 0, width, height)] + tiles_for(image_hw, params)
    centres = rng.uniform(0, 1, (objects, 2)) * (width, height)
    sizes = rng.uniform(5, max(width, height) / 3, (objects, 2))
    shapes = np.concatenate([centres - sizes / 2, centres + sizes / 2], axis=1)
    detections = []
    for x0, y0, x1, y1 in rects:
        boxes = shapes[rng.integers(0, objects, per_source)] + rng.normal(0, 3, (per_source, 4))
        boxes = np.clip(boxes, (x0, y0, x0, y0), (x1, y1, x1, y1)) - (x0, y0, x0, y0)
        boxes = boxes[(boxes[:, 2] - boxes[:, 0] >= 1) & (boxes[:, 3] - boxes[:, 1] >= 1)]
        detections.append(ImageDetections(
            image_size=(x1 - x0, y1 - y0), boxes=boxes.astype(np.float32),
            scores=rng.uniform(0, 1, len(boxes)).astype(np.float32),
            labels=rng.integers(0, 2, len(boxes)), class_names=CLASSES,
            masks=ArrayMasks([np.zeros((y1 - y0, x1 - x0), bool)] * len(boxes))))
    return detections, rects


@pytest.mark.parametrize("seed", range(6))
def test_the_merge_equals_its_rules_applied_pair_by_pair(seed):
    """The merge finds the groups near a candidate in a grid and compares them all at once: the
    same objects, scores, labels, boxes and mask members as comparing every pair in order, over
    grids, overlaps, thresholds, class-agnostic or not, and many overlapping candidates."""
    rng = np.random.default_rng(seed)
    for _ in range(25):
        params = PredictParams(
            tile_grid_size=f"{rng.integers(1, 5)}x{rng.integers(1, 5)}",
            tile_overlap_ratio=float(rng.choice([0.0, 0.25, 0.5])),
            tile_predictions_nms_thresh=float(rng.choice([0.0, 0.25, 0.6])),
            class_agnostic_nms=bool(rng.integers(2)), max_detections=int(rng.choice([3, 100])))
        image_hw = (int(rng.integers(64, 700)), int(rng.integers(64, 700)))
        detections, rects = random_sources(rng, image_hw, params, int(rng.integers(0, 30)),
                                           int(rng.integers(1, 12)))
        merged = merge_tiles(detections, rects, image_hw, params)
        got = [(merged.boxes[i].tolist(), float(merged.scores[i]), int(merged.labels[i]),
                [(m.source, m.index) for m in merged.masks.members[i]]) for i in range(len(merged))]
        assert got == merged_pair_by_pair(detections, rects, image_hw, params)


def test_a_merge_past_its_deadline_stops_with_an_input_error():
    from scoring.fetch import Deadline

    params = PredictParams(tile_grid_size="4x4")
    detections, rects = random_sources(np.random.default_rng(0), (600, 600), params, 40, 20)
    passed = Deadline.after(-1.0, "the request took longer than the test allows")
    with pytest.raises(InputError, match=r"took longer than the test allows \(merging tiles: 0 of \d+"):
        merge_tiles(detections, rects, (600, 600), params, passed)


def test_without_masks_the_merge_makes_none():
    detections, rects = random_sources(np.random.default_rng(1), (400, 400), PARAMS, 10, 4)
    detections = [dataclasses.replace(d, masks=None) for d in detections]
    merged = merge_tiles(detections, rects, (400, 400), PARAMS)
    assert len(merged) and merged.masks is None


@pytest.mark.parametrize("value", ["0x4", "4by4", "3", "100x100", "x2", 7])
def test_bad_grids_are_input_errors_naming_the_param(value):
    with pytest.raises(InputError, match="tile_grid_size"):
        PredictParams().updated({"tile_grid_size": value})


@pytest.mark.parametrize("value", [1, 1.5, -0.1, "a", True, float("nan")])
def test_bad_overlaps_are_input_errors_naming_the_param(value):
    with pytest.raises(InputError, match="tile_overlap_ratio"):
        PredictParams().updated({"tile_overlap_ratio": value})


def test_a_grid_finer_than_the_picture_is_clipped_not_refused():
    params = PredictParams(tile_grid_size="8x8")
    assert tiles_for((40, 40), params) == []  # one tile: the plain answer
    assert len(tiles_for((40, 2000), params)) == 8  # eight columns, one row (tiles >= 32 px)


@pytest.fixture(scope="module")
def runtimes(tiny_model_dir, tiny_onnx_model_dir):
    import mlflow_model

    return {"torch": mlflow_model.load_predictor(tiny_model_dir / "model", device="cpu"),
            "onnx": mlflow_model.load_predictor(tiny_onnx_model_dir / "model", device="cpu")}


@pytest.mark.parametrize("size", [(1280, 960), (37, 21), (1, 900), (900, 1)])
def test_tiled_answers_through_the_real_model_on_both_runtimes(runtimes, size):
    """Tiles of every shape (a picture smaller than a tile, one pixel high) answer or refuse
    with an InputError, never anything else; the two runtimes give the same answer."""
    from scoring.runner import score_images

    width, height = size
    image = scene_image(width, height, 3) if min(size) > 40 else \
        np.random.default_rng(3).integers(0, 255, (height, width, 3), dtype=np.uint8)
    params = {"tile_grid_size": "3x2", "score_threshold": 0.05, "max_detections": 20}
    answers = {}
    for name, predictor in runtimes.items():
        try:
            scored = list(score_images(predictor, [(0, image)], params, decode=lambda k, v: v))
            answers[name] = scored[0].response["boxes"]
        except InputError as err:
            answers[name] = str(err)
    assert type(answers["torch"]) is type(answers["onnx"])
    if isinstance(answers["torch"], str):
        assert "too thin" in answers["torch"]
        return
    assert len(answers["torch"]) == len(answers["onnx"]) <= 20
    for a, b in zip(answers["torch"], answers["onnx"]):
        assert a["label"] == b["label"] and a["score"] == pytest.approx(b["score"], abs=1e-4)
        for k in a["box"]:
            assert 0 <= a["box"][k] <= 1 and a["box"][k] == pytest.approx(b["box"][k], abs=1e-3)


def test_tiling_runs_the_whole_picture_and_each_tile_in_the_predictors_batches(tiny_onnx_model_dir,
                                                                               monkeypatch):
    """(tiles + 1) pictures through the network, MMDET_MLFLOW_BATCH_SIZE of them a pass."""
    import mlflow_model
    from scoring.tiling import segment_tiled

    monkeypatch.setenv("MMDET_MLFLOW_BATCH_SIZE", "4")
    batched = mlflow_model.load_predictor(tiny_onnx_model_dir / "model", device="cpu")
    passes = []
    original = batched.forward
    batched.forward = lambda batch, params: passes.append(len(batch["inputs"])) or original(batch, params)
    segment_tiled(batched, scene_image(1280, 960, 1), PredictParams(tile_grid_size="3x2"))
    assert passes == [4, 3]


def test_the_pyfunc_takes_the_tiling_params_and_refuses_bad_ones(tiny_onnx_model_dir):
    import cv2
    import mlflow.pyfunc
    from mlflow.exceptions import MlflowException

    model = mlflow.pyfunc.load_model(str(tiny_onnx_model_dir))
    ok, png = cv2.imencode(".png", scene_image(900, 600, 2))
    frame = pd.DataFrame({"image": [base64.b64encode(png.tobytes()).decode()]})
    tiled = model.predict(frame, params={"tile_grid_size": "2x2", "tile_overlap_ratio": 0.2,
                                         "tile_predictions_nms_thresh": 0.3, "score_threshold": 0.05})
    assert isinstance(tiled["boxes"][0], list)
    with pytest.raises(MlflowException, match="tile_grid_size"):
        model.predict(frame, params={"tile_grid_size": "2by2"})
    signature = {p.name: (p.dtype, p.default) for p in model.metadata.signature.params.params}
    assert signature["tile_grid_size"][1] == "" and signature["tile_overlap_ratio"][1] == 0.25


def test_an_object_detection_model_tiles_through_the_box_merge(tiny_od_model_dir):
    """A model that makes no masks tiles as one that does, its pieces merged by their boxes
    alone: the answer in AutoML's object-detection schema, boxes in the picture's 0..1,
    the same answer each time, and the grid's tiles really scored (the merge of a tile's
    boxes is not the whole picture's answer)."""
    import cv2
    import mlflow.pyfunc

    model = mlflow.pyfunc.load_model(str(tiny_od_model_dir))
    ok, png = cv2.imencode(".png", scene_image(900, 600, 2))
    frame = pd.DataFrame({"image": [base64.b64encode(png.tobytes()).decode()]})
    params = {"tile_grid_size": "2x2", "score_threshold": 0.1, "max_detections": 30}
    tiled = model.predict(frame, params=params).to_dict(orient="records")
    assert_object_detection_answers(tiled)
    assert len(tiled[0]["boxes"]) <= 30
    assert model.predict(frame, params=params).to_dict(orient="records") == tiled
    whole = model.predict(frame, params={**params, "tile_grid_size": ""}).to_dict(orient="records")
    assert tiled != whole


def test_package_records_a_default_tiling_that_requests_override(tmp_path, tiny_checkpoint):
    """As AutoML's model settings: `package --tile-grid-size` is the model's default (model.json
    and the signature's defaults); a request's own params win."""
    import json

    import mlflow.pyfunc

    from helpers import TINY
    from mmdet_mlflow.cli import main

    out = tmp_path / "tiled"
    assert main(["package", "--config", TINY, "--checkpoint", str(tiny_checkpoint), "--output", str(out),
                 "--runtime", "onnx", "--tile-grid-size", "2x2", "--tile-overlap-ratio", "0.2"]) == 0
    defaults = json.loads((out / "model" / "model.json").read_text())["default_params"]
    assert defaults["tile_grid_size"] == "2x2" and defaults["tile_overlap_ratio"] == 0.2
    model = mlflow.pyfunc.load_model(str(out))
    signature = {p.name: p.default for p in model.metadata.signature.params.params}
    assert signature["tile_grid_size"] == "2x2"
    predictor = model.get_raw_model()
    assert predictor.default_params.tile_grid == (2, 2)
    assert predictor.default_params.updated({"tile_grid_size": ""}).tile_grid is None


def test_package_refuses_a_bad_default_tiling_before_writing(tmp_path, tiny_checkpoint, capsys):
    from helpers import TINY
    from mmdet_mlflow.cli import main

    assert main(["package", "--config", TINY, "--checkpoint", str(tiny_checkpoint),
                 "--output", str(tmp_path / "m"), "--tile-grid-size", "0x2"]) != 0
    assert "tile_grid_size needs at least one column" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()
