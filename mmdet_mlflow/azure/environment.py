"""The environment deployments run in (and the training, evaluate and package components): its
Docker build context ships with the package, in ``environment_context/`` (the Dockerfile and the
pin files generated from the one list of pins), so a deployment made from an installed package
needs no source checkout. ``components/environment/environment.yml`` names the same folder for
``az ml environment create`` and the components.

Run time: ``environment_entity()`` (what a deployment creates when it is given no environment of
its own). Developer tool: ``context_files()`` regenerates the pin files; it reads the checkout's
requirements-dev.txt, which its caller (``generate``) locates.
"""
from __future__ import annotations

import hashlib
from importlib import resources
from pathlib import Path

from azure.ai.ml.entities import BuildContext, Environment

import mlflow_model

CONTEXT_DIR = Path(__file__).resolve().with_name("environment_context")
DOCKERFILE = "Dockerfile"
NAME = "mmdet-mlflow"
DESCRIPTION = ("mmdet detectors (mmdet 3.3.0, mmcv 2.1.0 with ops, torch 2.13.0 CPU, MLflow 3) serving "
               "and training environment")
TAGS = {"project": "mmdet-mlflow"}
# Beyond the pins, the image needs the inference server online deployments run under.
SERVING_EXTRAS = ("azureml-inference-server-http",)


def environment_version() -> str:
    """A digest of the build context, so a new pin is a new version."""
    digest = hashlib.sha256()
    for path in sorted(CONTEXT_DIR.iterdir()):
        if path.is_file():
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


def environment_entity() -> Environment:
    """Our environment as the SDK entity a deployment creates (the image builds on first use)."""
    return Environment(name=NAME, version=environment_version(), description=DESCRIPTION,
                       build=BuildContext(path=str(CONTEXT_DIR), dockerfile_path=DOCKERFILE),
                       tags=dict(TAGS))


def installed_pins() -> Path:
    """mlflow_model/requirements.txt, the one list of pins (package data of mlflow_model)."""
    return Path(str(resources.files(mlflow_model) / "requirements.txt"))


def context_files(dev_requirements: Path) -> dict[str, str]:
    """The generated files of the build context: the pins (a copy of
    mlflow_model/requirements.txt), mmcv's build requirements, and the Azure ML inference server
    pinned in ``dev_requirements`` (the checkout's requirements-dev.txt)."""
    header = "# Generated from {} by mmdet_mlflow.azure.generate: do not edit.\n"
    server = [line for line in mlflow_model.pinned_requirements(dev_requirements)
              if line.startswith(SERVING_EXTRAS)]
    return {
        "requirements.txt": header.format("mlflow_model/requirements.txt") + installed_pins().read_text(),
        "build-requirements.txt": header.format("mlflow_model.mmcv_build_requirements()")
        + "\n".join(mlflow_model.mmcv_build_requirements()) + "\n",
        "serving-requirements.txt": header.format("requirements-dev.txt") + "\n".join(server) + "\n",
    }
