"""Benchmark of the answer formats (not a test). Prints, measured in this one run:

1. per picture size (640x480, 4000x3000) and detection count (3, 100): the answer's JSON bytes
   and the encode stage's time (making the full-size masks + encoding them + the JSON text) for
   ``mask_format`` polygon at ``polygon_tolerance`` 0 and 1, rle and none ("none" makes no
   mask); the encoding alone is timed too;
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

from _quiet import quiet_logs

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
    return mlflow_model.load_predictor(ModelDir(work / "tiny").data.path, device="cpu", batch_size=1)


def encode_stage(predictor, repeats: int) -> None:
    """The masks are made once per picture and count; each format's encoder is timed on each
    mask as it goes by (100 full-size masks of 4000x3000 do not fit in memory together)."""
    from scoring.encode import mask_polygons, normalized_segments
    from scoring.rle import encode
    from scoring.schema import OUTPUT_COLUMN, detection_record

    encoders = {
        "polygon tol 0": lambda mask, size: {"polygons": normalized_segments(mask_polygons(mask, 0.0), size)},
        "polygon tol 1": lambda mask, size: {"polygons": normalized_segments(mask_polygons(mask, 1.0), size)},
        "rle": lambda mask, size: {"rle": encode(mask)},
        "none": lambda mask, size: {},
    }
    print("1. per picture: the masks made once (seconds), then each format's encoding alone (seconds, "
          f"best of {repeats} per mask) and the answer's JSON bytes")
    print(f"   {'picture':>9} {'dets':>4}  {'format':<14} {'encode s':>9} {'masks+encode s':>15} "
          f"{'JSON bytes':>11}  {'size / polygon tol 0':>20}")
    for width, height in SIZES:
        image = scene_image(width, height, 0)
        for count in COUNTS:
            params = predictor.default_params.updated({"score_threshold": 0.0, "max_detections": count})
            [dets] = predictor([image], params)
            assert len(dets) == count, f"{len(dets)} detections, wanted {count}"
            seconds = dict.fromkeys(encoders, 0.0)
            parts = {label: [] for label in encoders}
            start = time.perf_counter()
            masks = dets.iter_masks(params.mask_threshold)
            making = 0.0
            for mask in masks:
                making += time.perf_counter() - start
                for label, fn in encoders.items():
                    spent, part = best_of(repeats, lambda: fn(mask, dets.image_size))
                    seconds[label] += spent
                    parts[label].append(part)
                start = time.perf_counter()
            sizes = {}
            for label in encoders:
                boxes = [detection_record(dets.boxes[i], dets.image_size, dets.label_name(i), dets.scores[i],
                                          **parts[label][i]) for i in range(len(dets))]
                spent, text = best_of(repeats, lambda: json.dumps({OUTPUT_COLUMN: boxes}))
                seconds[label] += spent
                sizes[label] = len(text)
            for label in encoders:
                stage = seconds[label] + (making if label != "none" else 0.0)
                print(f"   {width}x{height:<4} {count:>4}  {label:<14} {seconds[label]:9.4f} {stage:15.3f} "
                      f"{sizes[label]:11,d}  {sizes[label] / sizes['polygon tol 0']:20.3f}")
            print(f"   {width}x{height:<4} {count:>4}  {'(masks made)':<14} {'':9} {making:15.3f}")


def end_to_end(predictor, repeats: int) -> None:
    import cv2

    from scoring.decode import decode_image
    from scoring.runner import score_images

    width, height = SIZES[-1]
    jpeg = cv2.imencode(".jpg", scene_image(width, height, 1), [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()
    params = {"score_threshold": 0.0, "max_detections": 100}

    def run(mask_format):
        return lambda: json.dumps([s.response for s in score_images(
            predictor, [(0, jpeg)], {**params, "mask_format": mask_format},
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


def rle_against_pycocotools(predictor, repeats: int) -> None:
    from pycocotools import mask as mask_util

    from scoring import rle

    print("\n3. scoring.rle.encode against pycocotools.mask.encode (+ asfortranarray, + str), "
          f"the model's masks, best of {repeats}")
    for width, height in SIZES:
        params = predictor.default_params.updated({"score_threshold": 0.0, "max_detections": 20})
        [dets] = predictor([scene_image(width, height, 2)], params)
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


def demo_pictures(predictor, scenes: int) -> None:
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
        [dets] = predictor([scene.image])
        for name, values in (("rle", {"mask_format": "rle"}),
                             ("polygon", {"mask_format": "polygon", "polygon_tolerance": 0.0})):
            model[name].append(len(json.dumps(encode_detections(dets, predictor.default_params.updated(values)))))
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
    parser.add_argument("--parts", default="1,2,3,4", help="which parts to run, e.g. 1,4")
    args = parser.parse_args()
    quiet_logs()
    parts = set(args.parts.split(","))
    with tempfile.TemporaryDirectory() as work:
        predictor = package(Path(work))
        for part, run in (("1", lambda: encode_stage(predictor, args.repeats)),
                          ("2", lambda: end_to_end(predictor, args.repeats)),
                          ("3", lambda: rle_against_pycocotools(predictor, args.repeats)),
                          ("4", lambda: demo_pictures(predictor, args.scenes))):
            if part in parts:
                run()


if __name__ == "__main__":
    main()
