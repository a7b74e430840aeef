"""The ``mmdet`` MLflow flavor: RTMDet-Ins instance segmentation as a self-contained MLflow model.

Laid out like MLflow's own flavor modules (``mlflow.pytorch``): ``save_model``, ``log_model``,
``load_model`` (the mmdet detector) and ``_load_pyfunc`` (the ``python_function`` flavor, through
this module as ``loader_module``: nothing is pickled). A saved model directory holds::

    MLmodel                  python_function (loader_module: mlflow_model) + mmdet flavors
    model/config.py          the mmengine config, flattened
    model/weights.pth        plain tensors, read with torch.load(weights_only=True)
    model/model.json         class names, default predict params, where the weights came from
    code/mlflow_model, code/scoring   the code that loads and scores it
    requirements.txt, python_env.yaml, conda.yaml   the pinned stack
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Sequence

FLAVOR_NAME = "mmdet"
MODEL_DATA_DIR = "model"
CONFIG_FILE = "config.py"
WEIGHTS_FILE = "weights.pth"
MODEL_INFO_FILE = "model.json"
CODE_DIR = "code"
_PACKAGES = ("mlflow_model", "scoring")  # what a saved model needs to load and score
_PINS_FILE = Path(__file__).with_name("requirements.txt")
DEVICE_ENV = "MMDET_MLFLOW_DEVICE"


def pinned_requirements(path: str | os.PathLike = _PINS_FILE) -> list[str]:
    """The requirements of a pip requirements file, without comments and options (``-r ...``);
    by default the pinned serving stack (mlflow_model/requirements.txt, the one list of pins)."""
    lines = (line.split("#")[0].strip() for line in Path(path).read_text().splitlines())
    return [line for line in lines if line and not line.startswith("-")]


def _pin(name: str) -> str:
    return next(r for r in pinned_requirements() if r.split("==")[0] == name)


def get_default_pip_requirements() -> list[str]:
    return pinned_requirements()


def mmcv_build_requirements() -> list[str]:
    """What must be installed before mmcv's sdist can build its compiled ops: torch (mmcv's
    setup.py imports it, and skips the ops silently without it), numpy, setuptools < 81 (it
    needs pkg_resources), wheel, ninja, and pip < 25.3, which still builds a project without a
    pyproject.toml (mmcv 2.1.0) in the environment itself instead of an isolated one."""
    return ["pip==25.2", "setuptools>=77,<81", "wheel", "ninja", _pin("numpy"), _pin("torch")]


def get_default_conda_env() -> dict:
    from mlflow.utils.environment import _mlflow_conda_env

    return _mlflow_conda_env(additional_pip_deps=get_default_pip_requirements())


def default_device() -> str:
    import torch

    return os.environ.get(DEVICE_ENV) or ("cuda" if torch.cuda.is_available() else "cpu")


def build_detector(config, state_dict, class_names: Sequence[str], device: str | None = None):
    """An mmdet detector in eval mode with exactly these weights (strict: every key, every
    shape), as mmdet's init_detector would build it."""
    from mmdet.registry import MODELS
    from mmengine.model.utils import revert_sync_batchnorm
    from mmengine.registry import init_default_scope

    from mlflow_model.checkpoints import check_state_dict

    init_default_scope(config.get("default_scope", "mmdet"))
    model = revert_sync_batchnorm(MODELS.build(config.model))
    check_state_dict(model, state_dict, "weights")
    model.load_state_dict(state_dict, strict=True)
    model.cfg = config
    model.dataset_meta = {"classes": tuple(class_names)}
    return model.to(device or default_device()).eval()


