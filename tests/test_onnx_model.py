"""A model packaged with `--runtime onnx` (and one with `--runtime openvino`: the same graph on
OpenVINO Runtime, every test run for both), used as a user would: it installs from wheels alone in a
fresh venv built only from its own requirements (where torch cannot be imported), loads,
predicts, serves under `mlflow models serve`, and answers the model card's request under the
real azmlinfsrv running what Azure's generated no-code scoring script does."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import requests

import mlflow_model
from helpers import b64, free_port, running
from mmdet_mlflow import servers

ROOT = Path(__file__).resolve().parent.parent
# The processes run in a model's venv may cache the bytecode they compile there, as a user's
# would, even where the suite's shell sets PYTHONDONTWRITEBYTECODE (an empty value unsets it):
# the venv is installed without bytecode, and each process would otherwise compile every module
# it imports anew.
IN_VENV = {"PYTHONDONTWRITEBYTECODE": ""}
TORCH_STACK = ("torch", "torchvision", "mmcv", "mmdet", "mmengine")
# what each runtime's model may import, beside the serving set, and what it must not
SERVING_RUNTIME = {"onnx": "onnxruntime", "openvino": "openvino"}


@pytest.fixture(scope="module", params=["onnx", "openvino"])
def runtime(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def onnx_model_dir(tmp_path_factory, tiny_checkpoint, runtime) -> Path:
    folder = tmp_path_factory.mktemp(f"{runtime}-model") / f"tiny-{runtime}"
    done = subprocess.run([sys.executable, "-m", "mmdet_mlflow.cli", "package", "--config",
                           "rtmdet-ins_tiny_8xb32-300e_coco", "--checkpoint", str(tiny_checkpoint),
                           "--output", str(folder), "--runtime", runtime],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "max |onnx - torch|" in done.stdout and f"{runtime} runtime" in done.stdout
    return folder


@pytest.fixture(scope="module")
def model_venv(tmp_path_factory, onnx_model_dir, runtime) -> Path:
    """A venv with nothing but the model's requirements.txt, wheels only (what installs fast and
    without a compiler), plus the inference server Azure adds to its images. Not compiled to
    bytecode at install (about half of pip's time here): Python compiles what a test imports
    (``IN_VENV``). No pip of its own: the suite's pip installs into it (``pip --python``)."""
    venv = tmp_path_factory.mktemp(f"{runtime}-venv") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=300)
    pip = [sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "-q",
           "--disable-pip-version-check", "--only-binary=:all:", "--no-compile"]
    done = subprocess.run([*pip, "-r", str(onnx_model_dir / "requirements.txt")],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    # conda.yaml is what Azure installs for a no-code deployment: its extra package, and the
    # inference server Azure's image brings, both as wheels too.
    conda_pip = _conda_pip_requirements(onnx_model_dir)
    done = subprocess.run([*pip, *conda_pip, _pin_of("azureml-inference-server-http")],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return venv


def _conda_pip_requirements(model_dir: Path) -> list[str]:
    import yaml

    conda = yaml.safe_load((model_dir / "conda.yaml").read_text())
    return next(d["pip"] for d in conda["dependencies"] if isinstance(d, dict))


def _pin_of(name: str) -> str:
    return next(line for line in mlflow_model.pinned_requirements(ROOT / "requirements-dev.txt")
                if line.split("==")[0] == name)


@pytest.fixture(scope="module")
def card_request(image_files) -> dict:
    return {"input_data": {"columns": ["image"], "index": [0, 1], "data": [b64(p) for p in image_files]}}


@pytest.fixture(scope="module")
def expected(onnx_model_dir, card_request) -> list:
    """The ONNX model's answer in this (development) environment, through its pyfunc."""
    import mlflow
    import pandas as pd

    split = card_request["input_data"]
    frame = pd.DataFrame({"image": split["data"]}, index=split["index"])
    return mlflow.pyfunc.load_model(str(onnx_model_dir)).predict(frame).to_dict(orient="records")


def test_requirements_are_the_serving_stack_without_torch(onnx_model_dir, runtime):
    requirements = (onnx_model_dir / "requirements.txt").read_text().split()
    names = {r.split("==")[0] for r in requirements}
    assert names == {"mlflow-skinny", SERVING_RUNTIME[runtime], "numpy", "pandas", "pillow",
                     "opencv-python-headless"}
    assert all("==" in r for r in requirements), "every package pinned"
    assert not (onnx_model_dir / "model" / "weights.pth").exists(), "no torch weights shipped"
    conda = (onnx_model_dir / "conda.yaml").read_text()
    assert not any(f"- {name}" in conda for name in TORCH_STACK)


def test_loads_and_predicts_in_a_venv_of_its_own_requirements_without_torch(model_venv, onnx_model_dir,
                                                                          card_request, expected, runtime):
    python = str(model_venv / "bin" / "python")
    others = [r for r in SERVING_RUNTIME.values() if r != SERVING_RUNTIME[runtime]]
    for module in (*TORCH_STACK, *others):
        missing = subprocess.run([python, "-c", f"import {module}"], capture_output=True, text=True,
                                 env={**os.environ, **IN_VENV})
        assert missing.returncode != 0, f"{module} is importable in the {runtime} model's venv"
    script = ("import json, sys, mlflow.pyfunc, pandas as pd\n"
              "request = json.load(open(sys.argv[2]))['input_data']\n"
              "frame = pd.DataFrame({'image': request['data']}, index=request['index'])\n"
              "model = mlflow.pyfunc.load_model(sys.argv[1])\n"
              "print(json.dumps(model.predict(frame).to_dict(orient='records')))\n")
    request_file = onnx_model_dir.parent / "request.json"
    request_file.write_text(json.dumps(card_request))
    done = subprocess.run([python, "-c", script, str(onnx_model_dir), str(request_file)],
                          capture_output=True, text=True, timeout=300, cwd=onnx_model_dir.parent,
                          env={**os.environ, **IN_VENV, "PYTHONPATH": ""})
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.splitlines()[-1]) == expected


def test_serves_with_mlflow_models_serve_in_its_venv(model_venv, onnx_model_dir, card_request, expected,
                                                     tmp_path):
    port = free_port()
    bin_dir = model_venv / "bin"
    cmd = [str(bin_dir / "python"), "-m", "mlflow", "models", "serve", "-m", str(onnx_model_dir),
           "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1"]
    env = {**IN_VENV, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHONPATH": ""}
    with running(cmd, f"http://127.0.0.1:{port}/ping", tmp_path / "serve.log", env=env):
        url = f"http://127.0.0.1:{port}/invocations"
        answer = requests.post(url, json={"dataframe_split": card_request["input_data"]}, timeout=120)
        assert answer.status_code == 200, answer.text
        assert answer.json()["predictions"] == expected
        # the same malformed requests get the same 4xx as the torch model's (tests/test_serve.py)
        for body, message in [
            ({"dataframe_split": {"columns": ["image"], "index": [3], "data": [["%%%"]]}}, "row 3: not valid base64"),
            ({"dataframe_split": {"columns": ["image"], "data": [["x"]]}, "params": {"score_thresold": 0.9}},
             "unknown param 'score_thresold'"),
            ({"dataframe_split": {"columns": ["image"], "data": [["x"]] * 65}}, "over the limit of 64"),
        ]:
            response = requests.post(url, json=body, timeout=120)
            assert response.status_code == 400, response.text
            assert message in response.json()["message"] and "Traceback" not in response.text


def test_azure_no_code_deployment_answers_the_model_card_request(model_venv, onnx_model_dir, card_request,
                                                                 expected, tmp_path):
    """No environment, no scoring script of ours: Azure's generated script under azmlinfsrv, in
    the environment made from the model's conda.yaml."""
    app = tmp_path / "app"
    app.mkdir()
    shutil.copy(ROOT / "tests" / "assets" / "azure_nocode_score.py", app / "score.py")
    port = free_port()
    bin_dir = model_venv / "bin"
    cmd = [str(bin_dir / "python"), "-c", servers.AZMLINFSRV_ON_LOOPBACK, "--entry_script", "score.py",
           "--model_dir", str(onnx_model_dir.parent), "--port", str(port)]
    env = {**servers.azmlinfsrv_env(app), **IN_VENV, "PATH": f"{bin_dir}:{os.environ['PATH']}",
           "AZUREML_MODEL_DIR": str(onnx_model_dir.parent), "MLFLOW_MODEL_FOLDER": onnx_model_dir.name}
    with running(cmd, f"http://127.0.0.1:{port}/", tmp_path / "azmlinfsrv.log", cwd=app, env=env):
        answer = requests.post(f"http://127.0.0.1:{port}/score", json=card_request, timeout=120)
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert (json.loads(body) if isinstance(body, str) else body) == expected
