"""Benchmark of tiled inference (scoring.tiling) against untiled inference and SAHI
(not a test). Prints, measured in this one run, on unseen synthetic fridge pictures made 4x4
larger (``synth --mosaic 4``: 16 ordinary scenes side by side, 2560x1920, objects unchanged)
and on the same scenes as ordinary pictures (the reference):

- tiny, fine-tuned by the demo's recipe (``finetune --config rtmdet-ins_tiny_8xb32-300e_coco
  --checkpoint none --recipe quick-cpu`` on ``synth --num-images 300``): segm mAP@[.5:.95] and
  AP50 through the project's own ``mmdet_mlflow.evaluate`` (pycocotools) for the original
  pictures untiled, and the large pictures untiled, tiled (tile_grid_size 4x4, overlap 0.25)
  and through SAHI (the ``sahi`` package: the same model as a SAHI DetectionModel, the same
  slices as our tiles, overlap 0.25, the whole picture too, SAHI's default merge GREEDYNMM/IOS);
- tiny and x (rtmdet-ins_x_8xb16-300e_coco, mmdet's random initial weights: network cost only,
  it finds nothing): seconds per large picture for each (decode -> detections -> the public
  answer's polygons), tiled at MMDET_MLFLOW_BATCH_SIZE 1 and 4, and the peak RSS of each;
- the ratios with goals: tiled mAP / original mAP (>= 0.9), tiled mAP / SAHI mAP
  (>= 1), tiled time / ((tiles + 1) x one untiled answer at batch 1) (<= 1.2), tiled time /
  SAHI time (<= 1).

Each measurement runs in its own process (peak RSS is per process), one after the other; times
are the median over the timed pictures after a warm-up pass of the network. Outputs are cached in --work
(the training data, the fine-tuned model, the test sets, the x model), so a second run only
measures; --model reuses a fine-tuned model folder instead of training one (~10-20 min alone
on 2 cores). Run it alone:

    flock -x /tmp/cpu.lock .venv/bin/python bench/tiling.py [--model DIR] [--work DIR]
        [--pictures 5] [--timed 3] [--models tiny,x]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _quiet import progress, quiet_logs

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

TINY_CONFIG = "rtmdet-ins_tiny_8xb32-300e_coco"
X_CONFIG = "rtmdet-ins_x_8xb16-300e_coco"
MOSAIC = 4
# 5x5 at overlap 0.25 cuts a 2560x1920 picture into 640x480 tiles: the size of the scenes it is
# made of (what the model was trained on), and the slices of the SAHI measurement the goals came from.
# 4x4 gives 788x591 tiles, which the network shrinks further than it shrank its training pictures.
DEFAULT_GRID = "5x5"
GRID = DEFAULT_GRID  # main() sets it from --grid; measure() from its spec
OVERLAP = 0.25
TRAINING_IMAGES = 300  # the demo's set
TEST_SEED = 1  # the demo trains on seed 0: seed 1's scenes are unseen


# --------------------------------------------------------------------------------------------
# SAHI around our predictor

def sahi_model_class():
    """A SAHI DetectionModel running our predictor (untiled, one slice a call: SAHI's own way)
    and handing SAHI each detection's box, score, class and mask polygons in slice pixels, as
    SAHI's mmdet wrapper does (from the mask window, not a slice-size mask: no handicap)."""
    from sahi.models.base import DetectionModel
    from sahi.prediction import ObjectPrediction
    from sahi.utils.compatibility import fix_full_shape_list, fix_shift_amount_list
    from sahi.utils.cv import get_coco_segmentation_from_bool_mask

    class OurPredictorForSahi(DetectionModel):
        def __init__(self, predictor, params, **kwargs):
            self.predictor, self.params = predictor, params
            super().__init__(model=predictor, confidence_threshold=params.score_threshold,
                             mask_threshold=params.mask_threshold,
                             category_mapping={str(i): n for i, n in enumerate(predictor.class_names)},
                             **kwargs)

        def load_model(self):
            self.set_model(self.predictor)

        def set_model(self, model, **kwargs):
            self.model = model

        def perform_inference(self, image):
            self._original_predictions = self.predictor([image], self.params)

        def _create_object_prediction_list_from_original_predictions(self, shift_amount_list=[[0, 0]],
                                                                     full_shape_list=None):
            shifts = fix_shift_amount_list(shift_amount_list)
            shapes = fix_full_shape_list(full_shape_list)
            per_image = []
            for k, dets in enumerate(self._original_predictions):
                found = []
                windows = dets.iter_windows(self.params.mask_threshold)
                for i, window in zip(range(len(dets)), windows):
                    segmentation = [
                        [v + (window.offset[0] if j % 2 == 0 else window.offset[1])
                         for j, v in enumerate(polygon)]
                        for polygon in get_coco_segmentation_from_bool_mask(window.pixels)]
                    if not segmentation:
                        continue
                    found.append(ObjectPrediction(
                        bbox=[max(0.0, float(v)) for v in dets.boxes[i]], category_id=int(dets.labels[i]),
                        category_name=dets.label_name(i), score=float(dets.scores[i]),
                        segmentation=segmentation, shift_amount=[int(v) for v in shifts[k]],
                        full_shape=None if shapes is None else [int(v) for v in shapes[k]]))
                per_image.append(found)
            self._object_prediction_list_per_image = per_image

    return OurPredictorForSahi


class SahiMasks:
    """The MaskSource of SAHI's merged predictions: each polygon set filled within its box (a
    window), so our encoder and evaluate take SAHI's masks as they take ours."""

    def __init__(self, segmentations, boxes, image_hw):
        self.segmentations, self.boxes, self.image_hw = segmentations, boxes, image_hw

    def __len__(self):
        return len(self.segmentations)

    def select(self, indices):
        return SahiMasks([self.segmentations[i] for i in indices], self.boxes[list(indices)], self.image_hw)

    def iter_windows(self, threshold):
        import cv2
        import numpy as np

        from scoring.runtimes.masks import MaskWindow

        height, width = self.image_hw
        for polygons in self.segmentations:
            points = [np.asarray(p, np.float64).reshape(-1, 2) for p in polygons if len(p) >= 6]
            if not points:
                yield MaskWindow(np.zeros((1, 1), bool), (0, 0), self.image_hw)
                continue
            every = np.concatenate(points)
            x0, y0 = (max(0, int(v)) for v in np.floor(every.min(axis=0)))
            x1 = min(width, int(np.ceil(every[:, 0].max())) + 1)
            y1 = min(height, int(np.ceil(every[:, 1].max())) + 1)
            pixels = np.zeros((max(1, y1 - y0), max(1, x1 - x0)), np.uint8)
            cv2.fillPoly(pixels, [np.round(p - (x0, y0)).astype(np.int32) for p in points], 1)
            yield MaskWindow(pixels.astype(bool), (x0, y0), self.image_hw)

    def iter_masks(self, threshold):
        return (window.full() for window in self.iter_windows(threshold))


class SahiPredictor:
    """Our Predictor interface over SAHI's sliced prediction, so that ``score_images`` (the
    public answer) and ``evaluate`` (mAP) run it exactly as they run ours."""

    runtime = "sahi"
    batch_size = 1

    def __init__(self, predictor, slice_wh, overlap, force_merge=True):
        self.inner = predictor
        self.force_merge = force_merge
        self.class_names = predictor.class_names
        self.default_params = predictor.default_params
        self.configured_score_threshold = predictor.configured_score_threshold
        self.input_scale = predictor.input_scale
        self.slice_wh, self.overlap = slice_wh, overlap
        self.model_class = sahi_model_class()

    def image_problem(self, image):
        return None

    def __call__(self, images, params=None):
        import numpy as np
        from sahi.predict import get_sliced_prediction

        from scoring.runtimes.base import ImageDetections

        params = params or self.default_params
        model = self.model_class(self.inner, params)
        out = []
        for image in images:
            result = get_sliced_prediction(
                image, model, slice_height=self.slice_wh[1], slice_width=self.slice_wh[0],
                overlap_height_ratio=self.overlap, overlap_width_ratio=self.overlap,
                perform_standard_pred=True, postprocess_type="GREEDYNMM",
                postprocess_match_metric="IOS", verbose=0,
                # SAHI switches to NMS/IOU below a confidence of 0.1 (mAP is scored from 0.05,
                # evaluate's threshold); forced: its default merge GREEDYNMM/IOS at any threshold
                force_postprocess_type=self.force_merge)
            found = sorted(result.object_prediction_list, key=lambda p: -p.score.value)
            found = found[:params.max_detections]
            height, width = image.shape[:2]
            boxes = np.asarray([p.bbox.to_xyxy() for p in found], np.float32).reshape(-1, 4)
            out.append(ImageDetections(
                image_size=(width, height), boxes=boxes,
                scores=np.asarray([p.score.value for p in found], np.float32),
                labels=np.asarray([p.category.id for p in found], np.int64),
                class_names=self.class_names,
                masks=SahiMasks([p.mask.segmentation if p.mask else [] for p in found], boxes,
                                (height, width))))
        return out


# --------------------------------------------------------------------------------------------
# One measurement, in its own process

def measure(spec: dict) -> dict:
    """Time ``spec["timed"]`` large pictures through the public answer (after one warm-up), read
    the peak RSS, then (with ``spec["evaluate"]``) score ``spec["test"]`` with evaluate."""
    import cv2
    import torch

    import mlflow_model
    from mmdet_mlflow.data import load_dataset
    from scoring.runner import score_images
    from scoring.tiling import tiles_for

    global GRID
    GRID = spec["grid"]
    torch.set_num_threads(spec["threads"])
    predictor = mlflow_model.load_predictor(Path(spec["model"]) / mlflow_model.MODEL_DATA_DIR,
                                            batch_size=spec["batch_size"])
    # untiled (and SAHI's slices) ask for no tiling: a model fine-tuned on tiles tiles by default
    params = ({"tile_grid_size": GRID, "tile_overlap_ratio": OVERLAP} if spec["method"] == "tiled"
              else {"tile_grid_size": ""})
    dataset = load_dataset(Path(spec["test"]))
    records = dataset.images
    first = records[0]
    if spec["method"] == "sahi":
        from scoring.schema import PredictParams

        x0, y0, x1, y1 = tiles_for((first.height, first.width),
                                   PredictParams(tile_grid_size=GRID, tile_overlap_ratio=OVERLAP))[0]
        predictor = SahiPredictor(predictor, (x1 - x0, y1 - y0), OVERLAP,
                                  force_merge=spec.get("force_merge", True))
    result = {"method": spec["method"], "batch_size": spec["batch_size"],
              "force_merge": spec.get("force_merge", True),
              "picture": f"{first.width}x{first.height}",
              "tiles": len(tiles_for((first.height, first.width),
                                     predictor.default_params.updated(
                                         {"tile_grid_size": GRID, "tile_overlap_ratio": OVERLAP})))}

    def answer(record):
        scored = list(score_images(predictor, [(record.path.name, record.path.read_bytes())], params))
        return len(scored[0].response["boxes"])

    if spec["timed"]:
        # warm-up (first passes allocate): the network on a tile-sized corner of a picture
        image = cv2.imread(str(records[0].path))
        (predictor.inner if spec["method"] == "sahi" else predictor)([image[:image.shape[0] // 4,
                                                                            :image.shape[1] // 4]])
        seconds, detections = [], []
        for record in records[:spec["timed"]]:
            start = time.perf_counter()
            detections.append(answer(record))
            seconds.append(time.perf_counter() - start)
        result.update(seconds=statistics.median(seconds), detections=statistics.mean(detections),
                      timed=len(seconds),
                      peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    if spec["evaluate"]:
        from mmdet_mlflow.evaluate import evaluate

        start = time.perf_counter()
        doc = evaluate(spec["model"], spec["test"], spec["output"], params=params, predictor=predictor,
                       progress=False, track=False, num_samples=2)
        result.update(segm_ap=doc["segm"]["AP"], segm_ap50=doc["segm"]["AP50"], bbox_ap=doc["bbox"]["AP"],
                      evaluated=doc["counts"]["images"],
                      evaluate_seconds_per_picture=(time.perf_counter() - start) / doc["counts"]["images"])
    return result


def run_measurement(spec: dict) -> dict:
    """``measure(spec)`` in a fresh process: its own peak RSS, nothing cached from the others."""
    threads = str(spec["threads"])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    done = subprocess.run([sys.executable, __file__, "--measure", json.dumps(spec)], env=env,
                          stdout=subprocess.PIPE, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------
# Inputs, cached in --work

def cli(*args: str) -> None:
    shown = " ".join(["mmdet-mlflow", *args])
    progress(f"$ {shown}")
    subprocess.run([sys.executable, "-m", "mmdet_mlflow.cli", *args], check=True, stdout=sys.stderr,
                   env={**os.environ, "PYTHONPATH": str(ROOT)})


def finetuned_tiny(work: Path, max_steps: int | None) -> Path:
    """The demo recipe's model, trained once into ``work`` (a rerun resumes or reuses it)."""
    from mlflow_model.model_dir import finetune_outputs
    from scoring.model_dir import ModelDir

    data = work / "train-data"
    if not (data / "validation.coco.json").is_file():
        cli("synth", "--output", str(data), "--num-images", str(TRAINING_IMAGES), "--seed", "0")
    output = work / ("finetune" if max_steps is None else f"finetune-max-steps-{max_steps}")
    model_dir, _ = finetune_outputs(output)
    if not ModelDir(model_dir).mlmodel.is_file():
        cli("finetune", "--config", TINY_CONFIG, "--checkpoint", "none", "--training-data",
            str(data / "train.jsonl"), "--validation-data", str(data / "validation"), "--output",
            str(output), "--recipe", "quick-cpu", "--no-tracking",
            *(["--max-steps", str(max_steps)] if max_steps else []))
    return model_dir


def finetuned_on_tiles(work: Path) -> Path:
    """The demo recipe fine-tuned as AutoML tiles training pictures: the same kind of scenes
    (seed 0) as 19 mosaics of 4x4, ``finetune --tile-grid-size GRID`` (each picture and its
    tiles; validation tiled), trained once into ``work``."""
    from mlflow_model.model_dir import finetune_outputs
    from scoring.model_dir import ModelDir

    data = work / "train-mosaic"
    if not (data / "validation.coco.json").is_file():
        cli("synth", "--output", str(data), "--num-images", str(-(-TRAINING_IMAGES // MOSAIC ** 2)),
            "--seed", "0", "--mosaic", str(MOSAIC))
    output = work / f"finetune-tiles-{GRID}"
    model_dir, _ = finetune_outputs(output)
    if not ModelDir(model_dir).mlmodel.is_file():
        cli("finetune", "--config", TINY_CONFIG, "--checkpoint", "none", "--training-data",
            str(data / "train.jsonl"), "--validation-data", str(data / "validation"), "--output",
            str(output), "--recipe", "quick-cpu", "--no-tracking", "--tile-grid-size", GRID)
    return model_dir


def random_x(work: Path) -> Path:
    """x as mmdet initialises it (no training): it costs what x costs and finds nothing."""
    import mlflow_model
    from helpers import make_official_checkpoint
    from mmdet_mlflow.synth import CLASSES
    from scoring.model_dir import ModelDir

    model_dir = work / "x-random"
    if not ModelDir(model_dir).mlmodel.is_file():
        checkpoint = make_official_checkpoint(work / "x-random.pth", X_CONFIG, classes=CLASSES,
                                              confident=False)
        mlflow_model.save_model(model_dir, X_CONFIG, str(checkpoint), classes=CLASSES)
    return model_dir


def test_set(work: Path, pictures: int, mosaic: int) -> Path:
    """An AutoML JSONL of every picture of an unseen synthetic set: ``pictures`` pictures of
    ``mosaic`` x ``mosaic`` scenes, or, with mosaic 1, the same scenes one a picture."""
    from mmdet_mlflow.data import Dataset
    from mmdet_mlflow.data.jsonl import write_jsonl
    from mmdet_mlflow.synth import generate

    folder = work / f"test-seed{TEST_SEED}-{pictures}x{mosaic}x{mosaic}"
    everything = folder / "all.jsonl"
    if not everything.is_file():
        splits = generate(folder, num_images=pictures, seed=TEST_SEED, mosaic=mosaic, progress=False)
        images = sorted((r for d in splits.values() for r in d.images), key=lambda r: r.image_id)
        some = next(iter(splits.values()))
        write_jsonl(Dataset(images=images, classes=some.classes, category_ids=some.category_ids),
                    everything)
    return everything


# --------------------------------------------------------------------------------------------

def cpu_name() -> str:
    return next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                 if line.startswith("model name")), "unknown CPU")


def row(name: str, r: dict) -> str:
    acc = (f"{r['segm_ap']:.3f} | {r['segm_ap50']:.3f}" if "segm_ap" in r else "- | -")
    speed = (f"{r['seconds']:.2f} | {r['peak_rss_mib']:.0f}" if "seconds" in r else "- | -")
    return f"| {name} | {acc} | {speed} | {r.get('detections', float('nan')):.1f} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a fine-tuned tiny model folder to reuse (default: train one "
                                        "with the demo's recipe into --work)")
    parser.add_argument("--work", default=str(ROOT / "outputs" / "bench-tiling"),
                        help="cache of the training data, models and test sets")
    parser.add_argument("--pictures", type=int, default=5,
                        help=f"large test pictures ({MOSAIC * MOSAIC} ordinary ones each; default 5)")
    parser.add_argument("--timed", type=int, default=3, help="large pictures timed per method (default 3)")
    parser.add_argument("--x-timed", type=int, default=1, help="large pictures timed per method for x")
    parser.add_argument("--models", default="tiny,x",
                        help="tiny (the demo recipe's model), tiny-tiles (the same recipe fine-tuned "
                             "on tiles of mosaics, as AutoML trains with tiling: ~12 min once), x")
    parser.add_argument("--grid", default=DEFAULT_GRID,
                        help=f"tile_grid_size for tiled and SAHI (default {DEFAULT_GRID}: tiles the "
                             "size of the scenes, 640x480)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads in every measurement (default: torch's); 1 is the fair "
                             "choice on a machine others are loading, where OpenMP threads wait on "
                             "each other when one is descheduled")
    parser.add_argument("--finetune-max-steps", type=int, default=None,
                        help="train the tiny model for this many steps only (the recipe's 480 take "
                             "~10-20 min alone on 2 cores; say so when you quote the numbers)")
    parser.add_argument("--picture", metavar="FILE",
                        help="also draw the first large picture's untiled and tiled answers side by "
                             "side into FILE (docs/images/tiling.jpg)")
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    args = parser.parse_args()
    quiet_logs()
    if args.measure:
        print(json.dumps(measure(json.loads(args.measure))), flush=True)
        return

    import torch

    global GRID
    GRID = args.grid
    work = Path(args.work).absolute()
    work.mkdir(parents=True, exist_ok=True)
    threads = args.threads or torch.get_num_threads()
    print(f"{cpu_name()}; {os.cpu_count()} CPUs; torch {torch.__version__} {threads} threads", flush=True)
    original = test_set(work, args.pictures * MOSAIC * MOSAIC, 1)
    large = test_set(work, args.pictures, MOSAIC)
    models = args.models.split(",")
    runs: dict[str, dict] = {}
    started = time.perf_counter()

    def go(key, **spec):
        progress(f"[{time.perf_counter() - started:5.0f} s] {key} ...")
        runs[key] = run_measurement({"evaluate": False, "output": str(work / "eval" / key),
                                     "threads": threads, "grid": GRID, **spec})
        print(f"        {json.dumps(runs[key])}", flush=True)

    if "tiny" in models:
        tiny = str(Path(args.model).absolute()) if args.model else str(finetuned_tiny(work, args.finetune_max_steps))
        print(f"tiny: {tiny}", flush=True)
        # the reference: mAP only (the time that matters is the large pictures')
        go("tiny original untiled", model=tiny, test=str(original), method="untiled", batch_size=1,
           timed=0, evaluate=True)
        for method, batch in (("untiled", 1), ("tiled", 1), ("tiled", 4), ("sahi", 1)):
            go(f"tiny large {method} b{batch}", model=tiny, test=str(large), method=method,
               batch_size=batch, timed=args.timed, evaluate=batch == 1)
        # SAHI as it runs by default: below a confidence of 0.1 (evaluate scores from 0.05) it
        # merges by NMS/IOU instead; GREEDYNMM/IOS at 0.05 merged small objects into junk boxes
        go("tiny large sahi-auto b1", model=tiny, test=str(large), method="sahi", batch_size=1,
           timed=0, evaluate=True, force_merge=False)
    if "tiny-tiles" in models:
        tiles = str(finetuned_on_tiles(work))
        print(f"tiny fine-tuned on tiles: {tiles}", flush=True)
        go("tiny-tiles original untiled", model=tiles, test=str(original), method="untiled",
           batch_size=1, timed=0, evaluate=True)
        go("tiny-tiles large tiled b1", model=tiles, test=str(large), method="tiled", batch_size=1,
           timed=0, evaluate=True)
        go("tiny-tiles large sahi-auto b1", model=tiles, test=str(large), method="sahi",
           batch_size=1, timed=0, evaluate=True, force_merge=False)
    if "x" in models:
        x = str(random_x(work))
        for method, batch in (("untiled", 1), ("tiled", 1), ("tiled", 4), ("sahi", 1)):
            go(f"x large {method} b{batch}", model=x, test=str(large), method=method, batch_size=batch,
               timed=args.x_timed)

    report(runs, args, started)
    if args.picture and "tiny" in models:
        draw_comparison(tiny, large, Path(args.picture))


def draw_comparison(model: str, test: Path, out: Path, width: int = 1000) -> None:
    """The first large picture, the untiled answer left and the tiled one right (the public
    answers, drawn by mmdet_mlflow.visualize), each ``width`` pixels wide, as a JPEG."""
    import cv2
    import numpy as np

    import mlflow_model
    from mmdet_mlflow.data import load_dataset
    from mmdet_mlflow.visualize import draw_detections
    from scoring.runner import score_images

    predictor = mlflow_model.load_predictor(Path(model) / mlflow_model.MODEL_DATA_DIR)
    record = load_dataset(test).images[0]
    panels = []
    for title, params in (("untiled", {}), (f"tiled {GRID}, overlap {OVERLAP}",
                                             {"tile_grid_size": GRID, "tile_overlap_ratio": OVERLAP})):
        scored = next(score_images(predictor, [(record.path.name, record.path.read_bytes())], params,
                                   keep_images=True))
        drawn = draw_detections(scored.image, scored.response["boxes"])
        height = round(drawn.shape[0] * width / drawn.shape[1])
        panel = cv2.resize(drawn, (width, height), interpolation=cv2.INTER_AREA)
        text = f"{title}: {len(scored.response['boxes'])} detections"
        cv2.rectangle(panel, (0, 0), (width, 34), (255, 255, 255), -1)
        cv2.putText(panel, text, (10, 25), cv2.FONT_HERSHEY_SIMPLEX, 0.8, (0, 0, 0), 2, cv2.LINE_AA)
        panels.append(panel)
    gap = np.full((panels[0].shape[0], 12, 3), 255, np.uint8)
    out.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(out), np.hstack([panels[0], gap, panels[1]]), [cv2.IMWRITE_JPEG_QUALITY, 80])
    print(f"picture: {out} ({out.stat().st_size // 1024} KiB)", flush=True)


def report(runs: dict, args, started: float) -> None:
    any_run = next(iter(runs.values()))
    print(f"\n{cpu_name()}, {os.cpu_count()} CPUs, torch threads {args.threads or 'default'}; {args.pictures} large pictures "
          f"({runs.get('tiny large tiled b1', any_run)['picture']}, {MOSAIC}x{MOSAIC} scenes each, "
          f"{args.pictures * MOSAIC * MOSAIC} scenes) of unseen synthetic data (seed {TEST_SEED}); "
          f"tiles {GRID}, overlap {OVERLAP}; time = median seconds per large picture over "
          f"{args.timed} (tiny) / {args.x_timed} (x) after a warm-up; run took "
          f"{(time.perf_counter() - started) / 60:.1f} min\n")
    print("| model, pictures, method | segm mAP | segm AP50 | s / picture | peak RSS MiB | detections |")
    print("| --- | --- | --- | --- | --- | --- |")
    names = {"untiled b1": "untiled", "tiled b1": f"tiled {GRID} (batch 1)",
             "tiled b4": f"tiled {GRID} (batch 4)", "sahi b1": "SAHI, same slices, GREEDYNMM/IOS",
             "sahi-auto b1": "SAHI, same slices, its default (NMS/IOU below confidence 0.1)"}
    for key, r in runs.items():
        name = key.replace("original untiled", "original pictures, untiled").replace("large ", "large, ")
        for short, long in names.items():
            name = name.replace(short, long)
        print(row(name, r))
    print()
    for model in ("tiny", "tiny-tiles", "x"):
        ratios = goals(runs, model)
        for text in ratios:
            print(f"- {model}: {text}")


def goals(runs: dict, model: str) -> list[str]:
    get = lambda key: runs.get(f"{model} {key}")  # noqa: E731
    untiled, tiled, tiled4, sahi = (get(f"large {k}") for k in ("untiled b1", "tiled b1", "tiled b4", "sahi b1"))
    original = get("original untiled")
    out = []
    if tiled is None:
        return out
    if original and "segm_ap" in tiled:
        out.append(f"tiled mAP / original mAP = {tiled['segm_ap']:.3f} / {original['segm_ap']:.3f} = "
                   f"{tiled['segm_ap'] / max(original['segm_ap'], 1e-9):.2f} (goal >= 0.9)"
                   + (f"; untiled large {untiled['segm_ap']:.3f}" if untiled else ""))
    for merge, run in (("GREEDYNMM/IOS", sahi), ("default", get("large sahi-auto b1"))):
        if run and "segm_ap" in tiled and "segm_ap" in run:
            out.append(f"tiled mAP / SAHI ({merge}) mAP = {tiled['segm_ap']:.3f} / {run['segm_ap']:.3f} "
                       f"= {tiled['segm_ap'] / max(run['segm_ap'], 1e-9):.2f} (goal >= 1)")
    if untiled:
        passes = tiled["tiles"] + 1
        out.append(f"tiled time / ({passes} x untiled) = {tiled['seconds']:.2f} / ({passes} x "
                   f"{untiled['seconds']:.3f}) = {tiled['seconds'] / (passes * untiled['seconds']):.2f} "
                   f"(goal <= 1.2)")
    if sahi:
        out.append(f"tiled time / SAHI time = {tiled['seconds'] / sahi['seconds']:.2f} (goal <= 1); "
                   f"peak RSS tiled / SAHI = {tiled['peak_rss_mib'] / sahi['peak_rss_mib']:.2f}")
    if tiled4:
        out.append(f"tiled batch 4 / batch 1 time = {tiled4['seconds'] / tiled['seconds']:.2f}, peak RSS "
                   f"{tiled4['peak_rss_mib']:.0f} vs {tiled['peak_rss_mib']:.0f} MiB")
    return out


if __name__ == "__main__":
    main()