def save_model(
    path,
    config,
    checkpoint,
    classes: Sequence[str] | None = None,
    mlflow_model=None,
    signature=None,
    input_example: Any = None,
    pip_requirements: Sequence[str] | None = None,
    extra_pip_requirements: Sequence[str] | None = None,
    metadata: dict | None = None,
    batch_size: int = 8,
    **_ignored,
):
    """Save an RTMDet-Ins model as an MLflow model directory at ``path``.

    ``config``: a config name mmdet ships (``rtmdet-ins_x_8xb16-300e_coco``) or a config file.
    ``checkpoint``: a path, an http(s) URL or ``"official"`` (the published COCO weights,
    sha256-checked and cached). ``classes``: class names; by default those stored in the
    checkpoint, else COCO's when it has 80 classes. The weights must match the config exactly.
    """
    from mlflow.models import Model
    from mlflow.models.model import MLMODEL_FILE_NAME
    from mlflow.models.utils import _save_example
    from mlflow.utils.environment import _PythonEnv
    from mlflow.utils.model_utils import _validate_and_prepare_target_save_path
    import mlflow.pyfunc

    from mlflow_model.checkpoints import read_state_dict, resolve_checkpoint, write_weights, classes_from_meta
    from mlflow_model.configs import config_name, load_config
    from scoring.schema import TASK, PredictParams, mlflow_signature

    path = Path(path).resolve()
    checkpoint_path, source = resolve_checkpoint(checkpoint, config_name(config))
    state_dict, meta = read_state_dict(checkpoint_path)
    class_names = list(classes) if classes else classes_from_meta(meta)
    if class_names is None:
        class_names = _classes_for_count(_class_count(state_dict))
    cfg = load_config(config, num_classes=len(class_names))
    # Builds the model and refuses weights that do not fit it, before anything is written.
    build_detector(cfg, state_dict, class_names, device="cpu")

    _validate_and_prepare_target_save_path(str(path))
    data_dir = path / MODEL_DATA_DIR
    data_dir.mkdir(parents=True)
    cfg.dump(str(data_dir / CONFIG_FILE))
    write_weights(state_dict, data_dir / WEIGHTS_FILE)
    defaults = PredictParams.for_config(cfg.model.test_cfg)
    info = {
        "classes": class_names,
        "config_name": config_name(config),
        "checkpoint": source.as_dict(),
        "default_params": defaults.as_dict(),
        "batch_size": batch_size,
        "versions": _library_versions(),
    }
    (data_dir / MODEL_INFO_FILE).write_text(json.dumps(info, indent=2))
    _copy_code(path / CODE_DIR)

    mlflow_model = mlflow_model or Model()
    mlflow_model.signature = signature or mlflow_signature(defaults)
    if input_example is None:
        input_example = _default_input_example()
    _save_example(mlflow_model, input_example, str(path))
    mlflow.pyfunc.add_to_model(
        mlflow_model,
        loader_module="mlflow_model",
        data=MODEL_DATA_DIR,
        code=CODE_DIR,
        conda_env="conda.yaml",
        python_env="python_env.yaml",
    )
    mlflow_model.add_flavor(
        FLAVOR_NAME,
        config=f"{MODEL_DATA_DIR}/{CONFIG_FILE}",
        weights=f"{MODEL_DATA_DIR}/{WEIGHTS_FILE}",
        classes=class_names,
        config_name=info["config_name"],
        checkpoint=info["checkpoint"],
        **info["versions"],
    )
    mlflow_model.metadata = {"base_model_task": TASK, "config_name": info["config_name"],
                             "checkpoint_sha256": source.sha256, **(metadata or {})}
    mlflow_model.save(str(path / MLMODEL_FILE_NAME))

    requirements = list(pip_requirements or get_default_pip_requirements())
    requirements += list(extra_pip_requirements or [])
    (path / "requirements.txt").write_text("\n".join(requirements) + "\n")
    _PythonEnv(
        python=".".join(map(str, sys.version_info[:3])),
        build_dependencies=mmcv_build_requirements(),
        dependencies=["-r requirements.txt"],
    ).to_yaml(str(path / "python_env.yaml"))
    import yaml

    from mlflow.utils.environment import _mlflow_conda_env

    conda = _mlflow_conda_env(additional_pip_deps=mmcv_build_requirements()[1:] + requirements)
    (path / "conda.yaml").write_text(
        "# mmcv builds its compiled ops only when torch is already installed: prefer\n"
        "# `--env-manager virtualenv` (python_env.yaml installs torch first).\n"
        + yaml.safe_dump(conda, sort_keys=False))
    return mlflow_model


def log_model(config, checkpoint, name: str = "model", classes=None,
              registered_model_name: str | None = None, **kwargs):
    """Log to the active run (MLflow 3 style: ``name``; optional registration)."""
    from mlflow.models import Model

    return Model.log(
        artifact_path=None,
        name=name,
        flavor=sys.modules[__name__],
        registered_model_name=registered_model_name,
        config=config,
        checkpoint=checkpoint,
        classes=classes,
        **kwargs,
    )


