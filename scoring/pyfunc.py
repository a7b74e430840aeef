"""The ``python_function`` flavor of our models: the MLmodel names this module as its
``loader_module`` (nothing is pickled), and ``_load_pyfunc`` returns the object MLflow's
``PyFuncModel`` wraps. It ships in every saved model's ``code/scoring``, as the rest of the core.
"""
from __future__ import annotations

from pathlib import Path

from scoring import serving_guards
from scoring.runtimes import load_predictor
from scoring.settings import ModelConfig


class MMDetPyfuncModel:
    """What ``mlflow.pyfunc.load_model`` wraps: DataFrame in, DataFrame out (scoring.frame).
    Bad input becomes an MlflowException with a 400 error code, so servers answer 4xx; anything
    else is our bug: logged with its traceback, answered 500 without one (MLflow's server would
    otherwise put the traceback in the response body)."""

    def __init__(self, predictor):
        self.predictor = predictor

    def get_raw_model(self):
        """The predictor (``scoring.runtimes``): what ``PyFuncModel.get_raw_model()`` returns,
        so batch scoring can drive the runner directly."""
        return self.predictor

    def predict(self, model_input, params=None):
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

        from scoring.errors import InputError
        from scoring.frame import score_frame

        try:
            return score_frame(self.predictor, model_input, params)
        except InputError as err:
            raise MlflowException(str(err), error_code=INVALID_PARAMETER_VALUE) from None
        except Exception as err:
            import logging

            from mlflow.protos.databricks_pb2 import INTERNAL_ERROR

            logging.getLogger("mmdet_mlflow").exception("prediction failed")
            raise MlflowException(f"prediction failed: {type(err).__name__} (see the server log)",
                                  error_code=INTERNAL_ERROR) from None


def _load_pyfunc(path, model_config=None):
    """The pyfunc loader (the MLmodel's ``loader_module``): ``path`` is the model's data directory,
    ``model_config`` the model's options (``scoring.settings``: what ``mlflow.pyfunc.load_model``
    or ``spark_udf`` passed, over what the MLmodel records; an unknown key is refused, naming
    the known ones).

    The model last loaded in this process is kept and handed out again when the same folder,
    unchanged, is loaded with the same settings: ``mlflow.pyfunc.spark_udf`` (local mode) calls
    ``load_model`` for every Spark task, and a Python worker runs many tasks, so without this
    each task paid the model's load (seconds for torch) and a worker's memory held one copy per
    task until collected. One model at most is kept (a worker serves one UDF's model)."""
    serving_guards.install()
    return kept_model(path, model_config)


def kept_model(path, model_config=None) -> MMDetPyfuncModel:
    """The model of the data directory ``path``: the one kept by the last load when it is the
    same, else loaded and kept (see ``_load_pyfunc``). Without MLflow's serving guards: what
    code that scores through the runner itself, such as a Spark job's Python workers, loads
    (the guards import MLflow, a second of a worker's start)."""
    config = ModelConfig(model_config)  # an unknown key or a bad value: refused before loading
    key = _loaded_key(path, config)
    model = _LAST_LOADED.get(key)
    if model is None:
        model = MMDetPyfuncModel(load_predictor(path, model_config=config))
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


def _loaded_key(path, config: ModelConfig) -> tuple:
    """What decides that a kept model is still the one ``path`` would load: the folder, each of
    its files' size and modification time, its model_config and the MMDET_MLFLOW_ settings
    (batch size, threads and the like are read when a model loads)."""
    import os

    folder = Path(path).resolve()
    files = tuple(sorted((str(f.relative_to(folder)), f.stat().st_size, f.stat().st_mtime_ns)
                         for f in folder.rglob("*") if f.is_file()))
    settings = tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("MMDET_MLFLOW_")))
    return str(folder), files, config, settings
