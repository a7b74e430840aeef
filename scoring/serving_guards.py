"""Where MLflow's own serving would answer our users badly, and no hook exists, these wrap one
MLflow function each, for our models only, when a model of ours is loaded (``install``):

- ``refuse_unknown_params``: MLflow drops params the signature does not declare (a typo such as
  ``score_thresold`` silently meant the defaults): refused with a 400 naming the known ones; the
  same wrap turns ``classes="a,b"`` into the list the signature declares;
- ``refuse_unparseable_json``: JSON nested deeper than the recursion limit, or an integer too long
  to convert, made ``mlflow models serve`` answer 500: a 400 now;
- ``limit_request_bodies``: ``mlflow models serve`` read a body of any size into memory: one over
  ``MMDET_MLFLOW_MAX_REQUEST_BYTES`` (the Azure scoring script's limit) is refused with a 413;
- ``refuse_unreadable_tables``: MLflow's parser made a 500 of a column name that is a list or
  an object (``[["a"], "image"]``), and a 200 of guesses (records with different keys,
  ``inputs`` columns of different lengths): the table is checked first, as our own parser
  (Azure's script) checks it, and refused with a 400 naming the problem.

MLflow offers no public hook for any of these: unknown params are dropped by MLflow's own params
check (``_enforce_params_schema``) before the model sees them, whatever the signature says, and
the scoring server parses and reads bodies before any model code runs. So the wraps stay, here
only, installed once per process (``install``), and only on the MLflow version they were written
for and are tested on (``WRITTEN_FOR_MLFLOW``, MLflow's pin in mlflow_model/requirements.txt):
on another version nothing is wrapped, a warning says so, and MLflow serves as it does for any
model (unknown params ignored, some malformed bodies a 500, no body limit under ``mlflow models
serve``). Each wrap also checks that the function it wraps exists.
"""
from __future__ import annotations

import functools
import json
import sys

LOADER_MODULE = "scoring.pyfunc"  # the pyfunc loader_module of our models

# The MLflow whose private functions the wraps below were written for; tests/test_serving_guards.py
# checks it is the version mlflow_model/requirements.txt pins.
WRITTEN_FOR_MLFLOW = "3.17.2"

_STATE = {"version_checked": False, "version_ok": False, "server_wrapped": False}


def install() -> None:
    """Wrap MLflow's functions (see the module's docstring), each once per process: the pyfunc
    loader calls this on every load. The params check is wrapped at the first call, the scoring
    server's functions at the first call where that server is running (``mlflow models serve``
    imports it before it loads the model); later calls do nothing. On another MLflow version
    than ``WRITTEN_FOR_MLFLOW`` nothing is wrapped, with a warning."""
    if not _STATE["version_checked"]:
        import mlflow

        from scoring.version_guard import written_for

        _STATE["version_checked"] = True
        _STATE["version_ok"] = written_for(
            "mlflow", mlflow.__version__, WRITTEN_FOR_MLFLOW,
            "its serving is left as MLflow makes it: params the signature does not declare are "
            "ignored instead of refused, and under `mlflow models serve` request bodies have no "
            "size limit and some malformed ones answer 500")
        if _STATE["version_ok"]:
            refuse_unknown_params()
    if not _STATE["version_ok"] or _STATE["server_wrapped"]:
        return
    if "mlflow.pyfunc.scoring_server" in sys.modules:
        _STATE["server_wrapped"] = True
        refuse_unparseable_json()
        refuse_unreadable_tables()
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


# The request forms MLflow's scoring server reads (mlflow.pyfunc.scoring_server's SUPPORTED_FORMATS).
TABLE_FORMATS = ("dataframe_split", "dataframe_records", "instances", "inputs")


def refuse_unreadable_tables() -> None:
    """Under ``mlflow models serve``: check the request's table before MLflow's parser reads it
    (``infer_and_parse_data``, which the invocations handler calls by its module name), so that
    what azmlinfsrv refuses with a 400 is a 400 here too, in the same words: a
    ``dataframe_split`` goes through our own parser's checks (scoring.azureml.request); records
    and the TF-serving ``instances`` / ``inputs`` forms must be a table (every record with the
    same keys, every column as long as ``image``). MLflow's parser raised TypeError on a column
    named ``["a"]`` (a 500), and filled the cells of records with other keys with NaN (a 200
    for a row without its image, or an image scored with other keys dropped). Anything MLflow's
    parser still raises on a checked table is a 400, not a 500. If a later MLflow renames the
    function, nothing is wrapped and tests/test_hostile.py's column and form cases say so."""
    server = sys.modules.get("mlflow.pyfunc.scoring_server")
    original = getattr(server, "infer_and_parse_data", None)
    if original is None or getattr(original, "refuses_unreadable_tables", False):
        return
    from mlflow.exceptions import MlflowException

    from scoring.errors import InputError

    def parse(data, schema=None):
        try:
            check_table(data)
        except InputError as err:
            raise MlflowException.invalid_parameter_value(str(err)) from None
        try:
            return original(data, schema)
        except MlflowException:
            raise
        except Exception as err:  # noqa: BLE001 - MLflow's parser failing on a checked body is still the body's fault
            keys = ", ".join(key for key in TABLE_FORMATS if isinstance(data, dict) and key in data)
            raise MlflowException.invalid_parameter_value(
                f"the request's {keys or 'table'} could not be read as a table "
                f"({type(err).__name__}: {str(err)[:200]})") from None

    parse.refuses_unreadable_tables = True
    server.infer_and_parse_data = parse


