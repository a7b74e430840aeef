"""Benchmark of the ONNX Runtime and OpenVINO models against the torch (mmdet) model (not a
test). Prints the CPU and the flags that decide which precisions are fast (AMX, AVX512-BF16,
AVX512-VNNI, AVX2), then, measured in this one process on the same 640x480 pictures, for tiny
and x:

1. network only: ORT fp32 (and int8 with --int8), OpenVINO fp32 and bf16 (``--openvino``, on by
   default; bf16 only where the CPU has it) vs torch eager on the same input tensor;
2. end to end (base64 PNG -> decode -> runtime -> encode -> JSON): the ONNX model's pyfunc
   predict vs the torch model's, one image per pass as both serve on CPU, at max_detections 3
   (a photo's typical count) and 100 (the worst case);
3. how many detections each found, and how many are identical (label, box within 0.5 px,
   score within 1e-4) between each fp32 runtime and torch, and (box within 2 px, score within
   0.05) int8 and bf16 vs fp32.

Untrained weights with lively heads (tests/helpers.make_official_checkpoint), which find 100
detections with real masks on anything at the default threshold (many scores saturate at 1.0, so
a threshold cannot pick fewer: the end-to-end timings cap max_detections instead). Timings
interleave the runtimes, best of --repeats, so drift in machine load hits both alike.

    .venv/bin/python bench/onnx_vs_torch.py [--models tiny,x] [--repeats 5] [--images 4] [--int8]
        [--no-openvino]

(Not named bench/onnx.py: a script's folder comes first on sys.path, and that name would shadow
the onnx package that torch's exporter imports.)
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from _quiet import packaging_to_stderr, quiet_logs

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from helpers import TINY, X, make_official_checkpoint, scene_image  # noqa: E402

CONFIGS = {"tiny": TINY, "x": X}


def encode_png(image) -> str:
    import cv2

    return base64.b64encode(cv2.imencode(".png", image)[1].tobytes()).decode()


def package(work: Path, name: str, int8: bool, calibration) -> Path:
    """A saved torch model with model.onnx (and model.int8.onnx) in its weights folder."""
    import mlflow_model
    from mlflow_model.onnx_export import export_to_weights_dir, quantize_int8

    checkpoint = make_official_checkpoint(work / f"{name}.pth", CONFIGS[name])
    weights = work / name / "model"
    with packaging_to_stderr():
        mlflow_model.save_model(work / name, CONFIGS[name], str(checkpoint))
    start = time.perf_counter()
    with packaging_to_stderr():
        spec = export_to_weights_dir(weights)
    print(f"[export] {name}: {time.perf_counter() - start:.1f} s, "
          f"{(weights / 'model.onnx').stat().st_size / 2**20:.1f} MiB", flush=True)
    if int8:
        start = time.perf_counter()
        with packaging_to_stderr():
            quantize_int8(weights / "model.onnx", calibration, weights / "model.int8.onnx", spec)
        print(f"[quantize] {name}: {time.perf_counter() - start:.1f} s, "
              f"{(weights / 'model.int8.onnx').stat().st_size / 2**20:.1f} MiB", flush=True)
    return weights


def best_rate(functions: dict, count: int, repeats: int) -> dict:
    """Images per second of each function (one call handles ``count`` images), best of
    ``repeats``, the functions interleaved."""
    for fn in functions.values():
        fn()  # warm up
    timings = {name: [] for name in functions}
    for _ in range(repeats):
        for name, fn in functions.items():
            start = time.perf_counter()
            fn()
            timings[name].append(time.perf_counter() - start)
    return {name: count / min(t) for name, t in timings.items()}


def same_detections(a, b, box_tol: float, score_tol: float) -> int:
    used, matched = set(), 0
    for i in range(len(a)):
        for j in range(len(b)):
            if j in used or a.labels[i] != b.labels[j]:
                continue
            if (np.abs(a.boxes[i] - b.boxes[j]).max() <= box_tol
                    and abs(float(a.scores[i]) - float(b.scores[j])) <= score_tol):
                used.add(j)
                matched += 1
                break
    return matched


def vs_onnx(runtime: str, rates: dict) -> str:
    """OpenVINO's rate against ONNX Runtime fp32's, measured in the same interleaved rounds."""
    if not runtime.startswith("openvino"):
        return ""
    return f", {rates[runtime] / rates['onnx fp32']:.2f}x onnx fp32"


def run_model(name: str, work: Path, args, images) -> None:
    import pandas as pd
    import torch

    import mlflow_model
    from scoring.pyfunc import MMDetPyfuncModel
    from scoring.runtimes.onnx_rtmdet import load_onnx_predictor

    threads = torch.get_num_threads()
    fp32_runtimes = ["onnx fp32"]
    weights = package(work, name, args.int8, images)
    torch_runtime = mlflow_model.load_predictor(weights, device="cpu", batch_size=1)
    # no spinning: ORT's idle threads would otherwise busy-wait through torch's turn
    runtimes = {"onnx fp32": load_onnx_predictor(weights, batch_size=1, num_threads=threads,
                                                 spin=False)}
    if args.int8:
        runtimes["onnx int8"] = load_onnx_predictor(weights, batch_size=1, num_threads=threads,
                                                    onnx_file="model.int8.onnx", spin=False)
    if args.openvino:
        from scoring.runtimes.openvino_rtmdet import cpu_has_bf16, load_openvino_predictor

        for precision in ("fp32", "bf16") if cpu_has_bf16() else ("fp32",):
            start = time.perf_counter()
            runtimes[f"openvino {precision}"] = load_openvino_predictor(
                weights, batch_size=1, num_threads=threads, precision=precision, quiet=True)
            print(f"[load] {name}: openvino {precision} compiled in "
                  f"{time.perf_counter() - start:.2f} s", flush=True)
        fp32_runtimes.append("openvino fp32")
        if args.int8:  # the same int8 (QDQ) graph ORT runs, executed by OpenVINO (AMX-INT8 / VNNI)
            start = time.perf_counter()
            runtimes["openvino int8"] = load_openvino_predictor(
                weights, batch_size=1, num_threads=threads, onnx_file="model.int8.onnx", quiet=True)
            print(f"[load] {name}: openvino int8 (ORT's QDQ graph) compiled in "
                  f"{time.perf_counter() - start:.2f} s", flush=True)

    # 1. network only, on the very same tensor
    fp32 = runtimes["onnx fp32"]
    tensors = [fp32.preprocess([img])["inputs"] for img in images]
    detector = torch_runtime.detector

    def torch_network():
        with torch.no_grad():
            for t in tensors:
                detector.bbox_head(detector.extract_feat(torch.from_numpy(t)))

    def ort_network(runtime):  # the runtime's own forward: ORT's session, OpenVINO's request
        return lambda: [runtime.forward({"inputs": t, "metas": None}, None) for t in tensors]

    rates = best_rate({"torch": torch_network,
                       **{k: ort_network(r) for k, r in runtimes.items()}}, len(images), args.repeats)
    for k in runtimes:
        print(f"[network] {name}: {k} {rates[k]:.2f} img/s, torch eager {rates['torch']:.2f} img/s,"
              f" ratio {rates[k] / rates['torch']:.2f}x{vs_onnx(k, rates)}", flush=True)

    # 2. end to end through the pyfunc: decode -> runtime -> encode -> JSON
    frame = pd.DataFrame({"image": [encode_png(img) for img in images]})
    models = {"torch": MMDetPyfuncModel(torch_runtime),
              **{k: MMDetPyfuncModel(r) for k, r in runtimes.items()}}
    for per_image in map(int, args.detections.split(",")):
        params = {"max_detections": per_image}

        def predict(model):
            return lambda: json.dumps(model.predict(frame, params=params)["boxes"].tolist())

        rates = best_rate({k: predict(m) for k, m in models.items()}, len(images), args.repeats)
        found = sum(len(d) for d in torch_runtime(images, torch_runtime.default_params.updated(
            params))) / len(images)
        for k in runtimes:
            print(f"[end-to-end] {name}, {found:.1f} detections/image: {k} {rates[k]:.2f} img/s, "
                  f"torch {rates['torch']:.2f} img/s, ratio {rates[k] / rates['torch']:.2f}x"
                  f"{vs_onnx(k, rates)}", flush=True)

    # 2b. a 12-megapixel picture tiled (the goal for x at auto on an AMX CPU: < 6 s)
    if args.tiled:
        big = pd.DataFrame({"image": [encode_png(scene_image(4032, 3024, 7))]})
        params = {"tile_grid_size": args.tiled}
        for k, model in models.items():
            if "int8" in k:
                continue
            model.predict(big, params=params)  # warm-up: the tile shapes
            start = time.perf_counter()
            answer = model.predict(big, params=params)["boxes"].tolist()
            seconds = time.perf_counter() - start
            print(f"[tiled 12 MP] {name}: {k} 4032x3024 at tile_grid_size {args.tiled}: "
                  f"{seconds:.2f} s, {len(answer[0])} detections", flush=True)

    # 3. what they found
    params = torch_runtime.default_params.updated({"score_threshold": 0.05})
    want = torch_runtime(images, params)
    got = {k: r(images, params) for k, r in runtimes.items()}
    total = sum(len(d) for d in want)
    for k in fp32_runtimes:
        same = sum(same_detections(a, b, 0.5, 1e-4) for a, b in zip(want, got[k]))
        print(f"[answers] {name}: torch {total} detections on {len(images)} images, {k} "
              f"{sum(len(d) for d in got[k])}, identical {same}", flush=True)
    for k, reference in (("onnx int8", "onnx fp32"), ("openvino bf16", "openvino fp32"),
                         ("openvino int8", "openvino fp32")):
        if k in got:
            close = sum(same_detections(a, b, 2.0, 0.05) for a, b in zip(got[reference], got[k]))
            print(f"[answers] {name}: {k} {sum(len(d) for d in got[k])} detections, {close} of "
                  f"{reference}'s within 2 px and 0.05 score (random weights: no accuracy "
                  f"measure)", flush=True)


def cpu_description() -> str:
    """The CPU's model name, count, and the flags that decide which precisions run fast."""
    info = open("/proc/cpuinfo").read()
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines()
                  if line.startswith("model name")), "unknown CPU")
    flags = set(next((line.split(":", 1)[1].split() for line in info.splitlines()
                      if line.startswith("flags")), []))
    wanted = ["amx_bf16", "amx_int8", "avx512_bf16", "avx512_vnni", "avx512f", "avx2"]
    return (f"{model}; {os.cpu_count()} CPUs; flags: {' '.join(f for f in wanted if f in flags) or 'none of'} "
            f"({'AMX' if 'amx_bf16' in flags else 'AVX512-BF16' if 'avx512_bf16' in flags else 'no bf16'})")


