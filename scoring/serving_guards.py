"""Where MLflow's own serving would answer our users badly, and no hook exists, these wrap one
MLflow function each, for our models only, when a model of ours is loaded (``install``):

- ``refuse_unknown_params``: MLflow drops params the signature does not declare (a typo such as
  ``score_thresold`` silently meant the defaults): refused with a 400 naming the known ones; the
  same wrap turns ``classes="a,b"`` into the list the signature declares;
- ``refuse_unparseable_json``: JSON nested deeper than the recursion limit, or an integer too long
  to convert, made ``mlflow models serve`` answer 500: a 400 now;
- ``limit_request_bodies``: ``mlflow models serve`` read a body of any size into memory: one over
  ``MMDET_MLFLOW_MAX_REQUEST_BYTES`` (the Azure scoring script's limit) is refused with a 413.

Each wrap checks that the function it wraps exists; the tests that send those requests say so if
a later MLflow moves it.
"""
from __future__ import annotations

import functools
import json
import sys

LOADER_MODULE = "scoring.pyfunc"  # the pyfunc loader_module of our models


def install() -> None:
    refuse_unknown_params()
    refuse_unparseable_json()
    limit_request_bodies()


def limit_request_bodies() -> None:
    """Under ``mlflow models serve``: bound the memory one request body can take. MLflow's
    invocations handler reads the whole body (``await request.body()``) before anything of ours
    runs. ``scoring_server/app.py`` builds the app after loading the model, but looks up
    ``init`` before that, so the hook is the decorator ``init`` applies to that one handler,
    ``_async_catch_mlflow_exception``, which ``init`` looks up when it runs: wrapped, it puts
    ``read_body_within_limit`` in front of the handler. If a later MLflow renames it, nothing is
    wrapped and tests/test_hostile.py's oversized cases say so."""
    server = sys.modules.get("mlflow.pyfunc.scoring_server")
    original = getattr(server, "_async_catch_mlflow_exception", None)
    if original is None or getattr(original, "limits_request_bodies", False):
        return

    def catch(handler):
        @functools.wraps(handler)  # FastAPI reads the handler's parameters through __wrapped__
        async def limited(*args, **kwargs):
            request = kwargs.get("request", args[0] if args else None)
            refusal = await read_body_within_limit(request)
            return refusal if refusal is not None else await handler(*args, **kwargs)

        return original(limited)

    catch.limits_request_bodies = True
    server._async_catch_mlflow_exception = catch


async def read_body_within_limit(request):
    """Read a Starlette request's body, refusing it (a 413 response, MLflow's error shape) when
    its declared length is over ``MMDET_MLFLOW_MAX_REQUEST_BYTES`` before reading anything, and
    when it declares none (chunked) as soon as what arrived passes the limit. A body within the
    limit is kept where ``request.body()`` returns it from, so the handler reads it as before."""
    from fastapi.responses import Response

    from scoring.limits import max_request_bytes, too_large

    def refuse(error):
        content = json.dumps({"error_code": "BAD_REQUEST", "message": str(error)})
        return Response(content=content, status_code=error.status, media_type="application/json")

    limit = max_request_bytes()
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        return refuse(too_large(int(declared)))
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return refuse(too_large(None))
        chunks.append(chunk)
    request._body = b"".join(chunks)  # where Starlette's Request.body() keeps what it read
    return None


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
            if "classes" in params and "classes" in known:
                params = {**params, "classes": _class_names(params["classes"])}
        return original(data, params, input_schema, params_schema, flavor, *args, **kwargs)

    validate.refuses_unknown_params = True
    pyfunc._validate_prediction_input = validate


def _class_names(value) -> list:
    """The ``classes`` param as the list of strings the signature declares (shape (-1,)), before
    MLflow checks it: its comma-separated form made a list, and a value that is neither refused
    with our message (MLflow's own check raises a plain ValueError, not its 400 error, on a ragged
    list such as ``["a", ["b"]]``)."""
    from mlflow.exceptions import MlflowException

    from scoring.errors import InputError
    from scoring.schema import class_names_param

    try:
        return list(class_names_param(value))
    except InputError as err:
        raise MlflowException.invalid_parameter_value(str(err)) from None
