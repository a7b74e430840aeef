"""Hypothesis strategies and properties for the request parser, the decoder and the params:
whatever comes in, only our own InputError may come out (or a valid result). Used by
tests/test_fuzz.py (a short, derandomized run) and bench/fuzz.py (a long one)."""
from __future__ import annotations

import json
import re

import numpy as np
from hypothesis import strategies as st

from hostile_cases import ACCEPTED, b64

URL_LIKE = re.compile(r"^\s*https?://", re.IGNORECASE)  # the decoder would fetch it: no network here

json_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True),
                         st.text(max_size=20))
json_values = st.recursive(json_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=5), st.dictionaries(st.text(max_size=10), inner, max_size=5)), max_leaves=30)

PARAM_NAMES = ("score_threshold", "iou_threshold", "max_detections", "mask_threshold",
               "polygon_tolerance", "class_agnostic_nms", "mask_format", "classes")
param_values = st.one_of(json_scalars, st.sampled_from(["true", "false", "0.5", "1e3", "nan", "inf", " 1 "]),
                         st.lists(json_scalars, max_size=2))
params = st.dictionaries(st.one_of(st.sampled_from(PARAM_NAMES), st.text(max_size=12)), param_values, max_size=4)


@st.composite
def requests(draw):
    """Request bodies near the real shape (so the parser's inner checks are reached), with any
    part replaced by arbitrary JSON, as a dict, JSON text or bytes."""
    key = draw(st.sampled_from(["input_data", "dataframe_split", "inputs", ""]))
    rows = draw(st.integers(0, 4))
    split = {
        "columns": draw(st.one_of(st.just(["image"]), st.lists(json_scalars, max_size=3), json_values)),
        "index": draw(st.one_of(st.just(list(range(rows))), st.lists(json_values, max_size=rows + 1), json_values)),
        "data": draw(st.one_of(st.lists(st.one_of(st.text(max_size=12), json_values), min_size=rows,
                                        max_size=rows), json_values)),
    }
    split = {k: v for k, v in split.items() if draw(st.booleans()) or k == "data"}
    body = {key: draw(st.one_of(st.just(split), json_values))} if key else {}
    if draw(st.booleans()):
        body["params"] = draw(st.one_of(params, json_values))
    if draw(st.booleans()):
        body.update(draw(st.dictionaries(st.text(max_size=8), json_values, max_size=2)))
    form = draw(st.sampled_from(["dict", "text", "bytes", "garbled"]))
    if form == "dict":
        return body
    text = json.dumps(body)
    if form == "text":
        return text
    if form == "bytes":
        return text.encode()
    cut = draw(st.integers(0, len(text)))
    return text[:cut] + draw(st.text(max_size=5)) + text[cut:]


_SEEDS = [make() for make in ACCEPTED.values()]


@st.composite
def image_bytes(draw):
    """Real images of every accepted format, truncated, bit-flipped or spliced, and plain noise."""
    kind = draw(st.sampled_from(["mutated", "noise", "spliced"]))
    if kind == "noise":
        return draw(st.binary(max_size=256))
    data = bytearray(draw(st.sampled_from(_SEEDS)))
    if kind == "spliced":  # one format's header on another's body
        other = draw(st.sampled_from(_SEEDS))
        at = draw(st.integers(0, min(len(data), 64)))
        return bytes(data[:at]) + other[at:]
    for _ in range(draw(st.integers(0, 6))):
        at = draw(st.integers(0, len(data) - 1))
        data[at] = draw(st.integers(0, 255))
    return bytes(data[:draw(st.integers(0, len(data)))])


image_values = st.one_of(
    image_bytes(),
    image_bytes().map(b64),
    image_bytes().map(lambda data: "data:image/png;base64," + b64(data)),
    st.text(max_size=64).filter(lambda text: not URL_LIKE.match(text)),
    json_values.filter(lambda value: not (isinstance(value, str) and URL_LIKE.match(value))),
)


def check_parse_request(body) -> None:
    import pandas as pd

    from scoring.azureml.request import parse_request
    from scoring.errors import InputError

    try:
        frame, parsed_params = parse_request(body)
    except InputError:
        return
    assert isinstance(frame, pd.DataFrame) and "image" in frame.columns and len(frame) >= 1
    assert not isinstance(frame.index, pd.MultiIndex)
    assert parsed_params is None or isinstance(parsed_params, dict)


def check_decode(value) -> None:
    from scoring.decode import decode_image
    from scoring.errors import InputError

    try:
        image = decode_image(value, row=0)
    except InputError as err:
        assert str(err).startswith("row 0: ")
        return
    assert isinstance(image, np.ndarray) and image.dtype == np.uint8
    assert image.ndim == 3 and image.shape[2] == 3 and image.shape[0] >= 1 and image.shape[1] >= 1


def check_params(values) -> None:
    from scoring.errors import InputError
    from scoring.schema import PredictParams

    try:
        checked = PredictParams().updated(values)
    except InputError:
        return
    for name, (low, high) in PredictParams._RANGES.items():
        assert low <= getattr(checked, name) <= high
    assert isinstance(checked.max_detections, int) and isinstance(checked.class_agnostic_nms, bool)
    assert checked.mask_format in ("polygon", "rle", "none")
    assert checked.classes is None or (isinstance(checked.classes, tuple) and checked.classes
                                       and all(isinstance(c, str) and c for c in checked.classes))
