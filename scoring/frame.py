"""The DataFrame scoring interface every server uses: a frame with an ``image`` column in, a
frame with a ``boxes`` column out, one row per image, in order (through the one runner)."""
from __future__ import annotations

import json
from typing import Any, Mapping

import numpy as np
import pandas as pd

from scoring import settings
from scoring.decode import preview
from scoring.errors import InputError
from scoring.fetch import request_budget
from scoring.runner import score_images
from scoring.runtimes.base import Predictor
from scoring.schema import INPUT_COLUMN, OUTPUT_COLUMN
from scoring.work import request_deadline


def as_frame(model_input: Any) -> pd.DataFrame:
    """Accept a DataFrame, or for direct Python use a list / Series of images or a dict."""
    if isinstance(model_input, pd.DataFrame):
        frame = model_input
    elif isinstance(model_input, pd.Series):
        frame = model_input.to_frame(INPUT_COLUMN)
    elif isinstance(model_input, Mapping):
        frame = pd.DataFrame(dict(model_input))
    elif isinstance(model_input, (list, tuple)):
        frame = pd.DataFrame({INPUT_COLUMN: list(model_input)})
    else:
        raise InputError(f"expected a DataFrame with an {INPUT_COLUMN!r} column, "
                         f"got {type(model_input).__name__}")
    if INPUT_COLUMN not in frame.columns:
        raise InputError(f"the input has no {INPUT_COLUMN!r} column "
                         f"(columns: {', '.join(map(str, frame.columns)) or 'none'})")
    if len(frame) == 0:
        raise InputError("the input has no rows")
    if isinstance(frame.index, pd.MultiIndex):  # nested index lists multiply rows
        raise InputError("the request's index must be a flat list of labels, one per image")
    for label in frame.index[:settings.MAX_ROWS.value() + 1]:  # more rows are refused anyway
        check_index_label(label, "the request's index")
    return frame


def check_row_count(rows: int) -> None:
    """The rows one request may carry (scoring.settings.MAX_ROWS): more is a 400."""
    max_rows = settings.MAX_ROWS.value()
    if rows > max_rows:
        raise InputError(f"the request has {rows} images, over the limit of {max_rows} "
                         f"({settings.MAX_ROWS.source()}); split it, or use batch scoring")


def check_index_label(label: Any, where: str) -> None:
    """Labels name rows in errors and answers: scalars only. A list label would make pandas
    multiply rows (a MultiIndex), and MLflow's parser passes objects and booleans through."""
    if isinstance(label, (bool, np.bool_)) or not isinstance(label, (str, int, float, np.integer, np.floating)):
        raise InputError(f"{where} labels must be strings or numbers, got {preview(label)}")


def score_frame(predictor: Predictor, model_input: Any,
                params: Mapping[str, Any] | None = None) -> pd.DataFrame:
    """Decode, predict and encode, one batch at a time, within a served request's limits (rows,
    work deadline, URL budget: see scoring.settings; the model's model_config first). Errors
    name the row by its index label (the request's ``index``)."""
    with settings.using(predictor.model_config):
        return _score_frame(predictor, model_input, params)


def _score_frame(predictor: Predictor, model_input: Any,
                 params: Mapping[str, Any] | None) -> pd.DataFrame:
    frame = as_frame(model_input)
    rows = zip(frame.index, frame[INPUT_COLUMN])
    if in_spark_task():  # a batch of a Spark job's rows, not a served request: no request limits
        deadline = budget = None
    else:
        check_row_count(len(frame))
        deadline = request_deadline()
        budget = request_budget()
    spark = deadline is None
    out = [Boxes(map(OptionalKeys, boxes) if spark else boxes)
           for boxes in (scored.response[OUTPUT_COLUMN]
                         for scored in score_images(predictor, rows, params, deadline=deadline,
                                                    budget=budget))]
    return pd.DataFrame({OUTPUT_COLUMN: out}, index=frame.index)


def in_spark_task() -> bool:
    """Whether this call runs inside a Spark task: ``mlflow.pyfunc.spark_udf`` hands predict
    each Arrow batch of a partition (``spark.sql.execution.arrow.maxRecordsPerBatch`` rows, 10000
    by default). That is a batch job's work, which the limits of a served request (rows, work
    deadline, URL budget) would fail: a batch of 65 rows, or one that a busy executor scores in
    over a minute. Each image keeps its own limits (pixels, mask work, URL timeouts). Spark is
    only looked at when the process has already imported it (a Spark worker has)."""
    import sys

    if "pyspark" not in sys.modules:
        return False
    try:
        from pyspark import TaskContext

        return TaskContext.get() is not None
    except Exception:  # a pyspark too old or broken to tell: a served request's limits apply
        return False


class Boxes(list):
    """An image's ``boxes`` (a plain list of detection dicts in every other respect) whose
    ``str()`` is JSON. ``mlflow.pyfunc.spark_udf(..., result_type="string")`` makes each value
    a string with ``str()``: a list's would be Python's repr (single quotes), which nothing
    downstream parses; this one is the JSON array that ``from_json`` or ``json.loads`` read."""

    __slots__ = ()

    def __str__(self) -> str:
        return json.dumps(self)


class NullFields(dict):
    """A struct whose every absent field reads as null (see ``OptionalKeys``)."""

    __slots__ = ()

    def __missing__(self, key):
        return None


class OptionalKeys(dict):
    """A detection whose absent optional keys read as empty: ``spark_udf`` fills the signature's
    struct field by field (``record[field]``), and a detection carries ``polygon`` or ``rle`` (or
    neither) as ``mask_format`` asks. MLflow's conversion takes neither a missing key nor a
    null array of arrays or struct, so an absent ``polygon`` reads as no parts and an absent
    ``rle`` as a struct of nulls. Its JSON is the detection's own (absent keys stay absent)."""

    __slots__ = ()

    def __missing__(self, key):
        return [] if key == "polygon" else NullFields()