def check_table(data) -> None:
    """Raise InputError when the one table form in ``data`` (a request body's dict) is not a
    table our model can take; leave a body with none or several of them to MLflow's message."""
    from scoring.azureml.request import split_frame
    from scoring.frame import check_row_count

    present = [key for key in TABLE_FORMATS if isinstance(data, dict) and key in data]
    if len(present) != 1:
        return
    key = present[0]
    value = data[key]
    if key == "dataframe_split":
        split_frame(value, key)  # our parser's checks and words: columns, index, rows, values
    elif key == "dataframe_records":
        if not isinstance(value, list) or not value:
            raise _input_error(f"{key} must be a non-empty list of records such as {{\"image\": \"<base64>\"}}")
        check_row_count(len(value))
        _check_records(value, key)
    elif isinstance(value, list):  # instances / inputs: images, or records
        if not value:
            raise _input_error(f"{key} must not be empty: send one image or more")
        check_row_count(len(value))
        is_record = [isinstance(item, dict) for item in value]
        if any(is_record) and not all(is_record):
            raise _input_error(f"{key} must be a list of images or a list of records, not both")
        if all(is_record):
            _check_records(value, key)
    elif isinstance(value, dict):  # instances / inputs: columns
        _check_columns(value, key)
    else:
        raise _input_error(f"{key} must be a list of images, a list of records or an object of columns "
                           f"(such as {{\"image\": [\"<base64>\"]}}), got {_preview(value)}")


def _check_records(records: list, key: str) -> None:
    """Every record an object with the same keys as the first, among them ``image``."""
    from scoring.schema import INPUT_COLUMN

    first = None
    for at, record in enumerate(records):
        if not isinstance(record, dict):
            raise _input_error(f"{key}[{at}] must be an object such as {{\"image\": \"<base64>\"}}, "
                               f"got {_preview(record)}")
        keys = sorted(record)
        if first is None:
            first = keys
            if INPUT_COLUMN not in record:
                raise _input_error(f"{key}[0] has the keys {keys}: a record's keys must include {INPUT_COLUMN!r}")
        elif keys != first:
            raise _input_error(f"{key}[{at}] has the keys {keys}, {key}[0] {first}: every record must have "
                               "the same keys (MLflow would fill the missing ones with NaN)")


def _check_columns(columns: dict, key: str) -> None:
    """An ``image`` column, and every column as long as it (or every value a single one)."""
    from scoring.frame import check_row_count
    from scoring.schema import INPUT_COLUMN

    if INPUT_COLUMN not in columns:
        raise _input_error(f"{key} has the columns {sorted(columns)}: they must include {INPUT_COLUMN!r}")
    image = columns[INPUT_COLUMN]
    if not isinstance(image, list) and not any(isinstance(column, list) for column in columns.values()):
        return  # one image: a value per column
    if not isinstance(image, list):
        raise _input_error(f"{key}[{INPUT_COLUMN!r}] must be a list of images, as the other columns are lists")
    check_row_count(len(image))
    for name, column in columns.items():
        if not isinstance(column, list):
            raise _input_error(f"{key}[{name!r}] must be a list, one value per image as {key}[{INPUT_COLUMN!r}], "
                               f"got {_preview(column)}")
        if len(column) != len(image):
            raise _input_error(f"{key}[{name!r}] has {len(column)} values, {key}[{INPUT_COLUMN!r}] {len(image)}: "
                               "every column must hold one value per image")


def _input_error(problem: str):
    from scoring.errors import InputError

    return InputError(problem)


def _preview(value) -> str:
    from scoring.decode import preview

    return preview(value)


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
                raise MlflowException.invalid_parameter_value(unknown_params_message(unknown, known))
            if "classes" in params and "classes" in known:
                params = {**params, "classes": _class_names(params["classes"])}
        return original(data, params, input_schema, params_schema, flavor, *args, **kwargs)

    validate.refuses_unknown_params = True
    pyfunc._validate_prediction_input = validate


def unknown_params_message(unknown: list, known: list) -> str:
    """Unknown params named, with the known ones; mask params sent to a model that makes no
    masks are named as such, with the model's task."""
    from scoring.schema import INSTANCE_SEGMENTATION, MASK_PARAMS, OBJECT_DETECTION

    for_masks = [name for name in unknown if name in MASK_PARAMS and name not in known]
    if for_masks and not any(name in known for name in MASK_PARAMS):
        return (f"this model does {OBJECT_DETECTION} (boxes, labels and scores; no masks): "
                f"{', '.join(map(repr, for_masks))} {'is' if len(for_masks) == 1 else 'are'} for "
                f"{INSTANCE_SEGMENTATION} models; known params: {', '.join(known)}")
    return (f"unknown param{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
            f"known params: {', '.join(known)}")


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
