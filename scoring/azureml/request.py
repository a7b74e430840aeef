"""The JSON request bodies of an Azure ML online endpoint -> (DataFrame, params).

Azure's catalog models take ``{"input_data": {"columns": ["image"], "index": [...], "data": [...]}}``
(``data`` a flat list for the single ``image`` column, or a list of one-value rows), with optional
``"params": {...}`` beside it; MLflow's ``{"dataframe_split": {...}}`` has the same shape. The
frame goes to the model's pyfunc ``predict`` (scoring.frame), which decodes and validates images.
"""
from __future__ import annotations

import json
from typing import Any, Mapping

import pandas as pd

from scoring.decode import image_value_problem, preview
from scoring.errors import InputError
from scoring.frame import check_index_label, check_row_count
from scoring.limits import max_request_bytes, too_large
from scoring.schema import INPUT_COLUMN, PredictParams

DATA_KEYS = ("input_data", "dataframe_split")
PARAMS_KEY = "params"


def parse_request(body: str | bytes | Mapping) -> tuple[pd.DataFrame, dict | None]:
    """The request's images as a frame with an ``image`` column (indexed by the request's
    ``index``) and its params (or None). Raises InputError for anything malformed."""
    if isinstance(body, (str, bytes, bytearray)):
        if len(body) > max_request_bytes():
            raise too_large(len(body))
        try:
            body = json.loads(body)
        except (ValueError, UnicodeDecodeError) as err:
            raise InputError(f"the request body is not valid JSON ({err})") from None
        except RecursionError:  # [[[[...]]]] deeper than the parser's stack
            raise InputError("the request body is JSON nested too deeply") from None
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
    if params:
        PredictParams().updated(params)  # unknown names and bad values: 400 here, never dropped
    return split_frame(body[present[0]], present[0]), (dict(params) if params else None)


def split_frame(split: Any, key: str = "input_data") -> pd.DataFrame:
    """``{"columns", "index", "data"}`` -> DataFrame; every row must hold an image string."""
    if not isinstance(split, Mapping):
        raise InputError(f"{key!r} must be an object with 'columns', 'index' and 'data'")
    columns = split.get("columns", [INPUT_COLUMN])
    data = split.get("data")
    if (not isinstance(columns, list) or not all(isinstance(c, str) for c in columns)
            or INPUT_COLUMN not in columns or len(set(columns)) != len(columns)):
        raise InputError(f"{key}.columns must be a list of distinct names that includes "
                         f"{INPUT_COLUMN!r}, got {preview(columns)}")
    if not isinstance(data, list) or not data:
        raise InputError(f"{key}.data must be a non-empty list of images (base64 or http(s) URLs)")
    check_row_count(len(data))
    index = split.get("index", list(range(len(data))))
    if not isinstance(index, list) or len(index) != len(data):
        raise InputError(f"{key}.index must be a list as long as {key}.data ({len(data)} rows)")
    for label in index:
        check_index_label(label, f"{key}.index")
    rows = []
    for label, row in zip(index, data):
        if len(columns) == 1 and not isinstance(row, list):
            row = [row]  # the flat list Azure's examples send for the single image column
        if not isinstance(row, list) or len(row) != len(columns):
            raise InputError(f"expected a row of {len(columns)} value(s) for columns {columns}, "
                             f"got {preview(row)}", row=label)
        rows.append(row)
    frame = pd.DataFrame(rows, columns=columns, index=index)
    for label, value in frame[INPUT_COLUMN].items():
        problem = image_value_problem(value)
        if problem:
            raise InputError(problem, row=label)
    return frame


def _keys() -> str:
    return " or ".join(map(repr, DATA_KEYS))
