"""Azure ML batch endpoint scoring script: ``init()`` once, ``run(mini_batch)`` per mini-batch
of file paths (Azure's driver passes them). Thin over ``scoring.batch_files`` and the one runner.

Each returned element is one CSV record ``row,prediction,file,error`` (see
``scoring.batch_files.COLUMNS``): Azure's driver (output_action ``append_row``) writes each
returned element as one line of ``predictions.csv``, so the file is valid CSV (a returned
DataFrame would be written with the driver's own separator, which breaks on the commas and
quotes in the prediction JSON). ``prediction`` is the online response's entry for that image
(``{"boxes": [...]}``). A file or row that cannot be scored gets a record with ``error`` set
instead of failing the mini-batch. Read the output with
``pandas.read_csv("predictions.csv", names=COLUMNS)``.

Settings (environment variables, set on the deployment): ``MMDET_MLFLOW_BATCH_PARAMS`` (a JSON
object of predict params), ``MMDET_MLFLOW_BATCH_INPUT_ROOT`` (name files relative to it); the
model's options as score.py takes them (``MLFLOW_PYFUNC_INFERENCE_CONFIG``, e.g.
``{"batch_size": 4}``, over the MLmodel's model_config, then ``MMDET_MLFLOW_BATCH_SIZE`` and
the other variables: ``scoring.settings``).
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

_state: dict = {}


def init(model_dir: str | None = None, params: dict | None = None, input_root: str | None = None,
         model_config: dict | None = None):
    """Load the model (as score.py does: found under AZUREML_MODEL_DIR unless ``model_dir`` is
    given, with ``model_config``) and check the predict params before any file is read."""
    online = _online_script()
    online.init(model_dir, model_config)
    from scoring import settings  # importable now: the model's code/ is on sys.path
    from scoring.class_filter import check_classes
    from scoring.runner import predict_params

    predictor = online.model.get_raw_model()
    if params is None:
        params = settings.BATCH_PARAMS.value()
    params = predict_params(predictor, params)  # a bad param, or one for masks of a box-only model, fails init
    check_classes(predictor.class_names, params)  # so does a class the model does not have
    _state.update(predictor=predictor, params=params,
                  input_root=input_root or settings.BATCH_INPUT_ROOT.value())


def run(mini_batch) -> list[str]:
    """One CSV record per image of every file in ``mini_batch`` (see the module docstring)."""
    from scoring.batch_files import format_record

    return [format_record(record) for record in score_files(mini_batch)]


def score_files(paths) -> list[dict]:
    """Records ``{"row", "prediction", "file", "error"}`` for every image in ``paths``, in order."""
    from scoring import batch_files

    if "predictor" not in _state:
        raise RuntimeError("init() has not loaded the model")
    return batch_files.score_files(_state["predictor"], paths, _state["params"], _file_name)


def _file_name(path: str) -> str:
    from scoring.batch_files import file_name

    return file_name(path, _state.get("input_root"))


def _online_script():
    """score.py from beside this file (Azure uploads both scripts in one code folder and may not
    put it on sys.path): one way to find and load the model for both endpoints."""
    name = "mmdet_mlflow_online_score"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name("score.py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules[name] = module
    return sys.modules[name]
