"""The ``mmdet`` MLflow flavor: RTMDet-Ins instance segmentation as a self-contained MLflow model.

Laid out like MLflow's own flavor modules (``mlflow.pytorch``): ``save_model``, ``log_model``,
``load_model`` (the mmdet detector) and ``_load_pyfunc`` (the ``python_function`` flavor, through
this module as ``loader_module``: nothing is pickled). ``mlflow_model.model_dir`` owns the
folder layout; ``scoring.runtimes`` loads a saved model for inference.
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any, Sequence

from mlflow_model import model_dir, serving_guards
from mlflow_model.environment import (get_default_conda_env, get_default_pip_requirements,  # noqa: F401
                                      mmcv_build_requirements, pinned_requirements, write_environment)
from mlflow_model.model_dir import ModelDir

FLAVOR_NAME = "mmdet"
# Kept for callers of the first release; the names live in mlflow_model.model_dir.
MODEL_DATA_DIR = model_dir.DATA_DIR
CONFIG_FILE = model_dir.CONFIG_FILE
WEIGHTS_FILE = model_dir.WEIGHTS_FILE
MODEL_INFO_FILE = model_dir.INFO_FILE
CODE_DIR = model_dir.CODE_DIR
_PACKAGES = ("mlflow_model", "scoring")  # what a saved model needs to load and score
RUNTIMES = ("torch", "onnx")


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
    runtime: str = "torch",
    quantize: str | None = None,
    calibration_images=None,
):
    """Save an RTMDet-Ins model as an MLflow model directory at ``path``.

    ``config``: a config name mmdet ships (``rtmdet-ins_x_8xb16-300e_coco``) or a config file.
    ``checkpoint``: a path, an http(s) URL or ``"official"`` (the published COCO weights,
    sha256-checked and cached). ``classes``: class names; by default those stored in the
    checkpoint, else COCO's when it has 80 classes. The weights must match the config exactly.
    ``runtime``: ``"torch"`` (mmdet on torch) or ``"onnx"``: the network exported to ONNX and
    checked against torch on sample images (refused beyond the tolerance), served by ONNX
    Runtime with numpy pre/post-processing; such a model needs none of torch, mmcv, mmdet,
    mmengine, and its requirements install from wheels. ``quantize="int8"`` (ONNX only) adds a
    statically quantized network, calibrated on ``calibration_images`` (BGR arrays), and serves
    it; its speed and agreement with fp32 are measured and printed.
    """
    from mlflow.models import Model
    from mlflow.models.utils import _save_example
    from mlflow.utils.model_utils import _validate_and_prepare_target_save_path
    import mlflow.pyfunc

    from mlflow_model.checkpoints import read_state_dict, resolve_checkpoint, write_weights, classes_from_meta
    from mlflow_model.configs import config_name, load_config
    from scoring.runtimes.torch_rtmdet import build_detector
    from scoring.schema import TASK, PredictParams, mlflow_signature

    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)}, not {runtime!r}")
    if quantize not in (None, "int8"):
        raise ValueError(f"quantize must be 'int8' or None, not {quantize!r}")
    if quantize and runtime != "onnx":
        raise ValueError("quantize='int8' needs runtime='onnx'")
    path = Path(path).resolve()
    checkpoint_path, source = resolve_checkpoint(checkpoint, config_name(config))
    state_dict, meta = read_state_dict(checkpoint_path)
    class_names = list(classes) if classes else classes_from_meta(meta)
    if class_names is None:
        class_names = _classes_for_count(_class_count(state_dict))
    cfg = load_config(config, num_classes=len(class_names))
    # Builds the model and refuses weights that do not fit it, before anything is written.
    detector = build_detector(cfg, state_dict, class_names, device="cpu")

    _validate_and_prepare_target_save_path(str(path))
    saved = ModelDir(path)
    weights_dir = saved.data
    weights_dir.path.mkdir(parents=True)
    cfg.dump(str(weights_dir.config))
    write_weights(state_dict, weights_dir.weights)
    defaults = PredictParams.for_config(cfg.model.test_cfg)
    info = {
        "runtime": runtime,
        "classes": class_names,
        "config_name": config_name(config),
        "checkpoint": source.as_dict(),
        "default_params": defaults.as_dict(),
        "batch_size": batch_size,
        "versions": _library_versions(),
    }
    weights_dir.write_info(info)
    if runtime == "onnx":
        _export_onnx(weights_dir, detector, quantize, calibration_images)
    _copy_code(saved.code)

    mlflow_model = mlflow_model or Model()
    mlflow_model.signature = signature or mlflow_signature(defaults)
    if input_example is None:
        input_example = _default_input_example()
    _save_example(mlflow_model, input_example, str(path))
    mlflow.pyfunc.add_to_model(
        mlflow_model,
        loader_module="mlflow_model",
        data=model_dir.DATA_DIR,
        code=model_dir.CODE_DIR,
        conda_env=model_dir.CONDA_FILE,
        python_env=model_dir.PYTHON_ENV_FILE,
    )
    mlflow_model.add_flavor(
        FLAVOR_NAME,
        config=f"{model_dir.DATA_DIR}/{model_dir.CONFIG_FILE}",
        weights=f"{model_dir.DATA_DIR}/"
                + (model_dir.WEIGHTS_FILE if runtime == "torch" else model_dir.ONNX_FILE),
        runtime=runtime,
        classes=class_names,
        config_name=info["config_name"],
        checkpoint=info["checkpoint"],
        **info["versions"],
    )
    mlflow_model.metadata = {"base_model_task": TASK, "config_name": info["config_name"],
                             "checkpoint_sha256": source.sha256, **(metadata or {})}
    mlflow_model.save(str(saved.mlmodel))

    requirements = list(pip_requirements or get_default_pip_requirements(runtime))
    requirements += list(extra_pip_requirements or [])
    write_environment(path, requirements, runtime)
    return mlflow_model


def _export_onnx(weights_dir, detector, quantize: str | None, calibration_images) -> None:
    """Export to ONNX (checked against torch), optionally add int8, then drop the torch weights:
    an ONNX model serves from model.onnx alone (config.py stays, for provenance)."""
    from mlflow_model.onnx_export import add_int8_to_weights_dir, export_to_weights_dir

    spec = export_to_weights_dir(weights_dir.path, detector=detector)
    print(f"exported to ONNX; max |onnx - torch| on the raw outputs of sample images: "
          f"{spec['files'][model_dir.ONNX_FILE]['max_abs_diff_vs_torch']:.2e}", flush=True)
    if quantize == "int8":
        if not calibration_images:
            raise ValueError("quantize='int8' needs calibration images")
        record = add_int8_to_weights_dir(weights_dir.path, list(calibration_images))
        info = weights_dir.read_info()
        info[model_dir.ONNX_INFO_KEY]["serve"] = model_dir.ONNX_INT8_FILE
        weights_dir.write_info(info)
        print(f"quantized to int8 on {len(calibration_images)} calibration images: "
              f"{json.dumps({k: v for k, v in record.items() if k != 'sha256'})}", flush=True)
    weights_dir.weights.unlink()


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
    """A torch model: the plain mmdet detector (eval mode), to use with mmdet's APIs. An ONNX
    model: its runtime object (``scoring.runtimes.onnx_rtmdet.OnnxSegmenter``: call it on BGR
    arrays, or use its ``session``, an ``onnxruntime.InferenceSession``), since it carries no
    torch weights and needs no torch."""
    from mlflow.tracking.artifact_utils import _download_artifact_from_uri

    from scoring.runtimes import runtime_of

    local = Path(_download_artifact_from_uri(artifact_uri=model_uri, output_path=dst_path))
    weights = ModelDir(local).data
    if runtime_of(weights.read_info()) == "onnx":
        return load_segmenter(weights.path, device=device)
    from scoring.runtimes.torch_rtmdet import load_detector

    return load_detector(weights, device)[0]


class MMDetPyfuncModel:
    """What ``mlflow.pyfunc.load_model`` wraps: DataFrame in, DataFrame out (scoring.frame).
    Bad input becomes an MlflowException with a 400 error code, so servers answer 4xx; anything
    else is our bug: logged with its traceback, answered 500 without one (MLflow's server would
    otherwise put the traceback in the response body)."""

    def __init__(self, segmenter):
        self.segmenter = segmenter

    def get_raw_model(self):
        """The segmenter (``scoring.runtimes``): what ``PyFuncModel.get_raw_model()`` returns,
        so batch scoring can drive the runner directly."""
        return self.segmenter

    def predict(self, model_input, params=None):
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

        from scoring.errors import InputError
        from scoring.frame import score_frame

        try:
            return score_frame(self.segmenter, model_input, params)
        except InputError as err:
            raise MlflowException(str(err), error_code=INVALID_PARAMETER_VALUE) from None
        except Exception as err:
            import logging

            from mlflow.protos.databricks_pb2 import INTERNAL_ERROR

            logging.getLogger("mmdet_mlflow").exception("prediction failed")
            raise MlflowException(f"prediction failed: {type(err).__name__} (see the server log)",
                                  error_code=INTERNAL_ERROR) from None


def load_segmenter(data_dir, device: str | None = None, batch_size: int | None = None):
    """The segmenter (``scoring.runtimes``) of a saved model's ``model/`` folder."""
    from scoring.runtimes import load_segmenter as load

    return load(data_dir, device=device, batch_size=batch_size)


