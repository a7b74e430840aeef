"""Benchmark of the answer formats (issue 22; not a test). Prints, measured in this one run:

1. per picture size (640x480, 4000x3000) and detection count (3, 100): the answer's JSON bytes
   and the encode stage's time (making the full-size masks + encoding them) for
   ``mask_format`` polygon at ``polygon_tolerance`` 0 and 1, rle and none; the masks alone are
   timed too, so what the encoding itself costs shows;
2. end to end (JPEG bytes in, JSON text out, through the one runner): "none" against
   "polygon" at 100 detections on 4000x3000 (goal: none >= 1.3x faster);
3. scoring.rle against pycocotools.mask.encode on the model's real masks (same bytes, speed);
4. the demo-like pictures (mmdet_mlflow.synth scenes): answer bytes with rle against polygons
   at tolerance 0, for the scenes' true object masks (what a trained model answers) and for
   the untrained tiny model's answers (goal: rle no larger).

The model is the untrained tiny RTMDet-Ins with its head scaled (tests/helpers.py) so that any
picture gets as many detections as asked, with real masks. Run alone (one core each for torch
and the rest is not enough for two benchmarks at once):

    flock -x /tmp/cpu.lock .venv/bin/python bench/answer_formats.py [--repeats 2] [--scenes 20]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from helpers import TINY, make_official_checkpoint, scene_image  # noqa: E402

SIZES = [(640, 480), (4000, 3000)]
COUNTS = [3, 100]
FORMATS = {  # label -> params
    "polygon tol 0": {"mask_format": "polygon", "polygon_tolerance": 0.0},
    "polygon tol 1": {"mask_format": "polygon", "polygon_tolerance": 1.0},
    "rle": {"mask_format": "rle"},
    "none": {"mask_format": "none"},
}


def best_of(repeats: int, fn):
    """(smallest seconds, last result) of ``repeats`` calls."""
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def package(work: Path):
    import mlflow_model
    from scoring.model_dir import ModelDir

    checkpoint = make_official_checkpoint(work / "tiny.pth", TINY)
    mlflow_model.save_model(work / "tiny", TINY, str(checkpoint))
    return mlflow_model.load_segmenter(ModelDir(work / "tiny").data.path, device="cpu", batch_size=1)


def encode_stage(segmenter, repeats: int) -> None:
    from scoring.encode import encode_detections

    print("1. encode stage (masks made + encoded) and answer size, per picture; "
          f"best of {repeats}")
    print(f"   {'picture':>9} {'dets':>4}  {'format':<14} {'seconds':>8} {'JSON bytes':>11}  "
          f"{'x none time':>11}  {'size / polygon tol 0':>20}")
    for width, height in SIZES:
        image = scene_image(width, height, 0)
        for count in COUNTS:
            base = segmenter.default_params.updated({"score_threshold": 0.0, "max_detections": count})
            [dets] = segmenter([image], base)
            assert len(dets) == count, f"{len(dets)} detections, wanted {count}"
            masks_only, _ = best_of(repeats, lambda: sum(1 for _ in dets.iter_masks(base.mask_threshold)))
            rows = {}
            for label, values in FORMATS.items():
                params = base.updated(values)
                seconds, answer = best_of(repeats, lambda: json.dumps(encode_detections(dets, params)))
                rows[label] = (seconds, len(answer))
            for label, (seconds, size) in rows.items():
                print(f"   {width}x{height:<4} {count:>4}  {label:<14} {seconds:8.3f} {size:11,d}  "
                      f"{seconds / rows['none'][0]:11.1f}  {size / rows['polygon tol 0'][1]:20.3f}")
            print(f"   {width}x{height:<4} {count:>4}  {'(masks alone)':<14} {masks_only:8.3f}")


def end_to_end(segmenter, repeats: int) -> None:
    import cv2

    from scoring.decode import decode_image
    from scoring.runner import score_images

    width, height = SIZES[-1]
    jpeg = cv2.imencode(".jpg", scene_image(width, height, 1), [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()
    params = {"score_threshold": 0.0, "max_detections": 100}

    def run(mask_format):
        return lambda: json.dumps([s.response for s in score_images(
            segmenter, [(0, jpeg)], {**params, "mask_format": mask_format},
            decode=lambda key, value: decode_image(value, row=key))])

    # interleaved, so drift in the machine's load hits both alike
    times = {"polygon": float("inf"), "none": float("inf")}
    for _ in range(repeats):
        for mask_format in times:
            seconds, _ = best_of(1, run(mask_format))
            times[mask_format] = min(times[mask_format], seconds)
    print(f"\n2. end to end, JPEG bytes -> JSON, {width}x{height}, 100 detections, best of {repeats}: "
          f"polygon {times['polygon']:.2f} s, none {times['none']:.2f} s -> none is "
          f"{times['polygon'] / times['none']:.1f}x faster (goal >= 1.3x)")


def rle_against_pycocotools(segmenter, repeats: int) -> None:
    from pycocotools import mask as mask_util

    from scoring import rle

    print("\n3. scoring.rle.encode against pycocotools.mask.encode (+ asfortranarray, + str), "
          f"the model's masks, best of {repeats}")
    for width, height in SIZES:
        params = segmenter.default_params.updated({"score_threshold": 0.0, "max_detections": 20})
        [dets] = segmenter([scene_image(width, height, 2)], params)
        masks = list(dets.iter_masks(params.mask_threshold))

        def theirs():
            out = []
            for mask in masks:
                encoded = mask_util.encode(np.asfortranarray(mask, dtype=np.uint8))
                out.append({"size": [int(v) for v in encoded["size"]], "counts": encoded["counts"].decode()})
            return out

        ours_s, ours = best_of(repeats, lambda: [rle.encode(mask) for mask in masks])
        theirs_s, want = best_of(repeats, theirs)
        assert ours == want, "scoring.rle differs from pycocotools"
        print(f"   {width}x{height}: {len(masks)} masks, identical bytes; ours {ours_s * 1e3 / len(masks):.2f} ms "
              f"a mask, pycocotools {theirs_s * 1e3 / len(masks):.2f} ms -> {theirs_s / ours_s:.1f}x")


def demo_pictures(segmenter, scenes: int) -> None:
    from mmdet_mlflow.synth import synth_scene
    from scoring.encode import encode_detections, mask_polygons, normalized_segments
    from scoring.rle import encode
    from scoring.schema import detection_record

    truth = {"rle": [], "polygon": []}
    model = {"rle": [], "polygon": []}
    for index in range(scenes):
        scene = synth_scene(0, index)
        height, width = scene.image.shape[:2]
        size = (width, height)
        box = (0, 0, width, height)
        for name in truth:
            boxes = [detection_record(box, size, obj.label, 1.0,
                                      polygons=normalized_segments(mask_polygons(obj.mask, 0), size)
                                      if name == "polygon" else None,
                                      rle=encode(obj.mask) if name == "rle" else None)
                     for obj in scene.objects]
            truth[name].append(len(json.dumps({"boxes": boxes})))
        [dets] = segmenter([scene.image])
        for name, values in (("rle", {"mask_format": "rle"}),
                             ("polygon", {"mask_format": "polygon", "polygon_tolerance": 0.0})):
            model[name].append(len(json.dumps(encode_detections(dets, segmenter.default_params.updated(values)))))
    print(f"\n4. demo-like pictures (mmdet_mlflow.synth, seed 0, {scenes} scenes, 480x360..640x480), "
          "mean JSON bytes per picture:")
    for what, sizes in (("the scenes' true object masks", truth),
                        ("the untrained tiny model's answers (score >= 0.3)", model)):
        rle_mean, poly_mean = np.mean(sizes["rle"]), np.mean(sizes["polygon"])
        larger = sum(r > p for r, p in zip(sizes["rle"], sizes["polygon"]))
        print(f"   {what}: rle {rle_mean:,.0f}, polygon tol 0 {poly_mean:,.0f} -> rle/polygon "
              f"{rle_mean / poly_mean:.2f}; rle larger on {larger} of {scenes} pictures")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--scenes", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        segmenter = package(Path(work))
        encode_stage(segmenter, args.repeats)
        end_to_end(segmenter, args.repeats)
        rle_against_pycocotools(segmenter, args.repeats)
        demo_pictures(segmenter, args.scenes)


if __name__ == "__main__":
    main()
