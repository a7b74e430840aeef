"""The one owner of a saved model's folder layout: what serving reads (it ships in every model's
``code/scoring``), and the names packaging writes.

A saved MLflow model (``save_model``)::

    MLmodel                     python_function flavor (loader_module: scoring.pyfunc, the
                                model_config it records) + the mmdet flavor (where the
                                config, the weights and model.json are)
    model/                      the weights folder (``WeightsDir``):
      config.py                   the mmengine config, flattened
      weights.pth                 plain tensors, read with torch.load(weights_only=True)
      model.json                  what the model is: family, task, runtime, class names, default
                                  predict params, batch size, where the weights came from,
                                  library versions (an ONNX model also records its "onnx"
                                  settings here); read only through ``WeightsDir.read_info``
      model.onnx                  an ONNX model only: the exported network (raw head outputs)
      model.onnx.data             ... its weights (ONNX external data, see ``onnx_data_file``)
      model.int8.onnx(.data)      an ONNX model only, if quantized: the int8 (QDQ) network
    code/scoring                the code that loads and scores it (nothing else: see docs/architecture.md)
    requirements.txt, python_env.yaml, conda.yaml, input_example.json, serving_input_example.json

A fine-tune's ``pytorch_model_folder`` is a weights folder on its own (the same three files);
the layouts only tooling writes (a fine-tune's outputs, a registration's details) are in
``mlflow_model.model_dir``. This module knows these names; nobody else spells them.

model.json is the one source of what a model is: the pyfunc loader is handed the weights folder
alone, and a fine-tune's weights folder has no MLmodel. Models saved before this rule also
copied runtime, task, classes, config name, checkpoint and versions into the MLmodel's mmdet
flavor; nothing reads those copies, so such models load as they did.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

MLMODEL_FILE = "MLmodel"
DATA_DIR = "model"
CODE_DIR = "code"
CONFIG_FILE = "config.py"
WEIGHTS_FILE = "weights.pth"
INFO_FILE = "model.json"
ONNX_FILE = "model.onnx"
ONNX_INT8_FILE = "model.int8.onnx"
ONNX_INFO_KEY = "onnx"  # model.json's section of export-time settings the ONNX runtime reads
REQUIREMENTS_FILE = "requirements.txt"
PYTHON_ENV_FILE = "python_env.yaml"
CONDA_FILE = "conda.yaml"


def onnx_data_file(onnx_file: str) -> str:
    """The file beside an ONNX file that holds its weights (ONNX "external data"): ONNX Runtime
    reads them from there straight into place instead of parsing them out of the protobuf."""
    return onnx_file + ".data"


class WeightsDir:
    """A folder with ``config.py``, ``weights.pth`` and ``model.json``: a saved model's ``model/``
    and a fine-tune's ``pytorch_model_folder``."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    @property
    def config(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def weights(self) -> Path:
        return self.path / WEIGHTS_FILE

    @property
    def onnx(self) -> Path:
        return self.path / ONNX_FILE

    @property
    def onnx_int8(self) -> Path:
        return self.path / ONNX_INT8_FILE

    @property
    def info_file(self) -> Path:
        return self.path / INFO_FILE

    def exists(self) -> bool:
        return self.info_file.is_file() and self.config.is_file()

    def read_info(self) -> dict:
        """model.json: the one reader of what the model is (see the module docstring)."""
        return json.loads(self.info_file.read_text())

    def write_info(self, info: dict) -> None:
        self.info_file.write_text(json.dumps(info, indent=2))


class ModelDir:
    """A saved MLflow model folder."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    @property
    def mlmodel(self) -> Path:
        return self.path / MLMODEL_FILE

    @property
    def data(self) -> WeightsDir:
        return WeightsDir(self.path / DATA_DIR)

    @property
    def code(self) -> Path:
        return self.path / CODE_DIR

    def read_info(self) -> dict:
        """What the model is: its weights folder's model.json (``WeightsDir.read_info``)."""
        return self.data.read_info()


def sha256_of(path: str | os.PathLike) -> str:
    """A file's sha256, read a MiB at a time (model.json records those of the files it serves)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