def _load_pyfunc(path):
    """The pyfunc loader: ``path`` is the model's data directory.

    The model last loaded in this process is kept and handed out again when the same folder,
    unchanged, is loaded with the same settings: ``mlflow.pyfunc.spark_udf`` (local mode) calls
    ``load_model`` for every Spark task, and a Python worker runs many tasks, so without this
    each task paid the model's load (seconds for torch) and a worker's memory held one copy per
    task until collected. One model at most is kept (a worker serves one UDF's model)."""
    serving_guards.install()
    key = _loaded_key(path)
    model = _LAST_LOADED.get(key)
    if model is None:
        model = MMDetPyfuncModel(load_segmenter(path))
        _LAST_LOADED.clear()
        _LAST_LOADED[key] = model
        _LOAD_COUNT[0] += 1
    return model


_LAST_LOADED: dict = {}
_LOAD_COUNT = [0]


def pyfunc_load_count() -> int:
    """How many times this process has loaded a model for ``_load_pyfunc`` (not counting the
    times it handed out the one it kept): what tells that a Spark worker loaded it once."""
    return _LOAD_COUNT[0]


def _loaded_key(path) -> tuple:
    """What decides that a kept model is still the one ``path`` would load: the folder, each of
    its files' size and modification time, and the MMDET_MLFLOW_ settings (batch size, threads
    and the like are read when a model loads)."""
    import os

    folder = Path(path).resolve()
    files = tuple(sorted((str(f.relative_to(folder)), f.stat().st_size, f.stat().st_mtime_ns)
                         for f in folder.rglob("*") if f.is_file()))
    settings = tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("MMDET_MLFLOW_")))
    return str(folder), files, settings


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
