"""Benchmark of ``mmdet-mlflow spark-batch`` (not a test). Prints, measured in this one run on the
same pictures and model:

1. pictures/s of the Spark job at ``local[2]`` divided by that of ``mmdet-mlflow batch`` (one
   process, all cores), end to end (each command started, run and finished: the JVM's start
   and the model's load count) and for the scoring alone (the Spark job's own per-batch time
   against the batch command's time less its model load) (goal: >= 0.8 end to end);
2. how many times each Spark Python worker loaded the model (goal: once).

The spark-batch runs use ``--fast-start`` (``mmdet_mlflow.spark_jvm``). Before the timed runs,
one spark-batch run on a few pictures: on a machine where no fast-start run has been yet it
writes the driver's class-data archive, and its time is printed as the first run's; the timed
runs are what every later run costs. After
each spark-batch run the bench waits for its JVM, which ends on its own after the command has
returned, so that it takes no CPU from the next timed command.

The model is untrained (this machine cannot download COCO weights), with heads scaled so that
pictures get detections with real masks.

    flock -x /tmp/cpu.lock .venv/bin/python bench/spark.py [--pictures 60] [--runtime torch,onnx]
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _quiet import packaging_to_stderr, quiet_logs

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from helpers import TINY, make_official_checkpoint, scene_image  # noqa: E402
from onnx_vs_torch import cpu_description  # noqa: E402


def make_inputs(work: Path, count: int) -> Path:
    import cv2

    folder = work / "pictures"
    folder.mkdir()
    for seed in range(count):
        cv2.imwrite(str(folder / f"picture{seed:03d}.jpg"), scene_image(640, 480, seed))
    return folder


def package(work: Path, runtime: str) -> Path:
    import mlflow_model

    checkpoint = work / "tiny.pth"
    if not checkpoint.exists():
        make_official_checkpoint(checkpoint, TINY)
    path = work / f"model-{runtime}"
    with packaging_to_stderr():
        mlflow_model.save_model(path, TINY, str(checkpoint), runtime=runtime)
    return path


def timed(cmd: list[str]) -> tuple[float, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TQDM_DISABLE": "1"}
    started = time.perf_counter()
    result = subprocess.run(cmd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}")
    return seconds, result.stdout + result.stderr


def spark_jvms_ended(timeout: float = 60) -> None:
    """Wait for the local Spark driver JVMs of earlier runs to exit."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = subprocess.run(["pgrep", "-f", "org.apache.spark.deploy.SparkSubmit"],
                               capture_output=True)
        if found.returncode != 0:
            return
        time.sleep(0.1)


def load_seconds(model: Path) -> float:
    """The model's load time in a fresh process (what the batch command pays once)."""
    code = ("import time, mlflow_model; from scoring.model_dir import ModelDir; "
            "t = time.perf_counter(); mlflow_model.load_predictor(ModelDir(%r).data.path); "
            "print(time.perf_counter() - t)" % str(model))
    seconds, out = timed([sys.executable, "-c", code])
    # the last line that is a number (the OpenVINO runtime prints its precision on stderr)
    return next(float(line) for line in reversed(out.strip().splitlines())
                if re.fullmatch(r"[\d.eE+-]+", line.strip()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pictures", type=int, default=60)
    parser.add_argument("--runtime", default="torch,onnx")
    parser.add_argument("--master", default="local[2]")
    args = parser.parse_args()
    quiet_logs()
    print(f"CPU: {cpu_description()}; {args.pictures} pictures 640x480 JPEG; tiny model", flush=True)
    cli = [sys.executable, "-m", "mmdet_mlflow.cli"]
    with tempfile.TemporaryDirectory(prefix="bench-spark-") as tmp:
        work = Path(tmp)
        pictures = make_inputs(work, args.pictures)
        few = work / "few"
        few.mkdir()
        for picture in sorted(pictures.iterdir())[:4]:
            (few / picture.name).write_bytes(picture.read_bytes())
        runtimes = args.runtime.split(",")
        models = {runtime: package(work, runtime) for runtime in runtimes}
        spark_jvms_ended()
        first_s, log = timed([*cli, "spark-batch", "--model", str(models[runtimes[0]]), "--input",
                              str(few), "--output", str(work / "first"), "--master", args.master, "--fast-start"])
        archive = "wrote Spark's class-data archive" in log
        print(f"first spark-batch run ({len(list(few.iterdir()))} pictures): {first_s:.1f} s"
              + (", writing the driver's class-data archive" if archive else
                 " (the class-data archive was there already)"), flush=True)
        spark_jvms_ended()
        for runtime in runtimes:
            model = models[runtime]
            batch_s, _ = timed([*cli, "batch", "--model", str(model), "--input", str(pictures),
                                "--output", str(work / f"batch-{runtime}.jsonl")])
            load_s = load_seconds(model)
            spark_s, log = timed([*cli, "spark-batch", "--model", str(model), "--input", str(pictures),
                                  "--output", str(work / f"spark-{runtime}"), "--master", args.master,
                                  "--fast-start"])
            spark_jvms_ended()
            scoring_s = sum(float(s) for s in re.findall(r"^batch \d+: \d+ pictures .*? in ([\d.]+) s", log, re.M))
            loads = re.search(r"the model loaded (\d+) times in (\d+) Python workers", log)
            n = args.pictures
            print(f"[{runtime}] batch: {n / batch_s:.2f} pictures/s end to end ({batch_s:.1f} s, "
                  f"model load {load_s:.1f} s); spark-batch {args.master}: {n / spark_s:.2f} pictures/s "
                  f"end to end ({spark_s:.1f} s), scoring alone {scoring_s:.1f} s", flush=True)
            print(f"[{runtime}] spark / batch throughput: end to end {batch_s / spark_s:.2f}x, "
                  f"scoring alone {(batch_s - load_s) / scoring_s:.2f}x (goal >= 0.8); model loaded "
                  f"{loads.group(1)} times in {loads.group(2)} Python workers", flush=True)


if __name__ == "__main__":
    main()
