"""Benchmark of mask work per detection (not a test). Prints, measured in this one run, for the
torch and the ONNX runtime, at 640x480 and 4032x3024 (12 MP), the time to make each detection's
mask and trace its polygons:

- before: the whole-picture mask of every detection (the way before masks were made over windows), traced whole;
- exact: each mask over the window where it can be True (``MaskGeometry.support_window``), the
  same masks, traced in the window;
- box+4: the same, cut to its box and 4 low-resolution cells (``box_margin_cells=4``).

Three kinds of masks: the untrained tiny model's own (its masks cover most of the picture, so
the exact window saves nothing there; the box cut does), and compact masks as a trained model
makes (a blob filling each box, written into the same low-resolution logits), in the model's
detection boxes (small: the untrained model's) and in boxes of 5 % of the picture each. Also the
whole answer (forward + masks + polygons) for a 12 MP picture with 62 detections.

    .venv/bin/python bench/masks.py [--repeats 2]   (under flock -x /tmp/cpu.lock)
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from _quiet import packaging_to_stderr, quiet_logs

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from helpers import TINY, make_official_checkpoint, scene_image  # noqa: E402

DETECTIONS = 62
BOX_SHARE = 0.05  # phone photos of a few objects: boxes about 5 % of the picture


def models(work: Path):
    """(torch predictor, ONNX predictor) of one untrained tiny model."""
    import mlflow_model
    from mlflow_model.onnx_export import export_to_weights_dir
    from scoring.runtimes.onnx_rtmdet import load_onnx_predictor

    checkpoint = make_official_checkpoint(work / "tiny.pth", TINY)
    onnx_dir = work / "onnx"
    with packaging_to_stderr():
        mlflow_model.save_model(work / "tiny", TINY, str(checkpoint))
        shutil.copytree(work / "tiny" / "model", onnx_dir)
        export_to_weights_dir(onnx_dir)
    return (mlflow_model.load_predictor(work / "tiny" / "model", device="cpu", batch_size=1),
            load_onnx_predictor(onnx_dir, num_threads=2))


def picture(width: int, height: int):
    import cv2

    small = scene_image(max(64, width // 6), max(64, height // 6), 3)
    return cv2.resize(small, (width, height), interpolation=cv2.INTER_NEAREST)


def compact_logits(low_shape, boxes, geometry) -> np.ndarray:
    """Low-resolution logits of a blob filling each box (positive inside an ellipse inscribed
    in it, falling off outside), as a trained model's masks lie in their boxes."""
    h, w = low_shape
    cell_x, cell_y = geometry.cell_pixels()
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    out = np.empty((len(boxes), h, w), np.float32)
    for i, (x1, y1, x2, y2) in enumerate(boxes):
        cx, cy = (x1 + x2) / 2 / cell_x, (y1 + y2) / 2 / cell_y
        rx, ry = max(0.5, (x2 - x1) / 2 / cell_x), max(0.5, (y2 - y1) / 2 / cell_y)
        out[i] = 4 * (1 - ((xx + 0.5 - cx) / rx) ** 2 - ((yy + 0.5 - cy) / ry) ** 2)
    return out


def object_boxes(width: int, height: int, count: int, share: float) -> np.ndarray:
    """``count`` boxes of ``share`` of the picture each (its aspect), spread over it."""
    rng = np.random.default_rng(0)
    w, h = width * share ** 0.5, height * share ** 0.5
    x = rng.uniform(0, width - w, count)
    y = rng.uniform(0, height - h, count)
    return np.stack([x, y, x + w, y + h], axis=1).astype(np.float32)


def mask_sources(predictor, dets, logits, boxes):
    """(before, exact, box+4) mask makers for one image's detections and low-res logits: each a
    function of the threshold returning an iterator of (pixels, offset)."""
    from scoring.runtimes.masks import MaskWindow
    from scoring.runtimes.rtmdet_numpy import NumpyMaskResampler

    masks = dets.masks
    if isinstance(masks, NumpyMaskResampler):
        geometry = masks.geometry
        scale = (1 / geometry.inverse_scale_factor[0], 1 / geometry.inverse_scale_factor[1])

        def make(margin):
            return NumpyMaskResampler(logits, geometry.stride, scale, geometry.ori_hw, boxes, margin)

        def before(t):
            return (MaskWindow.whole(m) for m in make(None).iter_whole_masks(t))
    else:
        import torch

        from scoring.runtimes.torch_rtmdet import DeferredMasks

        tensor = torch.from_numpy(logits)

        def make(margin):
            return DeferredMasks(tensor, masks.resampler, boxes, margin)

        def before(t):
            return (MaskWindow.whole(m) for m in masks.resampler.iter_masks(tensor, t))
    return {"before": before, "exact": lambda t: make(None).iter_windows(t),
            "box+4": lambda t: make(4).iter_windows(t)}