def load_model(model_uri: str, device: str | None = None, dst_path: str | None = None):
    """The plain mmdet detector (eval mode) of a saved model: use it with mmdet's APIs."""
    from mlflow.tracking.artifact_utils import _download_artifact_from_uri

    local = Path(_download_artifact_from_uri(artifact_uri=model_uri, output_path=dst_path))
    return _load_detector(local / MODEL_DATA_DIR, device)[0]


def _load_detector(data_dir: Path, device: str | None = None):
    import torch
    from mmengine.config import Config

    info = json.loads((data_dir / MODEL_INFO_FILE).read_text())
    cfg = Config.fromfile(str(data_dir / CONFIG_FILE))
    state_dict = torch.load(data_dir / WEIGHTS_FILE, map_location="cpu", weights_only=True)
    return build_detector(cfg, state_dict, info["classes"], device), info


class MMDetPyfuncModel:
    """What ``mlflow.pyfunc.load_model`` wraps: DataFrame in, DataFrame out (scoring.frame).
    Bad input becomes an MlflowException with a 400 error code, so servers answer 4xx."""

    def __init__(self, segmenter):
        self.segmenter = segmenter

    def predict(self, model_input, params=None):
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

        from scoring.errors import InputError
        from scoring.frame import score_frame

        try:
            return score_frame(self.segmenter, model_input, params)
        except InputError as err:
            raise MlflowException(str(err), error_code=INVALID_PARAMETER_VALUE) from None


def load_segmenter(data_dir, device: str | None = None, batch_size: int | None = None):
    """The scoring.predictor.InstanceSegmenter of a saved model's data directory."""
    from scoring.predictor import InstanceSegmenter
    from scoring.schema import PredictParams

    detector, info = _load_detector(Path(data_dir), device)
    return InstanceSegmenter(detector, info["classes"],
                             PredictParams.from_dict(info["default_params"]),
                             batch_size=batch_size or forward_batch_size(info, detector))


def forward_batch_size(info: dict, detector) -> int:
    """Images per forward pass: MMDET_MLFLOW_BATCH_SIZE if set, else the model's (8) on a GPU,
    else 1. On CPU, batches of 8 ran 14-16 % slower per image than single passes for both
    tiny and x (bench/predict.py on 2 cores), while a GPU gains from batching."""
    if os.environ.get("MMDET_MLFLOW_BATCH_SIZE"):
        return int(os.environ["MMDET_MLFLOW_BATCH_SIZE"])
    on_gpu = detector.data_preprocessor.device.type == "cuda"
    return int(info.get("batch_size", 8)) if on_gpu else 1


def _load_pyfunc(path):
    """The pyfunc loader: ``path`` is the model's data directory."""
    return MMDetPyfuncModel(load_segmenter(path))


def _class_count(state_dict) -> int:
    key = next((k for k in state_dict if "rtm_cls" in k and k.endswith(".weight")), None)
    if key is None:
        from mlflow_model.checkpoints import CheckpointError

        raise CheckpointError("the checkpoint has no RTMDet-Ins classification head (rtm_cls)")
    return int(state_dict[key].shape[0])


def _classes_for_count(count: int) -> list[str]:
    if count == 80:
        from mmdet.evaluation import get_classes

        return list(get_classes("coco"))
    from mlflow_model.checkpoints import CheckpointError

    raise CheckpointError(f"the checkpoint has {count} classes and stores no class names: "
                          f"pass --classes with {count} names")


def _library_versions() -> dict:
    import mmcv
    import mmdet
    import mmengine
    import torch

    import mlflow

    return {"mmdet_version": mmdet.__version__, "mmcv_version": mmcv.__version__,
            "mmengine_version": mmengine.__version__, "torch_version": torch.__version__.split("+")[0],
            "mlflow_version": mlflow.__version__}


def _copy_code(dst: Path) -> None:
    root = Path(__file__).resolve().parent.parent
    for package in _PACKAGES:
        shutil.copytree(root / package, dst / package,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


def _default_input_example():
    """Two small PNGs as base64, the model card's two-image request."""
    import base64
    import io

    import numpy as np
    import pandas as pd
    from PIL import Image

    rng = np.random.default_rng(0)
    images = []
    for _ in range(2):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (32, 48, 3), dtype=np.uint8)).save(buf, "PNG")
        images.append(base64.b64encode(buf.getvalue()).decode())
    return pd.DataFrame({"image": images})