def openvino_version(args) -> str:
    if not args.openvino:
        return ""
    import openvino

    from scoring.runtimes.openvino_rtmdet import openvino_core

    caps = openvino_core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    return f"; openvino {openvino.__version__} (CPU capabilities: {', '.join(caps)})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny,x")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--int8", action="store_true", help="also quantize and time int8")
    parser.add_argument("--no-openvino", dest="openvino", action="store_false",
                        help="leave OpenVINO (fp32, and bf16 where the CPU has it) out")
    parser.add_argument("--threads", type=int, default=None,
                        help="threads for torch and ORT alike (default: torch's default); 1 is "
                             "the fair choice on a machine others are loading, where torch's "
                             "OpenMP threads wait on each other when one is descheduled")
    parser.add_argument("--tiled", default="4x4",
                        help="also time one 4032x3024 picture at this tile_grid_size through each "
                             "runtime's pyfunc (\"\" to skip; default 4x4)")
    parser.add_argument("--detections", default="3,100",
                        help="detections per picture to time end to end (default 3,100)")
    args = parser.parse_args()
    quiet_logs()
    # one predict call scores all --images: on a slow or loaded CPU x takes longer than a
    # request may (60 s), which is a serving limit, not something to measure here
    os.environ.setdefault("MMDET_MLFLOW_REQUEST_TIMEOUT", "3600")
    import onnxruntime as ort
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"{cpu_description()}; torch {torch.__version__} {torch.get_num_threads()} "
          f"threads; onnxruntime {ort.__version__}{openvino_version(args)}", flush=True)
    images = [scene_image(640, 480, seed) for seed in range(args.images)]
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            run_model(name, Path(tmp), args, images)


if __name__ == "__main__":
    main()
