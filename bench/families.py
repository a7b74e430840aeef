"""Benchmark of every model family (not a test): our pyfunc predict end to end (base64 PNG ->
decode -> runtime -> encode) on each runtime the family has (torch; onnx and openvino where the
family exports) against bare mmdet ``inference_detector`` on the same picture file (both sides
decode it) and weights, and the peak resident memory (VmHWM) of each.

Per family, one picture at the size of its config's test resize (the picture fills the model's
input: the real cost of one request), ours asked for the config's own score threshold (as
``inference_detector`` uses; the model's other defaults as served: an instance-segmentation model
answers polygons, an object-detection one boxes only), random weights in mmdet's published layout
(tests/helpers.make_official_checkpoint, class biases lifted so there are detections). Each side
runs in a process of its own, so that each memory peak is its own: one process makes the
checkpoint, the model folders (one per runtime) and the picture; one per runtime loads our model
and predicts; one loads mmdet's detector and runs ``inference_detector`` (measured once per
family, in the same invocation, and compared with every runtime's row). Both sides predict once to
warm up, then time the best of --repeats, with torch's default threads on both sides (the
columns say how many). Only the results go to stdout (mmengine's logs are silenced, warnings go
to stderr).

    .venv/bin/python bench/families.py [--families rtmdet,mask-rcnn] [--runtimes torch,onnx] [--repeats 3]
    .venv/bin/python bench/families.py --same-process --families yolof --rounds 4
    .venv/bin/python bench/families.py --families rtmdet-ins --runtimes torch --picture 1280x960
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
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
RUNTIMES = ("torch", "onnx", "openvino")
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "amx_tile")


def _importable() -> None:
    sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


def _quiet() -> None:
    """mmengine's logger prints to stdout: only results may go there. (Not called where our
    exported model is measured: importing mmengine would load torch into a process that has none.)"""
    import logging

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


def picture_size(text: str) -> tuple[int, int]:
    width, _, height = text.lower().partition("x")
    return int(width), int(height)


def exported_runtimes(family: str, wanted: list[str]) -> list[str]:
    """The runtimes of ``wanted`` that ``family`` has (torch always; onnx and openvino where it
    exports)."""
    from scoring.families import family_named

    have = family_named(family).exporters
    return [runtime for runtime in wanted if runtime == "torch" or runtime in have]


def prepare(config: str, folder: Path, runtimes: list[str], picture: str | None = None) -> None:
    """The checkpoint, one model folder per runtime, the picture (``picture`` "WxH", default the
    config's test resize) and the params."""
    import mlflow_model
    from helpers import make_official_checkpoint, scene_image, write_png

    checkpoint = make_official_checkpoint(folder / "official.pth", config, classes=CLASSES, seed=1)
    for runtime in runtimes:
        mlflow_model.save_model(folder / f"model-{runtime}", config, str(checkpoint), runtime=runtime)
    width, height = picture_size(picture) if picture else test_scale(config)
    write_png(folder / "picture.png", scene_image(width, height, 0))
    (folder / "params.json").write_text(json.dumps(mmdet_params(config)))


def mmdet_params(config: str) -> dict:
    """Our predict params that do what ``inference_detector`` does: the config's own score
    threshold (ours defaults to AutoML's 0.3, which on random weights can leave nothing to do)."""
    from mlflow_model.configs import load_config
    from scoring.families import Family

    test_cfg = Family.detection_cfg(dict(load_config(config).model.test_cfg))
    return {"score_threshold": float(test_cfg.get("score_thr", 0.0))}


def _best(run, repeats: int, profile: int = 0) -> tuple[float, int]:
    """The best of ``repeats`` timed calls after one warm-up; with ``profile``, the timed calls'
    ``profile`` costliest functions (cumulative) go to stderr (cProfile slows them down)."""
    found = run()  # warm-up: first-call allocations and lazy imports
    profiler = None
    if profile:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        found = run()
        best = min(best, time.perf_counter() - start)
    if profiler is not None:
        import pstats

        profiler.disable()
        pstats.Stats(profiler, stream=sys.stderr).sort_stats("cumulative").print_stats(profile)
    return best, found


def our_prediction(runtime: str, folder: Path):
    """A call that predicts the picture with our model of ``runtime`` and returns how many boxes
    it answered."""
    import mlflow.pyfunc
    import pandas as pd
    from helpers import b64  # numpy only: an exported model's process stays without torch

    model = mlflow.pyfunc.load_model(str(folder / f"model-{runtime}"))
    frame = pd.DataFrame({"image": [b64(folder / "picture.png")]})
    params = json.loads((folder / "params.json").read_text())
    return lambda: len(model.predict(frame, params=params)["boxes"][0])


def mmdet_prediction(config: str, folder: Path):
    """A call that runs mmdet's ``inference_detector`` on the picture file (as ours starts from the
    encoded picture: both sides decode it) and returns how many detections it made."""
    from mmdet.apis import inference_detector, init_detector

    from mlflow_model.configs import load_config

    detector = init_detector(load_config(config, num_classes=len(CLASSES)), str(folder / "official.pth"),
                             device="cpu")
    picture = str(folder / "picture.png")
    return lambda: len(inference_detector(detector, picture).pred_instances)


def measure(side: str, config: str, folder: Path, repeats: int, profile: int = 0) -> dict:
    """``side``: ``mmdet``, or the runtime of our model to measure."""
    if side in RUNTIMES:
        seconds, found = _best(our_prediction(side, folder), repeats, profile)
        if side != "torch" and "torch" in sys.modules:
            raise SystemExit(f"the {side} model's process imported torch: its memory would be torch's")
        return {"seconds": seconds, "detections": found, "peak_rss_mb": peak_rss_mb(), "threads": threads(side)}
    import cv2

    seconds, found = _best(mmdet_prediction(config, folder), repeats, profile)
    image = cv2.imread(str(folder / "picture.png"))
    return {"seconds": seconds, "detections": found, "peak_rss_mb": peak_rss_mb(),
            "picture": f"{image.shape[1]}x{image.shape[0]}", "threads": threads(side)}


def measure_together(config: str, folder: Path, repeats: int, rounds: int) -> dict:
    """Our torch model and mmdet's detector loaded in one process, measured alternately (``rounds``
    times each, best of ``repeats``): both sides then run with the same libraries loaded, the same
    allocator history and the same threads, which separate processes cannot promise. Times are
    the median of the rounds' best; ``ratios`` the rounds' own."""
    sides = {"torch": our_prediction("torch", folder), "mmdet": mmdet_prediction(config, folder)}
    times, found = {side: [] for side in sides}, {}
    for number in range(rounds):
        for side in (sides if number % 2 == 0 else reversed(list(sides))):
            seconds, found[side] = _best(sides[side], repeats)
            times[side].append(seconds)
    return {"ours": statistics.median(times["torch"]), "mmdet": statistics.median(times["mmdet"]),
            "ratios": sorted(m / o for m, o in zip(times["mmdet"], times["torch"])),
            "detections": found, "threads": threads("torch")}


def threads(side: str) -> str:
    """The threads of the side's network pass: torch's, or the exported runtime's
    (MMDET_MLFLOW_NUM_THREADS or OMP_NUM_THREADS, else "auto": one per physical core, ONNX
    Runtime's and OpenVINO's default)."""
    if side in ("torch", "mmdet"):
        import torch

        return str(torch.get_num_threads())
    from scoring.settings import network_threads

    return str(network_threads() or "auto")


def cpu_line() -> str:
    """The CPU's model name and which of the flags that decide the exported runtimes' kernels
    (and OpenVINO's bf16) it has."""
    name, flags = "unknown", set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name":
            name = value.strip()
        elif key.strip() == "flags":
            flags = set(value.split())
    marks = " ".join(f"{flag}{'+' if flag in flags else '-'}" for flag in CPU_FLAGS)
    return f"CPU: {name}, {os.cpu_count()} logical CPUs; flags: {marks}"


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
    parser.add_argument("--runtimes", default=",".join(RUNTIMES),
                        help=f"comma-separated, of: {', '.join(RUNTIMES)} (onnx and openvino only for "
                             "the families that export)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=1,
                        help="measure each side this many times, in processes of their own, alternating "
                             "which goes first; times are the median of the rounds' best, and a last "
                             "column gives the lowest and highest round's ratio")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="print each side's N costliest functions (cProfile, cumulative) to stderr; "
                             "the times are then the profiled ones")
    parser.add_argument("--picture", metavar="WxH",
                        help="the picture's size (default: each config's test resize, which the picture "
                             "then fills; another size adds the resize back to the picture's own)")
    parser.add_argument("--same-process", action="store_true",
                        help="torch only: load our model and mmdet's detector in one process and measure "
                             "them alternately, --rounds times (at least 2), as a check on what separate "
                             "processes add (libraries, allocator history); no memory column")
    parser.add_argument("--together", nargs=2, metavar=("CONFIG", "FOLDER"), help=argparse.SUPPRESS)
    parser.add_argument("--prepare", nargs=3, metavar=("CONFIG", "FOLDER", "RUNTIMES"), help=argparse.SUPPRESS)
    parser.add_argument("--measure", nargs=3, metavar=("SIDE", "CONFIG", "FOLDER"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    _importable()
    if args.prepare:
        _quiet()
        prepare(args.prepare[0], Path(args.prepare[1]), args.prepare[2].split(","), args.picture)
        return 0
    if args.measure:
        side, config, folder = args.measure
        if side in ("torch", "mmdet"):
            _quiet()
        print(json.dumps(measure(side, config, Path(folder), args.repeats, args.profile)))
        return 0

    if args.together:
        _quiet()
        print(json.dumps(measure_together(args.together[0], Path(args.together[1]), args.repeats,
                                          max(2, args.rounds))))
        return 0

    families = [f.strip() for f in args.families.split(",") if f.strip()]
    unknown = [f for f in families if f not in CONFIGS]
    if unknown:
        parser.error(f"unknown families {unknown}; known: {', '.join(CONFIGS)}")
    runtimes = [r.strip() for r in args.runtimes.split(",") if r.strip()]
    if not runtimes or set(runtimes) - set(RUNTIMES):
        parser.error(f"--runtimes {args.runtimes!r}: a comma-separated list of {', '.join(RUNTIMES)}")
    print(cpu_line())
    picture_option = ("--picture", args.picture) if args.picture else ()
    if args.same_process:
        return _same_process(families, args)
    print(f"ratio = mmdet s / ours s: how many times as fast as bare mmdet inference_detector ours is "
          f"(> 1 faster); best of {args.repeats} warm repeats each"
          f"{f', median of {args.rounds} alternating rounds (last column: the rounds ratios, lowest-highest)' if args.rounds > 1 else ''}"
          f"; thr = threads of the network pass "
          f"(ours/mmdet); MB = peak RSS (VmHWM) of each side's process")
    print(f"{'family':<16} {'runtime':<8} {'config':<58} {'picture':>9} {'ours s':>8} {'mmdet s':>8} "
          f"{'ratio':>6} {'dets':>9} {'thr':>6} {'ours MB':>8} {'mmdet MB':>8}", flush=True)
    for family in families:
        config = CONFIGS[family]
        measured = exported_runtimes(family, runtimes)
        with tempfile.TemporaryDirectory(prefix=f"bench-{family}-") as tmp:
            _child("--prepare", config, tmp, ",".join(measured), *picture_option)

            def run(side: str) -> dict:
                out = _child("--measure", side, config, tmp, "--repeats", str(args.repeats),
                             "--profile", str(args.profile))
                return json.loads(out.strip().splitlines()[-1])

            # Rounds alternate which side goes first (mmdet, ours, ...; then ours, ..., mmdet): a
            # machine whose speed drifts between processes then hits both sides alike.
            rounds = []
            for number in range(args.rounds):
                order = ["mmdet", *measured] if number % 2 == 0 else [*measured, "mmdet"]
                rounds.append({side: run(side) for side in order})
            mmdet = _over_rounds(rounds, "mmdet")
            for runtime in measured:
                ours = _over_rounds(rounds, runtime)
                per_round = sorted(r["mmdet"]["seconds"] / r[runtime]["seconds"] for r in rounds)
                spread = f" {per_round[0]:.2f}-{per_round[-1]:.2f}" if len(rounds) > 1 else ""
                print(f"{family:<16} {runtime:<8} {config:<58} {mmdet['picture']:>9} "
                      f"{ours['seconds']:>8.3f} {mmdet['seconds']:>8.3f} "
                      f"{mmdet['seconds'] / ours['seconds']:>5.2f}x "
                      f"{ours['detections']:>4}/{mmdet['detections']:<4} "
                      f"{ours['threads'] + '/' + mmdet['threads']:>6} {ours['peak_rss_mb']:>8.0f} "
                      f"{mmdet['peak_rss_mb']:>8.0f}{spread}", flush=True)
    return 0


def _same_process(families: list[str], args) -> int:
    rounds = max(2, args.rounds)
    picture_option = ("--picture", args.picture) if args.picture else ()
    print(f"ratio = mmdet s / ours s, both on torch in one process, alternating; best of {args.repeats} "
          f"warm repeats, median of {rounds} rounds (last column: the rounds' ratios, lowest-highest)")
    print(f"{'family':<16} {'config':<58} {'ours s':>8} {'mmdet s':>8} {'ratio':>6} {'dets':>9} {'thr':>4}",
          flush=True)
    for family in families:
        config = CONFIGS[family]
        with tempfile.TemporaryDirectory(prefix=f"bench-{family}-") as tmp:
            _child("--prepare", config, tmp, "torch", *picture_option)
            out = _child("--together", config, tmp, "--repeats", str(args.repeats), "--rounds", str(rounds))
            got = json.loads(out.strip().splitlines()[-1])
            found = got["detections"]
            print(f"{family:<16} {config:<58} {got['ours']:>8.3f} {got['mmdet']:>8.3f} "
                  f"{got['mmdet'] / got['ours']:>5.2f}x {found['torch']:>4}/{found['mmdet']:<4} "
                  f"{got['threads']:>4} {got['ratios'][0]:.2f}-{got['ratios'][-1]:.2f}", flush=True)
    return 0


def _over_rounds(rounds: list[dict], side: str) -> dict:
    """One side's result over the rounds: the median of its rounds' best times, its highest
    memory peak."""
    results = [r[side] for r in rounds]
    return {**results[0], "seconds": statistics.median(r["seconds"] for r in results),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in results)}


if __name__ == "__main__":
    sys.exit(main())
