"""Benchmark of the served predict path (not a test). Prints, measured in this one run:

1. throughput of our end-to-end pyfunc predict (base64 in, JSON out) divided by bare mmdet
   inference (``inference_detector`` on decoded arrays) on the same images, for tiny and x,
   batch 1 and 8 (goal >= 0.95);
2. peak RSS above the loaded model for one 12-megapixel image with 100 detections, ours vs
   bare mmdet (goal <= 1.5 GB);
3. JSON size of simplified (default polygon_tolerance) vs raw polygons, and the IoU of the
   masks they rasterize to (goal >= 5x smaller at IoU >= 0.98).

Models are untrained (this machine cannot download the COCO weights), with heads scaled so that
every image gets 100 detections with real masks: the worst case for post-processing.

    .venv/bin/python bench/predict.py [--models tiny,x] [--repeats 3] [--batches 1,8] [--skip-memory]
"""
from __future__ import annotations

import argparse
import base64
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from _quiet import quiet_logs

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from helpers import TINY, X, make_official_checkpoint, scene_image  # noqa: E402

CONFIGS = {"tiny": TINY, "x": X}


def encode_png(image) -> str:
    import cv2

    return base64.b64encode(cv2.imencode(".png", image)[1].tobytes()).decode()


def package(work: Path, name: str) -> Path:
    import mlflow_model

    checkpoint = make_official_checkpoint(work / f"{name}.pth", CONFIGS[name])
    mlflow_model.save_model(work / name, CONFIGS[name], str(checkpoint))
    return work / name


def throughput(model_dir: Path, batch: int, repeats: int) -> tuple[float, float]:
    """(ours, bare) images per second on the same 640x480 pictures."""
    import pandas as pd
    import torch
    from mmdet.apis import inference_detector

    import mlflow.pyfunc
    import mlflow_model

    images = [scene_image(640, 480, seed) for seed in range(batch)]
    frame = pd.DataFrame({"image": [encode_png(img) for img in images]})
    pyfunc = mlflow.pyfunc.load_model(str(model_dir))
    detector = mlflow_model.load_model(str(model_dir))
    params = {"score_threshold": 0.05}

    def ours():
        json.dumps(pyfunc.predict(frame, params=params)["boxes"].tolist())

    def bare():
        with torch.no_grad():
            inference_detector(detector, images)

    ours(), bare()  # warm up
    timings = {"ours": [], "bare": []}
    for _ in range(repeats):  # interleaved, so drift in machine load hits both alike
        for name, fn in (("ours", ours), ("bare", bare)):
            start = time.perf_counter()
            fn()
            timings[name].append(time.perf_counter() - start)
    return batch / min(timings["ours"]), batch / min(timings["bare"])


PEAK_SCRIPT = r"""
import json, sys, base64
sys.path[:0] = [sys.argv[1], sys.argv[1] + "/tests"]
from helpers import scene_image
import cv2, numpy as np

def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024

image = cv2.resize(scene_image(1000, 750, 5), (4000, 3000), interpolation=cv2.INTER_NEAREST)
payload = base64.b64encode(cv2.imencode(".jpg", image)[1].tobytes()).decode()
if sys.argv[3] == "ours":
    import mlflow.pyfunc, pandas as pd
    model = mlflow.pyfunc.load_model(sys.argv[2])
    run = lambda: model.predict(pd.DataFrame({"image": [payload]}), params={"score_threshold": 0.0})["boxes"][0]
else:
    import mlflow_model, torch
    from mmdet.apis import inference_detector
    detector = mlflow_model.load_model(sys.argv[2])
    def run():
        with torch.no_grad():
            return inference_detector(detector, image).pred_instances
if sys.argv[3] == "ours":
    del image  # ours starts from the request's bytes, bare mmdet from the decoded array
open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
base = rss("VmRSS:")
out = run()
print(json.dumps({"detections": len(out), "peak_above_model": rss("VmHWM:") - base}))
"""


def peak_rss(model_dir: Path, which: str) -> dict:
    done = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(ROOT), str(model_dir), which],
                          capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def polygon_cost(model_dir: Path) -> dict:
    """Raw vs simplified polygons of the same detections on a 12-megapixel and a 640x480 image."""
    import cv2

    import mlflow_model
    from scoring.encode import mask_polygons
    from scoring.schema import PredictParams

    predictor = mlflow_model.load_predictor(model_dir / "model")
    tolerance = predictor.default_params.polygon_tolerance
    totals = {"raw_bytes": 0, "simplified_bytes": 0, "ious": []}
    for image in (scene_image(640, 480, 7),
                  cv2.resize(scene_image(1000, 750, 5), (4000, 3000), interpolation=cv2.INTER_NEAREST)):
        dets = predictor([image], PredictParams(score_threshold=0.05))[0]
        height, width = image.shape[:2]
        for mask in dets.iter_masks(0.5):
            drawn = {}
            for name, tol in (("raw", 0.0), ("simplified", tolerance)):
                polygons = mask_polygons(mask, tol)
                segments = [np.round(p / [width, height], 5).ravel().tolist() for p in polygons]
                totals[f"{name}_bytes"] += len(json.dumps(segments))
                canvas = np.zeros((height, width), np.uint8)
                if polygons:
                    cv2.fillPoly(canvas, [p.astype(np.int32) for p in polygons], 1)
                drawn[name] = canvas.astype(bool)
            union = (drawn["raw"] | drawn["simplified"]).sum()
            if union:
                totals["ious"].append((drawn["raw"] & drawn["simplified"]).sum() / union)
    ious = np.array(totals["ious"])
    return {"tolerance_px": tolerance, "ratio": totals["raw_bytes"] / totals["simplified_bytes"],
            "raw_bytes": totals["raw_bytes"], "simplified_bytes": totals["simplified_bytes"],
            "mean_iou": float(ious.mean()), "min_iou": float(ious.min()), "masks": len(ious)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny,x")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batches", default="1,8", help="batch sizes to time (default 1,8)")
    parser.add_argument("--skip-memory", action="store_true", help="only time throughput")
    args = parser.parse_args()
    quiet_logs()
    import torch

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"device {'cuda' if torch.cuda.is_available() else 'cpu'}")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name in args.models.split(","):
            model_dir = package(work, name)
            for batch in map(int, args.batches.split(",")):
                ours, bare = throughput(model_dir, batch, args.repeats)
                print(f"[throughput] {name} batch {batch}: ours {ours:.2f} img/s, bare mmdet "
                      f"{bare:.2f} img/s, ratio {ours / bare:.3f} (goal >= 0.95)", flush=True)
            if args.skip_memory:
                continue
            ours, bare = peak_rss(model_dir, "ours"), peak_rss(model_dir, "bare")
            print(f"[memory] {name}, one 4000x3000 image, {ours['detections']} detections: peak RSS "
                  f"above the loaded model: ours {ours['peak_above_model'] / 2**30:.2f} GB, bare mmdet "
                  f"{bare['peak_above_model'] / 2**30:.2f} GB (goal: ours <= 1.5 GB)", flush=True)
            if name == "tiny":
                cost = polygon_cost(model_dir)
                print(f"[polygons] tolerance {cost['tolerance_px']} px over {cost['masks']} masks: "
                      f"raw {cost['raw_bytes']} B, simplified {cost['simplified_bytes']} B, "
                      f"{cost['ratio']:.1f}x smaller, mask IoU mean {cost['mean_iou']:.4f} min "
                      f"{cost['min_iou']:.4f} (goal >= 5x at IoU >= 0.98)", flush=True)


if __name__ == "__main__":
    main()
