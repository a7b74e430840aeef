"""Where MLflow's own serving would answer our users badly, and no hook exists, these wrap one
MLflow function each, for our models only, when a model of ours is loaded (``install``):

- ``refuse_unknown_params``: MLflow drops params the signature does not declare (a typo such as
  ``score_thresold`` silently meant the defaults): refused with a 400 naming the known ones;
- ``refuse_unparseable_json``: JSON nested deeper than the recursion limit, or an integer too long
  to convert, made ``mlflow models serve`` answer 500: a 400 now.

Each wrap checks that the function it wraps exists; the tests that send those requests say so if
a later MLflow moves it.
"""
from __future__ import annotations

import sys

LOADER_MODULE = "mlflow_model"  # the pyfunc loader_module of our models


def install() -> None:
    refuse_unknown_params()
    refuse_unparseable_json()


def refuse_unparseable_json() -> None:
    """Under ``mlflow models serve``: make the scoring server answer 400, not 500, for a body
    its JSON parser raises on with other than JSONDecodeError: JSON nested deeper than
    Python's recursion limit (RecursionError: ``[[[[...]]]]`` of 100000 levels, even inside
    ``data`` or ``params``) and integers longer than Python converts (ValueError: a 5000-digit
    number). Those errors left the server as a 500 before our model saw the request. The
    server module is wrapped only where it is already running (it loads the model after its
    import); if a later MLflow renames the function, nothing is wrapped and
    tests/test_hostile.py's deep-JSON cases say so."""
    server = sys.modules.get("mlflow.pyfunc.scoring_server")
    original = getattr(server, "_decode_json_input", None)
    if original is None or getattr(original, "refuses_unparseable_json", False):
        return
    from mlflow.exceptions import MlflowException

    def decode(json_input):
        try:
            return original(json_input)
        except RecursionError:
            raise MlflowException.invalid_parameter_value("the request body is JSON nested too deeply") from None
        except ValueError as err:
            if isinstance(err, MlflowException):
                raise
            raise MlflowException.invalid_parameter_value(f"the request body is not valid JSON ({err})") from None

    decode.refuses_unparseable_json = True
    server._decode_json_input = decode


def refuse_unknown_params() -> None:
    """Make ``PyFuncModel.predict`` refuse, for our models only, params the signature does not
    declare. MLflow drops them with a log warning before our predict sees them, so a request
    with ``{"score_thresold": 0.9}`` (a typo) silently got the defaults; a user must get a 400
    that names the known params instead. MLflow offers no hook for this, so the check wraps
    ``mlflow.pyfunc._validate_prediction_input``, which ``predict`` calls with the model's
    loader module; if a later MLflow moves it, nothing is wrapped and
    tests/test_serve.py's unknown-param test says so."""
    import mlflow.pyfunc as pyfunc
    from mlflow.exceptions import MlflowException

    original = getattr(pyfunc, "_validate_prediction_input", None)
    if original is None or getattr(original, "refuses_unknown_params", False):
        return

    def validate(data, params, input_schema, params_schema, flavor=None, *args, **kwargs):
        if flavor == LOADER_MODULE and isinstance(params, dict) and params_schema is not None:
            known = [spec.name for spec in params_schema.params]
            unknown = [name for name in params if name not in known]
            if unknown:
                raise MlflowException.invalid_parameter_value(
                    f"unknown param{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
                    f"known params: {', '.join(known)}")
        return original(data, params, input_schema, params_schema, flavor, *args, **kwargs)

    validate.refuses_unknown_params = True
    pyfunc._validate_prediction_input = validate
