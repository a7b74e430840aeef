"""The ``mmdet`` MLflow flavor: mmdet's detectors (object detection and instance segmentation,
``scoring.families``) as self-contained MLflow models.

Laid out like MLflow's own flavor modules (``mlflow.pytorch``): ``save_model``, ``log_model``,
``load_model`` (the mmdet detector) and ``_load_pyfunc``. A saved model's ``python_function``
flavor names ``scoring.pyfunc`` as its ``loader_module`` (nothing is pickled), and carries only
the serving core (``code/scoring``): this package, with the exporter, the quantizer and the
checkpoint downloader, is packaging code and stays out of it. ``scoring.model_dir`` owns the
folder layout; ``scoring.runtimes`` loads a saved model for inference.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from mlflow_model.environment import (get_default_conda_env, get_default_pip_requirements,  # noqa: F401
                                      mmcv_build_requirements, pinned_requirements, write_environment)
# Not bound as `model_dir`: importing the submodule mlflow_model.model_dir (tooling layouts) would
# rebind that name on this package.
from scoring import model_dir as layout
from scoring.errors import InputError, MmdetMlflowError
from scoring.model_dir import ModelDir

FLAVOR_NAME = "mmdet"
# mlflow.pyfunc.MODEL_CONFIG: the python_function entry's key for the recorded model_config (named
# here so that reading it needs no MLflow import; a test holds the two equal)
PYFUNC_MODEL_CONFIG_KEY = "config"


class SaveModelError(MmdetMlflowError, ValueError):
    """``save_model`` was asked for something it cannot make (an unknown runtime, int8 without
    calibration images, ...): said before anything is written."""

MODEL_DATA_DIR = layout.DATA_DIR  # the first release's public name of the weights folder
_PACKAGES = ("scoring",)  # what a saved model needs to load and score: the serving core only


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
    default_params: dict | None = None,
    model_config: dict | None = None,
):
    """Save an mmdet detector as an MLflow model directory at ``path``.

    ``config``: a config name mmdet ships (``rtmdet-ins_x_8xb16-300e_coco``,
    ``yolof_r50-c5_8xb8-1x_coco``, ...) or a config file; its family (``scoring.families``)
    decides the task (object detection or instance segmentation) and the runtimes it has.
    ``checkpoint``: a path, an http(s) URL or ``"official"`` (the published COCO weights,
    sha256-checked and cached). ``classes``: class names; by default those stored in the
    checkpoint, else COCO's when it has 80 classes. The weights must match the config exactly.
    ``runtime``: ``"torch"`` (mmdet on torch) or ``"onnx"``: the network exported to ONNX and
    checked against torch on sample images (refused beyond the tolerance), served by ONNX
    Runtime with numpy pre/post-processing; such a model needs none of torch, mmcv, mmdet,
    mmengine, and its requirements install from wheels. ``"openvino"``: the same exported graph
    served by OpenVINO Runtime (no onnxruntime either), in the precision chosen at load
    (MMDET_MLFLOW_PRECISION: bf16 where the CPU has it). ``quantize="int8"`` (ONNX only) adds a
    statically quantized network, calibrated on ``calibration_images`` (BGR arrays), and serves
    it (``mmdet-mlflow package`` then measures what int8 or bf16 costs against fp32:
    ``mmdet_mlflow.precision_check``; this function only saves). ``default_params``: predict
    params the model answers with unless a request says otherwise (as AutoML's model settings,
    e.g. ``{"tile_grid_size": "3x2"}``), over those of the config; recorded in model.json and as
    the signature's defaults. ``model_config``: the model's runtime options
    (``scoring.settings.MODEL_CONFIG_KEYS``, e.g. ``{"batch_size": 4}``), recorded in the
    MLmodel's ``python_function`` flavor; a key left out is recorded unset, so the environment
    variable or the built-in default applies, and ``mlflow.pyfunc.load_model(uri,
    model_config=...)`` overrides any of them.

    The steps: check the request, resolve and check the weights against the config (nothing
    is written before both pass), write the weights folder, export it (ONNX and OpenVINO),
    copy the serving code, write the MLmodel, write the environment.
    """
    from mlflow.utils.model_utils import _validate_and_prepare_target_save_path

    path = Path(path).resolve()
    family = _checked_request(config, runtime, quantize, calibration_images, default_params)
    recorded_config = _checked_model_config(model_config)
    built = _built_detector(config, checkpoint, classes, family)
    _validate_and_prepare_target_save_path(str(path))
    saved = ModelDir(path)
    defaults = family.default_params(built.cfg.model.test_cfg).updated(default_params)
    info = _write_weights_dir(saved.data, built, config, runtime, batch_size, defaults)
    if runtime in ("onnx", "openvino"):  # openvino serves the same exported graph
        _export_onnx(saved.data, built.detector, quantize, calibration_images, runtime, family)
    _copy_code(saved.code)
    mlflow_model = _write_mlmodel(saved, info, defaults, mlflow_model, signature, input_example,
                                  metadata, recorded_config)
    requirements = list(pip_requirements or get_default_pip_requirements(runtime))
    requirements += list(extra_pip_requirements or [])
    write_environment(path, requirements, runtime)
    return mlflow_model


def _checked_request(config, runtime: str, quantize: str | None, calibration_images,
                     default_params: dict | None):
    """The config's family, once the runtime, the quantization and the default params are
    known to be ones it can save: refused before any download or build."""
    from mlflow_model.configs import load_config
    from scoring.families import UnknownModel, family_of_config
    from scoring.runtimes import RUNTIMES

    if quantize and not calibration_images:
        raise SaveModelError("quantize='int8' needs calibration images")
    if runtime not in RUNTIMES:
        raise SaveModelError(f"runtime must be one of {', '.join(RUNTIMES)}, not {runtime!r}")
    if quantize not in (None, "int8"):
        raise SaveModelError(f"quantize must be 'int8' or None, not {quantize!r}")
    if quantize and runtime != "onnx":
        raise SaveModelError("quantize='int8' needs runtime='onnx'")
    family = family_of_config(load_config(config).model)
    try:
        family.check_runtime(runtime)  # a runtime the family lacks: refused before any download
        family.default_params({}).updated(default_params)  # a bad value: refused before the work
    except UnknownModel as err:
        raise SaveModelError(str(err)) from None
    except InputError as err:
        raise SaveModelError(f"default_params: {err}") from None
    return family


def _checked_model_config(model_config: dict | None) -> dict:
    """What the MLmodel records as the model's model_config (every key; see
    ``scoring.settings.recorded_config``); an unknown key or a bad value is refused."""
    from scoring.settings import SettingError, recorded_config

    try:
        return recorded_config(model_config)
    except SettingError as err:
        raise SaveModelError(str(err)) from None


@dataclass
class _Built:
    """The checked weights: the config (for its number of classes), the state dict, the class
    names, where the weights came from, and the detector built from them."""

    family: Any
    cfg: Any
    state_dict: dict
    class_names: list
    source: Any
    detector: Any


def _built_detector(config, checkpoint, classes, family) -> _Built:
    """Resolve the checkpoint (download, sha256), name the classes, and build the detector:
    weights that do not fit the config are refused here, before anything is written."""
    from mlflow_model.checkpoints import classes_from_meta, resolve_checkpoint
    from mlflow_model.configs import config_name, load_config
    from scoring.runtimes.torch_mmdet import build_detector
    from scoring.weights import read_state_dict

    checkpoint_path, source = resolve_checkpoint(checkpoint, config_name(config))
    state_dict, meta = read_state_dict(checkpoint_path)
    class_names = list(classes) if classes else classes_from_meta(meta)
    if class_names is None:
        class_names = _classes_for_count(_class_count(state_dict, load_config(config).model, family))
    cfg = load_config(config, num_classes=len(class_names))
    detector = build_detector(cfg, state_dict, class_names, device="cpu")
    return _Built(family, cfg, state_dict, class_names, source, detector)


def _write_weights_dir(weights_dir, built: _Built, config, runtime: str, batch_size: int,
                       defaults) -> dict:
    """The weights folder: the flattened config, the weights, and model.json, the one record
    of what the model is (family, task, runtime, classes, provenance, defaults, versions)."""
    from mlflow_model.checkpoints import write_weights
    from mlflow_model.configs import config_name

    weights_dir.path.mkdir(parents=True)
    built.cfg.dump(str(weights_dir.config))
    write_weights(built.state_dict, weights_dir.weights)
    info = {
        "family": built.family.name,
        "task": built.family.task,
        "runtime": runtime,
        "classes": built.class_names,
        "config_name": config_name(config),
        "checkpoint": built.source.as_dict(),
        "default_params": defaults.as_dict(),
        "batch_size": batch_size,
        "versions": _library_versions(),
    }
    weights_dir.write_info(info)
    return info


def _write_mlmodel(saved: ModelDir, info: dict, defaults, mlflow_model, signature, input_example,
                   metadata: dict | None, model_config: dict):
    """The MLmodel: the signature and input example, the ``python_function`` flavor (our
    loader module, the model's recorded model_config) and the ``mmdet`` flavor, which points at
    the files (model.json alone says what the model is: ``scoring.model_dir``)."""
    from mlflow.models import Model
    from mlflow.models.utils import _save_example
    import mlflow.pyfunc

    from scoring.schema import AZURE_TASKS, mlflow_signature

    task = info["task"]
    mlflow_model = mlflow_model or Model()
    mlflow_model.signature = signature or mlflow_signature(defaults, info["classes"], task)
    if input_example is None:
        input_example = _default_input_example()
    _save_example(mlflow_model, input_example, str(saved.path))
    mlflow.pyfunc.add_to_model(
        mlflow_model,
        loader_module="scoring.pyfunc",
        data=layout.DATA_DIR,
        code=layout.CODE_DIR,
        conda_env=layout.CONDA_FILE,
        python_env=layout.PYTHON_ENV_FILE,
        model_config=model_config,
    )
    weights = layout.WEIGHTS_FILE if info["runtime"] == "torch" else layout.ONNX_FILE
    mlflow_model.add_flavor(FLAVOR_NAME, config=f"{layout.DATA_DIR}/{layout.CONFIG_FILE}",
                            weights=f"{layout.DATA_DIR}/{weights}",
                            info=f"{layout.DATA_DIR}/{layout.INFO_FILE}")
    # Azure ML's name of the task (its catalog and AutoML read it); derived from model.json's
    # task, never read back by us.
    mlflow_model.metadata = {"base_model_task": AZURE_TASKS[task], **(metadata or {})}
    mlflow_model.save(str(saved.mlmodel))
    return mlflow_model


def _export_onnx(weights_dir, detector, quantize: str | None, calibration_images,
                 runtime: str, family) -> None:
    """Export to ONNX with the family's exporter (checked against torch; for the openvino
    runtime on OpenVINO at fp32 as well), optionally add int8, then drop the torch weights: an
    ONNX or OpenVINO model serves from model.onnx alone (config.py stays, for provenance)."""
    import importlib

    from mlflow_model.onnx_export import add_int8_to_weights_dir, check_openvino_against_torch

    module, function = family.exporter(runtime).split(":")
    export = getattr(importlib.import_module(module), function)
    spec = export(weights_dir.path, detector=detector)
    print(f"exported to ONNX; max |onnx - torch| on the raw outputs of sample images: "
          f"{spec['files'][layout.ONNX_FILE]['max_abs_diff_vs_torch']:.2e}", flush=True)
    if runtime == "openvino":
        worst = check_openvino_against_torch(weights_dir.path, detector)
        print(f"max |openvino fp32 - torch| on them: {worst:.2e}", flush=True)
    if quantize == "int8":
        record = add_int8_to_weights_dir(weights_dir.path, list(calibration_images))
        info = weights_dir.read_info()
        info[layout.ONNX_INFO_KEY]["serve"] = layout.ONNX_INT8_FILE
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
    model: its runtime object (``scoring.runtimes.onnx_rtmdet.OnnxPredictor``: call it on BGR
    arrays, or use its ``session``, an ``onnxruntime.InferenceSession``), since it carries no
    torch weights and needs no torch."""
    from mlflow.tracking.artifact_utils import _download_artifact_from_uri

    from scoring.runtimes import runtime_of

    local = Path(_download_artifact_from_uri(artifact_uri=model_uri, output_path=dst_path))
    weights = ModelDir(local).data
    if runtime_of(weights.read_info()) in ("onnx", "openvino"):
        return load_predictor(weights.path, device=device)
    from scoring.runtimes.torch_mmdet import load_detector

    return load_detector(weights, device)[0]


