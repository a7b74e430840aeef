"""`make demo`'s job, reduced (a small set, a few training steps), end to end; and MLproject."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from helpers import VENV_BIN

ROOT = Path(__file__).resolve().parent.parent
REDUCED = ["--num-images", "12", "--finetune-args",
           "--max-steps 2 --image-size 128 --training-batch-size 2 --validation-batch-size 2 --warmup-steps 1"]


def demo_command(output: Path) -> list[str]:
    return [sys.executable, "-m", "mmdet_mlflow.cli", "demo", "--output", str(output), *REDUCED]


# What requirements-dev.txt adds to requirements-demo.txt (`make demo` installs only the latter),
# with the modules each brings: the demo must run without any of them.
TEST_ONLY_MODULES = {
    "azure-ai-ml": ("azure.ai.ml",), "pytest": ("pytest", "_pytest"), "pytest-timeout": ("pytest_timeout",),
    "pytest-xdist": ("xdist",), "hypothesis": ("hypothesis",), "pyspark": ("pyspark", "py4j"),
    "sahi": ("sahi",), "fire": ("fire",),
}
# Put first on a process's PYTHONPATH, this makes those modules absent as Python sees it: an
# import fails (ModuleNotFoundError) and importlib's probes (find_spec) answer None.
WITHOUT_TEST_ONLY_PACKAGES = """
import sys
for name in {blocked!r}:
    sys.modules[name] = None
"""


def env() -> dict:
    return {**os.environ, "PATH": f"{VENV_BIN}:{os.environ['PATH']}", "PYTHONUNBUFFERED": "1"}


def env_without_test_only_packages(folder: Path) -> dict:
    """``env()`` in which the test-only packages do not import (a ``sitecustomize`` in
    ``folder``, first on PYTHONPATH, so the demo's servers inherit it too)."""
    blocked = sorted({module for modules in TEST_ONLY_MODULES.values() for module in modules})
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(WITHOUT_TEST_ONLY_PACKAGES.format(blocked=blocked))
    path = os.pathsep.join(p for p in (str(folder), os.environ.get("PYTHONPATH")) if p)
    return {**env(), "PYTHONPATH": path}


def test_the_demo_installs_less_than_the_tests_and_the_rest_is_named():
    """requirements-dev.txt builds on requirements-demo.txt, and what it adds is exactly what the
    demo test runs without."""
    from packaging.requirements import Requirement

    import mlflow_model

    demo = {Requirement(r).name for r in mlflow_model.pinned_requirements(ROOT / "requirements-demo.txt")}
    everything = {Requirement(r).name for r in mlflow_model.pinned_requirements(ROOT / "requirements-dev.txt")}
    no_deps = {Requirement(r).name for r in mlflow_model.pinned_requirements(ROOT / "requirements-nodeps.txt")}
    assert "-r requirements-demo.txt" in (ROOT / "requirements-dev.txt").read_text().splitlines()
    assert demo < everything
    assert (everything - demo) | no_deps == set(TEST_ONLY_MODULES)


def port_is_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_reduced_demo_end_to_end_then_reused_and_interruptible(tmp_path):
    # run from tmp_path, not the checkout: MLflow puts the runs' files in ./mlruns of the folder
    # the demo runs from (not under --output yet), and tests never write into the repository
    # the first run as `make demo` installs it: without the packages only the tests use
    out = tmp_path / "demo"
    first = subprocess.run(demo_command(out), capture_output=True, text=True, timeout=1500, cwd=tmp_path,
                           env=env_without_test_only_packages(tmp_path / "without-test-packages"))
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    for step in range(1, 8):
        assert f"== {step}/7" in first.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["registered"] == "models:/rtmdet-ins-tiny-fridge/1"
    metrics = json.loads((out / "evaluation" / "metrics.json").read_text())
    assert set(metrics["segm"]) >= {"AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100"}
    assert (out / "evaluation" / "pr_curves.png").is_file()
    assert len(list((out / "serving").glob("*.png"))) == 2
    request = json.loads((out / "request.json").read_text())
    assert request["input_data"]["columns"] == ["image"] and len(request["input_data"]["data"]) == 2
    assert request["params"] == {"class_agnostic_nms": True}  # one answer per object
    assert "same detections as mlflow models serve: True" in first.stdout
    lines = (out / "batch" / "predictions.jsonl").read_text().splitlines()
    validation = json.loads((out / "data" / "validation.coco.json").read_text())["images"]
    assert len(lines) == len(validation)

    # Ctrl-C while a server runs: the demo stops, and so do its servers.
    second = subprocess.Popen(demo_command(out), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env=env(), start_new_session=True, cwd=tmp_path)
    port = None
    for line in second.stdout:
        match = re.search(r"serving on http://127\.0\.0\.1:(\d+)", line)
        if match:
            port = int(match.group(1))
            break
    assert port and port_is_open(port)
    os.killpg(second.pid, signal.SIGINT)  # what a terminal's Ctrl-C sends
    rest = second.stdout.read()
    assert second.wait(timeout=120) != 0
    deadline = time.monotonic() + 30
    while port_is_open(port) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not port_is_open(port), "the server outlived the demo"
    assert "interrupted" in rest

    # Nothing changed: every step is reused, the same model version serves.
    third = subprocess.run(demo_command(out), capture_output=True, text=True, env=env(), timeout=900,
                           cwd=tmp_path)
    assert third.returncode == 0, third.stdout[-3000:] + third.stderr[-3000:]
    assert third.stdout.count("(reused: unchanged since the last run)") == 4
    assert "(reused: version 1 holds this fine-tuning run)" in third.stdout


def test_every_mlproject_entry_point_parses_with_the_cli():
    """Each entry point's command, filled with its defaults (a path where it has none), is one
    the CLI takes: MLproject cannot drift from the options."""
    import shlex

    import yaml

    from mmdet_mlflow.cli import build_parser

    entry_points = yaml.safe_load((ROOT / "MLproject").read_text())["entry_points"]
    for name, entry in entry_points.items():
        values = {param: (spec.get("default", "x") if isinstance(spec, dict) else "x")
                  for param, spec in entry.get("parameters", {}).items()}
        argv = shlex.split(entry["command"].format(**values))
        assert argv[:3] == ["python", "-m", "mmdet_mlflow.cli"], name
        build_parser().parse_args(argv[3:])  # argparse exits on an unknown option or value


def test_mlproject_entry_point_runs_with_mlflow_run(tmp_path):
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    done = subprocess.run(
        [str(VENV_BIN / "mlflow"), "run", str(ROOT), "-e", "synth", "--env-manager", "local",
         "-P", f"output={tmp_path / 'data'}", "-P", "num_images=4", "-P", "seed=3",
         "--experiment-name", "mlproject-test"],
        capture_output=True, text=True, env={**env(), "MLFLOW_TRACKING_URI": tracking}, timeout=600,
        cwd=tmp_path)  # the run's files go to ./mlruns
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert (tmp_path / "data" / "train.jsonl").is_file()
    assert "succeeded" in done.stderr
