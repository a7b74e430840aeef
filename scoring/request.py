"""The JSON request bodies of an Azure ML online endpoint -> (DataFrame, params).

Azure's catalog models take ``{"input_data": {"columns": ["image"], "index": [...], "data": [...]}}``
(``data`` a flat list for the single ``image`` column, or a list of one-value rows), with optional
``"params": {...}`` beside it; MLflow's ``{"dataframe_split": {...}}`` has the same shape. The
frame goes to the model's pyfunc ``predict`` (scoring.frame), which decodes and validates images.
"""
from __future__ import annotations

import json
import os
from typing import Any, Mapping

import pandas as pd

from scoring.errors import InputError
from scoring.schema import INPUT_COLUMN

# Base64 inflates images by 4/3: 64 MiB is a handful of 12-megapixel photos per request.
MAX_REQUEST_BYTES = int(os.environ.get("MMDET_MLFLOW_MAX_REQUEST_BYTES", 64 * 1024 * 1024))
DATA_KEYS = ("input_data", "dataframe_split")
PARAMS_KEY = "params"


class RequestTooLarge(InputError):
    """The body is over MAX_REQUEST_BYTES (HTTP 413)."""

    def __init__(self, size: int | None):
        shown = f"{size} bytes" if size is not None else "more bytes"
        super().__init__(f"the request is {shown}, over the limit of {MAX_REQUEST_BYTES} bytes "
                         f"(MMDET_MLFLOW_MAX_REQUEST_BYTES); send fewer or smaller images per request")


def parse_request(body: str | bytes | Mapping) -> tuple[pd.DataFrame, dict | None]:
    """The request's images as a frame with an ``image`` column (indexed by the request's
    ``index``) and its params (or None). Raises InputError for anything malformed."""
    if isinstance(body, (str, bytes, bytearray)):
        if len(body) > MAX_REQUEST_BYTES:
            raise RequestTooLarge(len(body))
        try:
            body = json.loads(body)
        except (ValueError, UnicodeDecodeError) as err:
            raise InputError(f"the request body is not valid JSON ({err})") from None
    if not isinstance(body, Mapping):
        raise InputError(f"the request body must be a JSON object with one of {_keys()}, "
                         f"got a JSON {type(body).__name__}")
    present = [key for key in DATA_KEYS if key in body]
    if len(present) != 1:
        found = ", ".join(map(repr, body)) or "none"
        raise InputError(f"the request body must have exactly one of {_keys()} (keys found: {found})")
    params = body.get(PARAMS_KEY)
    if params is not None and not isinstance(params, Mapping):
        raise InputError(f"{PARAMS_KEY!r} must be a JSON object, got {type(params).__name__}")
    return split_frame(body[present[0]], present[0]), (dict(params) if params else None)


def split_frame(split: Any, key: str = "input_data") -> pd.DataFrame:
    """``{"columns", "index", "data"}`` -> DataFrame; every row must hold an image string."""
    if not isinstance(split, Mapping):
        raise InputError(f"{key!r} must be an object with 'columns', 'index' and 'data'")
    columns = split.get("columns", [INPUT_COLUMN])
    data = split.get("data")
    if not isinstance(columns, list) or INPUT_COLUMN not in columns:
        raise InputError(f"{key}.columns must be a list that includes {INPUT_COLUMN!r}, got {columns!r}")
    if not isinstance(data, list) or not data:
        raise InputError(f"{key}.data must be a non-empty list of images (base64 or http(s) URLs)")
    index = split.get("index", list(range(len(data))))
    if not isinstance(index, list) or len(index) != len(data):
        raise InputError(f"{key}.index must be a list as long as {key}.data ({len(data)} rows)")
    rows = []
    for label, row in zip(index, data):
        if len(columns) == 1 and not isinstance(row, list):
            row = [row]  # the flat list Azure's examples send for the single image column
        if not isinstance(row, list) or len(row) != len(columns):
            raise InputError(f"expected a row of {len(columns)} value(s) for columns {columns}, "
                             f"got {_preview(row)}", row=label)
        rows.append(row)
    frame = pd.DataFrame(rows, columns=columns, index=index)
    for label, value in frame[INPUT_COLUMN].items():
        problem = image_value_problem(value)
        if problem:
            raise InputError(problem, row=label)
    return frame


def image_value_problem(value: Any) -> str | None:
    """What is wrong with a request's image value before decoding (it must be a string)."""
    if isinstance(value, str):
        return None
    return f"the {INPUT_COLUMN!r} value must be a base64 string or an http(s) URL, got {_preview(value)}"


def _keys() -> str:
    return " or ".join(map(repr, DATA_KEYS))


def _preview(value: Any) -> str:
    try:
        text = repr(value) if isinstance(value, str) else json.dumps(value)
    except (TypeError, ValueError):  # numpy scalars and the like, from tables
        text = f"{type(value).__name__} {value!r}"
    return text if len(text) <= 60 else text[:60] + "..."