def load_predictor(data_dir, device: str | None = None, batch_size: int | None = None,
                   model_config: dict | None = None):
    """The predictor (``scoring.runtimes``) of a saved model's ``model/`` folder, with the
    model_config ``model_config`` (``scoring.settings``)."""
    from scoring.runtimes import load_predictor as load

    return load(data_dir, device=device, batch_size=batch_size, model_config=model_config)


def load_saved_predictor(model_dir, device: str | None = None, batch_size: int | None = None):
    """The predictor of a saved model folder with the model_config ``mlflow.pyfunc.load_model``
    would give it (``model_config_at_load``): our own commands (predict, batch, evaluate) load a
    model as its servers do."""
    return load_predictor(ModelDir(model_dir).data.path, device, batch_size,
                          model_config_at_load(model_dir))


def checked_predict_params(model_dir, params: dict | None):
    """The predict params a saved model scores with by default (its model.json's defaults)
    updated with ``params``, refused from model.json alone, before any network loads (seconds):
    a bad value, mask params of an object-detection model (naming its task), a class the model
    does not have. None for a folder without model.json: its loader says what it lacks."""
    from scoring.class_filter import check_classes
    from scoring.families import family_of
    from scoring.schema import PredictParams, check_task_params

    weights = ModelDir(model_dir).data
    if not weights.info_file.is_file():
        return None
    info = weights.read_info()
    check_task_params(family_of(info).task, params)
    checked = PredictParams.from_dict(info.get("default_params") or {}).updated(params)
    if info.get("classes"):
        check_classes(info["classes"], checked)
    return checked


