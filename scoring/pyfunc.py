"""The ``python_function`` flavor of our models: the MLmodel names this module as its
``loader_module`` (nothing is pickled), and ``_load_pyfunc`` returns the object MLflow's
``PyFuncModel`` wraps. It ships in every saved model's ``code/scoring``, as the rest of the core.
"""
from __future__ import annotations

from scoring import serving_guards
from scoring.runtimes import load_segmenter


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


def _load_pyfunc(path):
    """The pyfunc loader (the MLmodel's ``loader_module``): ``path`` is the model's data directory."""
    serving_guards.install()
    return MMDetPyfuncModel(load_segmenter(path))
