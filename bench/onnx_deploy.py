"""What a user pays to run a model, torch runtime vs ONNX runtime vs OpenVINO runtime (not a test;
numbers in notes).

For a tiny (default) or x model packaged both ways from the same weights, in one run:
- environment: a fresh venv built from the model's own requirements.txt (warm pip cache; the
  torch model's mmcv comes from pip's wheel cache when `make setup` built it), its install time
  and size on disk;
- cold start: a new process that loads the model with mlflow.pyfunc and answers one 640x480
  image, wall time until the answer (and until the model was loaded: imports and session), and
  the process's RSS after loading (before predicting) and its peak while loading.

Usage: .venv/bin/python bench/onnx_deploy.py [--config rtmdet-ins_x_8xb16-300e_coco] [--keep DIR]
    [--runtimes torch,onnx,openvino]
Prints the CPU model and ratios ONNX / torch and OpenVINO / ONNX (the OpenVINO model at its
default precision, MMDET_MLFLOW_PRECISION=auto, as a deployment runs it).
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _quiet import packaging_to_stderr, quiet_logs

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

COLD_START = r"""
import base64, json, sys, time
start = float(sys.argv[3])
import mlflow.pyfunc, pandas as pd
model = mlflow.pyfunc.load_model(sys.argv[1])
loaded = time.time() - start
# From /proc, not ru_maxrss: Linux carries the parent's high-water mark in ru_maxrss through
# fork and exec, so a child of this (large) bench process would report the bench's own peak;
# VmHWM belongs to the address space exec made.
status = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in open("/proc/self/status")
          if line.startswith(("VmRSS:", "VmHWM:"))}
rss_after_load, peak_rss_loading = status["VmRSS"], status["VmHWM"]
frame = pd.DataFrame({"image": [base64.b64encode(open(sys.argv[2], "rb").read()).decode()]})
boxes = model.predict(frame).iloc[0]["boxes"]
print(json.dumps({"seconds": time.time() - start, "load_seconds": loaded, "rss_after_load": rss_after_load,
                  "peak_rss_loading": peak_rss_loading, "detections": len(boxes)}))
"""


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def build_venv(model_dir: Path, folder: Path) -> dict:
    venv = folder / "venv"
    shutil.rmtree(venv, ignore_errors=True)  # always a fresh venv: the install time is the point
    started = time.monotonic()
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, stdout=sys.stderr)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    requirements = (model_dir / "requirements.txt").read_text().split()
    if any(r.startswith("torch==") for r in requirements):  # mmcv builds against torch: torch first
        build = [r for r in requirements if r.split("==")[0] in ("torch", "numpy")]
        subprocess.run([*pip, *build, "setuptools>=77,<81", "wheel", "ninja"], check=True, stdout=sys.stderr)
        subprocess.run([*pip, "--no-build-isolation", "-r", str(model_dir / "requirements.txt")], check=True,
                       stdout=sys.stderr)
    else:
        subprocess.run([*pip, "--only-binary=:all:", "-r", str(model_dir / "requirements.txt")], check=True,
                       stdout=sys.stderr)
    seconds = time.monotonic() - started
    size = int(subprocess.run(["du", "-sb", str(venv)], capture_output=True, text=True, check=True)
               .stdout.split()[0])
    return {"install_seconds": seconds, "venv_bytes": size, "python": str(venv / "bin" / "python")}


def cold_start(python: str, model_dir: Path, image: Path) -> dict:
    runs = []
    for _ in range(2):  # the second is the one a restarted container sees (files in page cache)
        done = subprocess.run([python, "-c", COLD_START, str(model_dir), str(image), str(time.time())],
                              capture_output=True, text=True, check=True, env={"PATH": "/usr/bin:/bin"})
        runs.append(json.loads(done.stdout.splitlines()[-1]))
    return min(runs, key=lambda r: r["seconds"])


def main() -> None:
    from helpers import make_official_checkpoint, scene_image, write_png

    import mlflow_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="rtmdet-ins_tiny_8xb32-300e_coco")
    parser.add_argument("--keep", type=Path, help="work here and keep it (default: a temporary folder)")
    parser.add_argument("--runtimes", default="torch,onnx,openvino")
    args = parser.parse_args()
    quiet_logs()
    work = args.keep or Path(tempfile.mkdtemp(prefix="mmdet-mlflow-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    checkpoint = make_official_checkpoint(work / "weights.pth", config=args.config)
    image = write_png(work / "photo.png", scene_image(640, 480, 0))
    print(f"CPU: {cpu_name()}; config {args.config}", flush=True)
    results = {}
    for runtime in args.runtimes.split(","):
        model_dir = work / f"model-{runtime}"
        if not model_dir.exists():
            with packaging_to_stderr():
                mlflow_model.save_model(model_dir, args.config, str(checkpoint), runtime=runtime)
        env = build_venv(model_dir, work / f"env-{runtime}")
        results[runtime] = {**env, **cold_start(env["python"], model_dir, image)}
        r = results[runtime]
        print(f"{runtime:8s}: install {r['install_seconds']:6.1f} s, venv {r['venv_bytes'] / 2**20:6.0f} MiB, "
              f"cold start to first answer {r['seconds']:5.1f} s (loaded at {r['load_seconds']:4.1f} s), RSS after load "
              f"{r['rss_after_load'] / 2**20:5.0f} MiB (peak while loading {r['peak_rss_loading'] / 2**20:5.0f} MiB)",
              flush=True)
    for a, b in (("onnx", "torch"), ("openvino", "onnx"), ("openvino", "torch")):
        if a in results and b in results:
            o, t = results[a], results[b]
            print(f"{a} / {b}: install {o['install_seconds'] / t['install_seconds']:.2f}, venv size "
                  f"{o['venv_bytes'] / t['venv_bytes']:.2f}, cold start {o['seconds'] / t['seconds']:.2f}, "
                  f"RSS after load {o['rss_after_load'] / t['rss_after_load']:.2f}, peak RSS while "
                  f"loading {o['peak_rss_loading'] / t['peak_rss_loading']:.2f}")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