def model_config_at_load(model_dir) -> dict:
    """What MLflow hands a saved model's loader as its model_config when none is passed: what the
    MLmodel records, under MLflow's ``MLFLOW_PYFUNC_INFERENCE_CONFIG`` (JSON) for the keys the
    MLmodel records, as MLflow's merge does. {} for a model that records none (saved before
    models recorded one: the environment variables then apply)."""
    import yaml  # the MLmodel is YAML: read without importing MLflow, seconds our commands need not spend

    mlmodel = ModelDir(model_dir).mlmodel
    mlmodel_fields = (yaml.safe_load(mlmodel.read_text()) or {}) if mlmodel.is_file() else {}
    flavors = mlmodel_fields.get("flavors") or {}
    recorded = dict((flavors.get("python_function") or {}).get(PYFUNC_MODEL_CONFIG_KEY) or {})
    overrides = json.loads(os.environ.get("MLFLOW_PYFUNC_INFERENCE_CONFIG") or "{}")
    return {**recorded, **{key: value for key, value in overrides.items() if key in recorded}}


def _load_pyfunc(path, model_config: dict | None = None):
    """MLflow's flavor-module hook; our saved models name ``scoring.pyfunc`` as their
    ``loader_module`` (the code a model carries), which this calls."""
    from scoring.pyfunc import _load_pyfunc as load

    return load(path, model_config)


def _class_count(state_dict, model_cfg, family) -> int:
    from scoring.runtimes.torch_mmdet import count_classes

    count = count_classes(state_dict, model_cfg, family)
    if count is None:
        from mlflow_model.checkpoints import CheckpointError

        raise CheckpointError(f"the checkpoint has no {family.title} classification layer: it is "
                              f"not a {family.title} checkpoint, or pass --classes")
    return count


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
