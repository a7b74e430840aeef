"""Azure ML online endpoint scoring script: ``init()`` once, ``run()`` per request.

Azure mounts the registered MLflow model under ``AZUREML_MODEL_DIR`` (often a folder or two
down: ``<model-name>/``, ``<version>/<folder>/``) and runs this file under the inference server
(azmlinfsrv). Only the model directory and this script are there, so nothing here imports the
project before the model is loaded: ``mlflow.pyfunc.load_model`` puts the model's own ``code/``
(mlflow_model, scoring) on ``sys.path``; requests are then parsed by ``scoring.azureml.request``
and scored by the model's pyfunc (``scoring.frame`` over the one runner), exactly as under
``mlflow models serve``. This file only finds the model and maps errors to HTTP answers.

Request: ``{"input_data": {"columns": ["image"], "index": [...], "data": [<base64 or URL>, ...]}}``
(or ``"dataframe_split"``), optional ``"params": {...}``. Response: a list with one
``{"boxes": [...]}`` per image. Bad input: HTTP 400 (413 when too large) with a JSON
``{"message": ...}`` naming the row and the problem; never a traceback.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

try:  # the inference server (azureml-inference-server-http) provides these
    from azureml_inference_server_http.api.aml_request import rawhttp
    from azureml_inference_server_http.api.aml_response import AMLResponse
except ImportError:  # older images ship them as azureml.contrib.services
    try:
        from azureml.contrib.services.aml_request import rawhttp
        from azureml.contrib.services.aml_response import AMLResponse
    except ImportError:  # plain Python (no server): run() takes a body and raises on bad input
        AMLResponse = None

        def rawhttp(func):
            return func

MODEL_DIR_ENV = "AZUREML_MODEL_DIR"
MLMODEL = "MLmodel"
SEARCH_DEPTH = 4  # AZUREML_MODEL_DIR/<name>/<version>/<folder>/MLmodel at most
logger = logging.getLogger("azmlinfsrv.score")  # the server configures this logger tree
model = None


def find_model_dir(root: str | os.PathLike) -> Path:
    """The MLflow model folder under ``root``: ``root`` itself or the one folder below it (up to
    SEARCH_DEPTH levels) that holds an MLmodel file. (Here, not in mlflow_model.model_dir: it
    runs before the model's code is importable.)"""
    root = Path(root)
    if (root / MLMODEL).is_file():
        return root
    for depth in range(1, SEARCH_DEPTH + 1):
        found = sorted(p.parent for p in root.glob("/".join(["*"] * depth) + f"/{MLMODEL}") if p.is_file())
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            raise RuntimeError(f"{len(found)} MLflow models under {root}: "
                               f"{', '.join(str(p.relative_to(root)) for p in found)}; deploy one")
    raise FileNotFoundError(f"no MLflow model ({MLMODEL} file) in {root} or the "
                            f"{SEARCH_DEPTH} folder levels below it")


def init(model_root: str | os.PathLike | None = None, model_config: dict | None = None):
    """Load the model once per worker (from ``model_root``, by default AZUREML_MODEL_DIR); a
    failure here fails the deployment, with the reason. Its options (``scoring.settings``): the
    ``model_config`` given, else a deployment's ``MLFLOW_PYFUNC_INFERENCE_CONFIG`` (a JSON
    object, MLflow's own variable), over what the MLmodel records; the deployment's
    ``MMDET_MLFLOW_*`` variables for what none of them sets."""
    global model
    import mlflow.pyfunc

    model_dir = find_model_dir(model_root or os.environ.get(MODEL_DIR_ENV, "."))
    logger.info("loading the MLflow model in %s", model_dir)
    model = mlflow.pyfunc.load_model(str(model_dir), model_config=model_config)
    import scoring

    logger.info("model loaded; scoring code from %s", Path(scoring.__file__).parent.parent)


@rawhttp
def run(request):
    """Score one request: the server's HTTP request object, or a JSON body (str, bytes or an
    already parsed dict) when called from Python."""
    from scoring.errors import InputError  # importable once init() loaded the model's code/
    from scoring.work import request_arrived

    try:
        with request_arrived():  # the server's timeout counts from here: so does our deadline
            if hasattr(request, "method"):  # an HTTP request from azmlinfsrv
                if request.method != "POST":
                    return _error(405, f"use POST with a JSON body, not {request.method}")
                body = _read_body(request)
            else:
                body = request
            return _predict(body)
    except InputError as err:
        return _error(err.status, str(err), err)


def _read_body(request) -> bytes:
    """The body, refused before it is read when its declared length is over the limit, and as
    soon as it passes the limit when it declares none (chunked)."""
    from scoring.limits import max_request_bytes, too_large

    limit = max_request_bytes()
    if request.content_length is not None and request.content_length > limit:
        raise too_large(request.content_length)
    chunks, size = [], 0
    while True:  # a stream read may return less than asked: read to the end
        chunk = request.stream.read(min(1 << 20, limit + 1 - size))
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            raise too_large(None)


def _predict(body) -> list:
    from mlflow.exceptions import MlflowException

    from scoring.azureml.request import parse_request
    from scoring.errors import InputError

    if model is None:
        raise RuntimeError("init() has not loaded the model")
    frame, params = parse_request(body)
    try:
        predictions = model.predict(frame, params=params)
    except MlflowException as err:
        if err.get_http_status_code() == 400:  # the pyfunc's InputError, or a param type error
            raise InputError(err.message) from None
        raise
    return predictions.to_dict(orient="records")


def _error(status: int, message: str, err: Exception | None = None):
    logger.info("answered %d: %s", status, message)
    if AMLResponse is None:
        raise err or RuntimeError(message)
    return AMLResponse({"message": message}, status, json_str=True)
