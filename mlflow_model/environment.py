"""What a saved model needs installed: the one list of pins (``requirements.txt`` beside this
file), the part of it each runtime needs, and the environment files written into a model
(``requirements.txt``, ``python_env.yaml``, ``conda.yaml``).

A torch model carries the whole stack, and its mmcv builds compiled ops from source, which needs
torch installed first (``mmcv_build_requirements``). An ONNX model needs only wheels
(``ONNX_SERVING_PACKAGES``; an OpenVINO model ``OPENVINO_SERVING_PACKAGES``): it installs in
about a minute anywhere, Azure's no-code deployment included.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from scoring import model_dir

_PINS_FILE = Path(__file__).with_name("requirements.txt")


def pinned_requirements(path: str | os.PathLike = _PINS_FILE) -> list[str]:
    """The requirements of a pip requirements file and of the files it includes (``-r FILE``,
    relative to its folder, as pip reads them), without comments and other options; by default
    the pinned serving stack (mlflow_model/requirements.txt, the one list of pins)."""
    path = Path(path)
    found = []
    for line in (line.split("#")[0].strip() for line in path.read_text().splitlines()):
        if line.startswith("-r "):
            found += pinned_requirements(path.parent / line[3:].strip())
        elif line and not line.startswith("-"):
            found.append(line)
    return found


def _pin(name: str) -> str:
    return next(r for r in pinned_requirements() if r.split("==")[0] == name)


# What a model on the ONNX runtime needs to load and serve: wheels only, no torch/mmcv/mmdet.
ONNX_SERVING_PACKAGES = ("mlflow-skinny", "onnxruntime", "numpy", "pandas", "pillow",
                         "opencv-python-headless")
# The same for a model on the OpenVINO runtime: openvino in onnxruntime's place.
OPENVINO_SERVING_PACKAGES = ("mlflow-skinny", "openvino", "numpy", "pandas", "pillow",
                             "opencv-python-headless")
_SERVING_PACKAGES = {"onnx": ONNX_SERVING_PACKAGES, "openvino": OPENVINO_SERVING_PACKAGES}
# Only for export, quantization or Azure's no-code scoring script, never in a torch model.
_NOT_FOR_TORCH_MODELS = ("onnxruntime", "onnx", "ml_dtypes", "azureml-ai-monitoring", "openvino")


def get_default_pip_requirements(runtime: str = "torch") -> list[str]:
    """A saved model's requirements.txt: the pins its runtime needs."""
    pins = {r.split("==")[0]: r for r in pinned_requirements()}
    if runtime in _SERVING_PACKAGES:
        pins["mlflow-skinny"] = pins["mlflow"].replace("mlflow", "mlflow-skinny", 1)
        return [pins[name] for name in _SERVING_PACKAGES[runtime]]
    return [pin for name, pin in pins.items() if name not in _NOT_FOR_TORCH_MODELS]


def mmcv_build_requirements() -> list[str]:
    """What must be installed before mmcv's sdist can build its compiled ops: torch (mmcv's
    setup.py imports it, and skips the ops silently without it), numpy, setuptools < 81 (it
    needs pkg_resources), wheel, ninja, and pip < 25.3, which still builds a project without a
    pyproject.toml (mmcv 2.1.0) in the environment itself instead of an isolated one."""
    return ["pip==25.2", "setuptools>=77,<81", "wheel", "ninja", _pin("numpy"), _pin("torch")]


def get_default_conda_env(runtime: str = "torch") -> dict:
    from mlflow.utils.environment import _mlflow_conda_env

    return _mlflow_conda_env(additional_pip_deps=get_default_pip_requirements(runtime))


def write_environment(path: Path, requirements: list[str], runtime: str) -> None:
    """requirements.txt, python_env.yaml and conda.yaml of a saved model. A torch model's mmcv
    builds its ops from source with torch installed first (python_env.yaml's build
    dependencies); an ONNX model's packages are all wheels, and its conda.yaml (what Azure's
    no-code deployment installs) adds the package Azure's generated scoring script imports."""
    import yaml

    from mlflow.utils.environment import _mlflow_conda_env, _PythonEnv

    (path / model_dir.REQUIREMENTS_FILE).write_text("\n".join(requirements) + "\n")
    torch_model = runtime == "torch"
    _PythonEnv(
        python=".".join(map(str, sys.version_info[:3])),
        build_dependencies=mmcv_build_requirements() if torch_model else None,
        dependencies=[f"-r {model_dir.REQUIREMENTS_FILE}"],
    ).to_yaml(str(path / model_dir.PYTHON_ENV_FILE))
    if torch_model:
        conda = _mlflow_conda_env(additional_pip_deps=mmcv_build_requirements()[1:] + requirements)
        header = ("# mmcv builds its compiled ops only when torch is already installed: prefer\n"
                  "# `--env-manager virtualenv` (python_env.yaml installs torch first).\n")
    else:
        conda = _mlflow_conda_env(additional_pip_deps=requirements + [_pin("azureml-ai-monitoring")])
        header = "# Wheels only: installs in about a minute (Azure ML no-code deployments read this file).\n"
    (path / model_dir.CONDA_FILE).write_text(header + yaml.safe_dump(conda, sort_keys=False))
