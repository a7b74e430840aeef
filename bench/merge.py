"""Benchmark of the tile merge (not a test): ``scoring.tiling.merge_tiles`` now against the same
function at a baseline git revision (before the merge looked its neighbours up in a grid), on
the same candidates, for 100, 1000 and 10000 candidates (and more for the current merge only),
in one run. Prints seconds per merge and the ratio baseline / now, and checks that both merges
give the same answer.

The candidates are what a hostile tiled request brings to the merge: a 6000 x 6000 picture in
an 8x8 grid (65 sources) through the untrained tiny RTMDet-Ins at score_threshold 0 and
max_detections 10000 (each source's best ``count / 65`` are kept for a count): dense, heavily
overlapping boxes. ``--synthetic`` uses random boxes spread over each source instead (few
overlaps: the old merge was fast there).

    .venv/bin/python bench/merge.py [--counts 100 1000 10000] [--baseline-rev 1e80cfb] [--synthetic]
                                    (under flock -x /tmp/cpu.lock)
"""
from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from _quiet import quiet_logs

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from scoring.runtimes.base import ImageDetections  # noqa: E402
from scoring.schema import PredictParams  # noqa: E402
from scoring.tiling import merge_tiles, tiles_for  # noqa: E402

PICTURE_HW = (6000, 6000)
PARAMS = PredictParams(tile_grid_size="8x8", score_threshold=0.0, max_detections=10_000)
# The last revision whose merge compared each candidate with every group near it one at a time.
BASELINE_REV = "1e80cfb"


def baseline_merge(rev: str):
    """``merge_tiles`` as it was at ``rev`` (its file loaded under another module name)."""
    source = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:scoring/tiling.py"],
                            check=True, capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "tiling_baseline.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("tiling_baseline", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module.merge_tiles


def candidates(total: int, labels: int, seed: int = 0):
    """Each source's detections (in its own pixels), ``total`` in all, and the sources."""
    rng = np.random.default_rng(seed)
    height, width = PICTURE_HW
    sources = [(0, 0, width, height)] + tiles_for(PICTURE_HW, PARAMS)
    each = max(1, total // len(sources))
    found = []
    for x0, y0, x1, y1 in sources:
        w, h = x1 - x0, y1 - y0
        cx, cy = rng.uniform(0, w, each), rng.uniform(0, h, each)
        bw, bh = rng.uniform(4, w / 6, each), rng.uniform(4, h / 6, each)
        boxes = np.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], 1).clip(0, [w, h, w, h])
        found.append(ImageDetections((w, h), boxes.astype(np.float32),
                                     rng.uniform(0, 1, each).astype(np.float32),
                                     rng.integers(0, labels, each), [str(i) for i in range(labels)],
                                     masks=None))
    return found, sources


def model_candidates(work: Path):
    """Each source's detections of the hostile request, from the untrained tiny model (ONNX
    Runtime, no masks), and the sources; best first in each source."""
    import contextlib
    import io
    import shutil

    import mlflow_model
    from helpers import TINY, make_official_checkpoint, scene_image
    from mlflow_model.onnx_export import export_to_weights_dir
    from scoring.runtimes.onnx_rtmdet import load_onnx_predictor

    with contextlib.redirect_stdout(io.StringIO()):  # packaging's own messages
        checkpoint = make_official_checkpoint(work / "tiny.pth", TINY)
        mlflow_model.save_model(work / "tiny", TINY, str(checkpoint))
        shutil.copytree(work / "tiny" / "model", work / "onnx")
        export_to_weights_dir(work / "onnx")
    predictor = load_onnx_predictor(work / "onnx")
    height, width = PICTURE_HW
    image = scene_image(width // 8, height // 8, 1).repeat(8, axis=0).repeat(8, axis=1)
    sources = [(0, 0, width, height)] + tiles_for(PICTURE_HW, PARAMS)
    params = PARAMS.updated({"mask_format": "none"})
    found = [predictor([image[y0:y1, x0:x1]], params)[0] for x0, y0, x1, y1 in sources]
    return found, sources


def keep_best(found, total: int):
    """Each source's best ``total / sources`` detections."""
    import dataclasses

    each = max(1, total // len(found))
    return [dataclasses.replace(f, boxes=f.boxes[:each], scores=f.scores[:each], labels=f.labels[:each])
            for f in found]


def timed(merge, found, sources) -> tuple[float, ImageDetections]:
    started = time.perf_counter()
    merged = merge(found, sources, PICTURE_HW, PARAMS)
    return time.perf_counter() - started, merged


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--counts", type=int, nargs="+", default=[100, 1000, 10_000])
    parser.add_argument("--current-only", type=int, nargs="*", default=[50_000],
                        help="counts timed for the current merge alone (the baseline takes minutes)")
    parser.add_argument("--labels", type=int, default=2, help="labels of --synthetic boxes")
    parser.add_argument("--synthetic", action="store_true")
    parser.add_argument("--baseline-rev", default=BASELINE_REV)
    args = parser.parse_args()
    quiet_logs()
    before = baseline_merge(args.baseline_rev)
    if not args.synthetic:
        clutter = model_candidates(Path(tempfile.mkdtemp(prefix="bench-merge-")))
    kind = (f"random boxes, {args.labels} labels" if args.synthetic
            else "the untrained tiny model's detections at score_threshold 0")
    print(f"merge of a {PICTURE_HW[1]}x{PICTURE_HW[0]} picture's {PARAMS.tile_grid_size} tiles, {kind}; "
          f"baseline: scoring/tiling.py at {args.baseline_rev}")
    print("| candidates | baseline s | now s | baseline / now | objects |")
    print("| --- | --- | --- | --- | --- |")
    for total in args.counts + args.current_only:
        found, sources = (candidates(total, args.labels) if args.synthetic
                          else (keep_best(clutter[0], total), clutter[1]))
        count = sum(len(f) for f in found)
        now, merged = timed(merge_tiles, found, sources)
        if total in args.current_only:
            print(f"| {count} | - | {now:.3f} | - | {len(merged)} |", flush=True)
            continue
        then, reference = timed(before, found, sources)
        same = (np.array_equal(merged.boxes, reference.boxes) and np.array_equal(merged.scores, reference.scores)
                and np.array_equal(merged.labels, reference.labels))
        if not same:
            raise SystemExit(f"the merges differ at {count} candidates")
        print(f"| {count} | {then:.3f} | {now:.3f} | {then / now:.2f}x | {len(merged)} |", flush=True)


if __name__ == "__main__":
    main()