def time_masks(make, repeats: int) -> tuple[float, int]:
    """(seconds per detection, mask pixels) to make and trace every mask, best of ``repeats``."""
    from scoring.encode import mask_polygons

    best, pixels = float("inf"), 0
    for _ in range(repeats):
        start = time.perf_counter()
        pixels = 0
        count = 0
        for window in make(0.5):
            mask_polygons(window.pixels, 0.5, window.offset)
            pixels += int(window.pixels.sum())
            count += 1
        best = min(best, (time.perf_counter() - start) / max(1, count))
    return best, pixels


def whole_answer(predictor, image, margin, repeats: int) -> tuple[float, float]:
    """Seconds for one picture's (forward pass, masks + polygons) as the server runs them."""
    from scoring.encode import encode_detections

    params = predictor.default_params.updated({"max_detections": DETECTIONS, "score_threshold": 0.0})
    predictor.mask_box_margin = margin
    best = (float("inf"), float("inf"))
    try:
        for _ in range(repeats):
            start = time.perf_counter()
            dets = predictor([image], params)[0]
            middle = time.perf_counter()
            encode_detections(dets, params)
            end = time.perf_counter()
            if end - start < sum(best):
                best = (middle - start, end - middle)
    finally:
        predictor.mask_box_margin = None
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--sizes", default="640x480,4032x3024", help="pictures, WxH,...")
    parser.add_argument("--skip-answer", action="store_true", help="not the whole 12 MP answer")
    args = parser.parse_args()
    quiet_logs()
    sizes = [tuple(int(v) for v in size.split("x")) for size in args.sizes.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        predictors = models(Path(tmp))
        print("per-detection mask time (make + trace), ms; ratio = before / after")
        for predictor in predictors:
            params = predictor.default_params.updated({"max_detections": DETECTIONS,
                                                       "score_threshold": 0.0})
            for width, height in sizes:
                dets = predictor([picture(width, height)], params)[0]
                own = (dets.masks.mask_logits if predictor.runtime == "onnx"
                       else dets.masks.mask_logits.numpy())
                geometry = dets.masks.geometry if predictor.runtime == "onnx" else dets.masks.resampler.geometry
                areas = (dets.boxes[:, 2] - dets.boxes[:, 0]) * (dets.boxes[:, 3] - dets.boxes[:, 1])
                share = float(np.median(areas)) / (width * height)
                large = object_boxes(width, height, len(dets), BOX_SHARE)
                for kind, logits, boxes in (
                        ("untrained", own, dets.boxes),
                        ("compact", compact_logits(own.shape[-2:], dets.boxes, geometry), dets.boxes),
                        (f"compact {BOX_SHARE:.0%}", compact_logits(own.shape[-2:], large, geometry), large)):
                    timings = {name: time_masks(make, args.repeats)
                               for name, make in mask_sources(predictor, dets, logits, boxes).items()}
                    before = timings["before"][0]
                    cells = "  ".join(f"{name} {t * 1000:7.2f} (x{before / t:5.1f}, {px} px)"
                                      for name, (t, px) in timings.items())
                    print(f"{predictor.runtime:5s} {width}x{height} {len(dets):3d} dets (median box "
                          f"{share:.1%} of picture) {kind:9s}: {cells}")
        if args.skip_answer:
            return
        print(f"whole answer, 4032x3024, {DETECTIONS} detections, untrained tiny model, seconds "
              f"(forward pass + masks and polygons):")
        image = picture(4032, 3024)
        for predictor in predictors:
            cells = []
            for name, margin in (("exact windows", None), ("box+4", 4)):
                forward, masks = whole_answer(predictor, image, margin, args.repeats)
                cells.append(f"{name} {forward + masks:.3f} ({forward:.3f} + {masks:.3f})")
            print(f"{predictor.runtime:5s} " + "  ".join(cells))


if __name__ == "__main__":
    main()
