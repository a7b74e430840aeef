"""OpenVINO Runtime directly vs ONNX Runtime (its CPU kernels, and its OpenVINO execution
provider), on the same exported graphs (not a test): load time (read + compile / session build)
and the network's time on one 640x640 picture, for tiny and x with random weights. Also loads
from OpenVINO's own IR (model.xml + model.bin, converted here) to see whether shipping IR instead
of model.onnx would load faster.

The execution provider is the separate ``onnxruntime-openvino`` package, which installs a second
``onnxruntime`` module: give a venv holding it with --ep-python (it runs in a subprocess there);
without it that part is skipped. Each load is timed in a fresh process (best of --loads), the
network best of --repeats after a warm-up.

    .venv/bin/python bench/openvino_load.py [--models tiny,x] [--ep-python /tmp/ortov-venv/bin/python]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _quiet import packaging_to_stderr, quiet_logs

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "bench")]

from helpers import TINY, X, make_official_checkpoint  # noqa: E402

CONFIGS = {"tiny": TINY, "x": X}

# Runs in a fresh process: load one way, then time the network. argv: kind, path, threads, repeats
PROBE = r"""
import json, sys, time
kind, path, threads, repeats = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
import numpy as np
x = np.random.default_rng(0).standard_normal((1, 3, 640, 640)).astype(np.float32)
start = time.perf_counter()
if kind.startswith("ov"):
    import openvino as ov
    imported = time.perf_counter() - start
    precision = kind.split("-")[-1]
    compiled = ov.Core().compile_model(ov.Core().read_model(path), "CPU",
        {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads,
         **({"INFERENCE_PRECISION_HINT": precision} if precision != "default" else {})})
    request = compiled.create_infer_request()
    run = lambda: request.infer({0: x})
else:
    import onnxruntime as ort
    imported = time.perf_counter() - start
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    if kind == "ort":
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    else:  # ort-ep-FP32 / ort-ep-default: ONNX Runtime's OpenVINO execution provider
        precision = kind.split("-")[-1]
        provider = {"device_type": "CPU", "num_of_threads": str(threads)}
        if precision != "default":
            provider["precision"] = precision
        session = ort.InferenceSession(path, options, providers=["OpenVINOExecutionProvider"],
                                       provider_options=[provider])
    run = lambda: session.run(None, {"inputs": x})
loaded = time.perf_counter() - start
run()
times = []
for _ in range(repeats):
    t = time.perf_counter(); run(); times.append(time.perf_counter() - t)
print(json.dumps({"import": imported, "load": loaded - imported, "network": min(times)}))
"""


def probe(python: str, kind: str, path: Path, threads: int, repeats: int) -> dict:
    done = subprocess.run([python, "-c", PROBE, kind, str(path), str(threads), str(repeats)],
                          capture_output=True, text=True, timeout=1200)
    if done.returncode:
        return {"error": done.stderr.strip().splitlines()[-1][:200]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def export(work: Path, name: str) -> tuple[Path, Path]:
    """model.onnx (+ data) of random weights, and the same graph as OpenVINO IR."""
    import openvino as ov

    import mlflow_model
    from mlflow_model.onnx_export import export_to_weights_dir

    checkpoint = make_official_checkpoint(work / f"{name}.pth", CONFIGS[name])
    weights = work / name / "model"
    with packaging_to_stderr():
        mlflow_model.save_model(work / name, CONFIGS[name], str(checkpoint))
        export_to_weights_dir(weights)
    ir = weights / "model.xml"
    start = time.perf_counter()
    ov.save_model(ov.Core().read_model(str(weights / "model.onnx")), str(ir), compress_to_fp16=False)
    print(f"[convert] {name}: ONNX -> IR in {time.perf_counter() - start:.1f} s; sizes: onnx + data "
          f"{sum(f.stat().st_size for f in weights.glob('model.onnx*')) / 2**20:.1f} MiB, IR "
          f"{sum(f.stat().st_size for f in weights.glob('model.[xb]*')) / 2**20:.1f} MiB", flush=True)
    return weights / "model.onnx", ir


def main() -> None:
    from onnx_vs_torch import cpu_description

    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny,x")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--loads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ep-python", help="a python whose venv has onnxruntime-openvino")
    args = parser.parse_args()
    quiet_logs()
    print(cpu_description(), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            onnx_path, ir = export(Path(tmp), name)
            kinds = [("ort", sys.executable, onnx_path), ("ov-f32", sys.executable, onnx_path),
                     ("ov-bf16", sys.executable, onnx_path), ("ov IR-f32", sys.executable, ir),
                     ("ov IR-bf16", sys.executable, ir)]
            if args.ep_python:
                kinds += [("ort-ep-FP32", args.ep_python, onnx_path),
                          ("ort-ep-default", args.ep_python, onnx_path)]
            results = {}
            for kind, python, path in kinds:
                runs = [probe(python, kind.replace("ov IR", "ov"), path, args.threads, args.repeats)
                        for _ in range(args.loads)]
                if "error" in runs[0]:
                    print(f"[{name}] {kind}: {runs[0]['error']}", flush=True)
                    continue
                results[kind] = {k: min(r[k] for r in runs) for k in runs[0]}
                r = results[kind]
                ratio = results["ort"]["network"] / r["network"]
                print(f"[{name}] {kind}: import {r['import']:.2f} s, load {r['load']:.2f} s, network "
                      f"{r['network'] * 1000:.0f} ms ({ratio:.2f}x ORT's CPU kernels)", flush=True)


if __name__ == "__main__":
    main()
