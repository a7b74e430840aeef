"""The DataFrame scoring interface every server uses: a frame with an ``image`` column in, a
frame with a ``boxes`` column out, one row per image, in order."""
from __future__ import annotations

from typing import Any, Mapping

import pandas as pd

from scoring.decode import decode_image
from scoring.encode import encode_detections
from scoring.errors import InputError
from scoring.predictor import InstanceSegmenter
from scoring.schema import INPUT_COLUMN, OUTPUT_COLUMN


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
    return frame


def score_frame(segmenter: InstanceSegmenter, model_input: Any,
                params: Mapping[str, Any] | None = None) -> pd.DataFrame:
    """Decode, predict and encode, one batch at a time so that only a batch of decoded images
    is ever in memory. Errors name the row by its index label (the request's ``index``)."""
    frame = as_frame(model_input)
    predict_params = segmenter.default_params.updated(params)
    rows = list(zip(frame.index, frame[INPUT_COLUMN]))
    out = []
    for start in range(0, len(rows), segmenter.batch_size):
        chunk = rows[start : start + segmenter.batch_size]
        images = [decode_image(value, row=label) for label, value in chunk]
        for detections in segmenter(images, predict_params):
            out.append(encode_detections(detections, predict_params)[OUTPUT_COLUMN])
    return pd.DataFrame({OUTPUT_COLUMN: out}, index=frame.index)
