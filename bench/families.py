"""Benchmark of every model family (not a test): our pyfunc predict end to end (base64 PNG ->
decode -> runtime -> encode) against bare mmdet ``inference_detector`` on the same picture and
weights, and the peak resident memory (VmHWM) of each.

Per family, one picture at the size of its config's test resize (the picture fills the model's
input: the real cost of one request), random weights in mmdet's published layout
(tests/helpers.make_official_checkpoint, class biases lifted so there are detections). Three
processes per family, so that each memory peak is its own: one makes the checkpoint, the model
folder and the picture; one loads our model and predicts; one loads mmdet's detector and runs
``inference_detector``. Each predicts once to warm up, then times best of --repeats. Only the
results go to stdout (mmengine's logs are silenced, warnings go to stderr).

    .venv/bin/python bench/families.py [--families rtmdet,mask-rcnn] [--repeats 3]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# family -> the config it is measured with (the R50 or tiny variant)
CONFIGS = {
    "rtmdet-ins": "rtmdet-ins_tiny_8xb32-300e_coco",
    "rtmdet": "rtmdet_tiny_8xb32-300e_coco",
    "mask-rcnn": "mask-rcnn_r50_fpn_1x_coco",
    "yolof": "yolof_r50-c5_8xb8-1x_coco",
    "vfnet": "vfnet_r50-mdconv-c3-c5_fpn_ms-2x_coco",
    "deformable-detr": "deformable-detr-refine-twostage_r50_16xb2-50e_coco",
    "sparse-rcnn": "sparse-rcnn_r50_fpn_300-proposals_crop-ms-480-800-3x_coco",
    "mmdet-detection": "retinanet_r18_fpn_1x_coco",
}
CLASSES = ["cat", "dog", "bird"]


def _quiet() -> None:
    """mmengine's logger prints to stdout: only results may go there."""
    import logging

    sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
    from mmengine.logging import MMLogger

    MMLogger.get_instance("mmengine").setLevel(logging.ERROR)
    logging.getLogger("mmengine").setLevel(logging.ERROR)


def test_scale(config: str) -> tuple[int, int]:
    """(width, height) of the config's test resize."""
    from mlflow_model.configs import load_config

    for step in load_config(config).get("test_pipeline") or []:
        if str(step.get("type", "")).endswith("Resize") and "scale" in step:
            width, height = step["scale"]
            return int(width), int(height)
    return 640, 640


def prepare(config: str, folder: Path) -> None:
    import mlflow_model
    from helpers import make_official_checkpoint, scene_image, write_png

    checkpoint = make_official_checkpoint(folder / "official.pth", config, classes=CLASSES, seed=1)
    mlflow_model.save_model(folder / "model", config, str(checkpoint))
    width, height = test_scale(config)
    write_png(folder / "picture.png", scene_image(width, height, 0))


def _best(run, repeats: int) -> tuple[float, int]:
    found = run()  # warm-up: first-call allocations and lazy imports
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        found = run()
        best = min(best, time.perf_counter() - start)
    return best, found


def measure(side: str, config: str, folder: Path, repeats: int) -> dict:
    if side == "ours":
        import mlflow.pyfunc
        import pandas as pd
        from helpers import b64

        model = mlflow.pyfunc.load_model(str(folder / "model"))
        frame = pd.DataFrame({"image": [b64(folder / "picture.png")]})
        seconds, found = _best(lambda: len(model.predict(frame)["boxes"][0]), repeats)
    else:
        import cv2
        from mmdet.apis import inference_detector, init_detector

        from mlflow_model.configs import load_config

        detector = init_detector(load_config(config, num_classes=len(CLASSES)),
                                 str(folder / "official.pth"), device="cpu")
        image = cv2.imread(str(folder / "picture.png"))
        seconds, found = _best(lambda: len(inference_detector(detector, image).pred_instances), repeats)
        return {"seconds": seconds, "detections": found, "peak_rss_mb": peak_rss_mb(),
                "picture": f"{image.shape[1]}x{image.shape[0]}"}
    return {"seconds": seconds, "detections": found, "peak_rss_mb": peak_rss_mb()}


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _child(*args: str) -> str:
    done = subprocess.run([sys.executable, __file__, *args], stdout=subprocess.PIPE, text=True,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if done.returncode:
        raise SystemExit(f"{' '.join(args)}: exit {done.returncode} (its stderr is above)")
    return done.stdout


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", default=",".join(CONFIGS),
                        help=f"comma-separated, of: {', '.join(CONFIGS)}")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prepare", nargs=2, metavar=("CONFIG", "FOLDER"), help=argparse.SUPPRESS)
    parser.add_argument("--measure", nargs=3, metavar=("SIDE", "CONFIG", "FOLDER"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.prepare:
        _quiet()
        prepare(args.prepare[0], Path(args.prepare[1]))
        return 0
    if args.measure:
        _quiet()
        side, config, folder = args.measure
        print(json.dumps(measure(side, config, Path(folder), args.repeats)))
        return 0

    families = [f.strip() for f in args.families.split(",") if f.strip()]
    unknown = [f for f in families if f not in CONFIGS]
    if unknown:
        parser.error(f"unknown families {unknown}; known: {', '.join(CONFIGS)}")
    print(f"{'family':<16} {'config':<58} {'picture':>9} {'ours s':>8} {'mmdet s':>8} {'ratio':>6} "
          f"{'dets':>9} {'ours MB':>8} {'mmdet MB':>8}", flush=True)
    for family in families:
        config = CONFIGS[family]
        with tempfile.TemporaryDirectory(prefix=f"bench-{family}-") as tmp:
            _child("--prepare", config, tmp)
            ours, mmdet = (json.loads(_child("--measure", side, config, tmp, "--repeats", str(args.repeats))
                                      .strip().splitlines()[-1]) for side in ("ours", "mmdet"))
        print(f"{family:<16} {config:<58} {mmdet['picture']:>9} {ours['seconds']:>8.3f} "
              f"{mmdet['seconds']:>8.3f} {ours['seconds'] / mmdet['seconds']:>6.2f} "
              f"{ours['detections']:>4}/{mmdet['detections']:<4} {ours['peak_rss_mb']:>8.0f} "
              f"{mmdet['peak_rss_mb']:>8.0f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
