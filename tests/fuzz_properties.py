"""Hypothesis strategies and properties for the request parser, the decoder and the params:
whatever comes in, only our own InputError may come out (or a valid result); and the same
bytes always decode to the same pixels or the same error, whatever memory held before (a cut
baseline JPEG once came back with uninitialized rows). Used by tests/test_fuzz.py (a short,
derandomized run) and bench/fuzz.py (a long one)."""
from __future__ import annotations

import hashlib
import json
import random
import re

import numpy as np
from hypothesis import strategies as st

from hostile_cases import ACCEPTED, b64, damage_seeds

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


DAMAGE_SEEDS = damage_seeds()  # every accepted format, and a photo-sized baseline JPEG
HEADER_BYTES = 200  # where the headers (markers, chunks, directories) of the seeds lie


def damaged(data: bytes, kind: str, rng: random.Random) -> bytes:
    """``data`` cut at a random offset, or with bits flipped in its header or in its
    compressed pixel data, or both."""
    data = bytearray(data)
    if kind in ("header-flip", "data-flip", "cut-and-flip"):
        low, high = (0, min(HEADER_BYTES, len(data))) if kind == "header-flip" else (
            min(HEADER_BYTES, len(data) - 1), len(data))
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(low, high)] ^= 1 << rng.randrange(8)
    if kind in ("cut", "cut-and-flip"):
        data = data[:rng.randrange(1, len(data))]
    return bytes(data)


DAMAGE_KINDS = ("cut", "header-flip", "data-flip", "cut-and-flip")


@st.composite
def damaged_images(draw):
    """A real image of an accepted format, cut short and/or with bits flipped."""
    name = draw(st.sampled_from(sorted(DAMAGE_SEEDS)))
    kind = draw(st.sampled_from(DAMAGE_KINDS))
    return damaged(DAMAGE_SEEDS[name], kind, random.Random(draw(st.integers(0, 2 ** 32))))


def damage_corpus(per_seed: int = 12, seed: int = 23) -> list[bytes]:
    """A fixed list of damaged images (the same in every process), for the fresh-process check."""
    rng = random.Random(seed)
    return [damaged(data, DAMAGE_KINDS[i % len(DAMAGE_KINDS)], rng)
            for _, data in sorted(DAMAGE_SEEDS.items()) for i in range(per_seed)]


def _scribble(pattern: int) -> None:
    """Fill and free buffers of the sizes a decode allocates, so that memory a decoder leaves
    unwritten holds a different pattern before each decode (glibc hands freed blocks out again)."""
    for size in (48 * 32 * 3, 64 * 48 * 3, 640 * 480 * 3, 1 << 16, 1 << 20):
        block = np.full(size, pattern, np.uint8)
        del block


def decode_outcome(data: bytes) -> str:
    """The md5 of the decoded pixels (with the shape), or the InputError's message."""
    from scoring.decode import decode_image
    from scoring.errors import InputError

    try:
        image = decode_image(data, row=0)
    except InputError as err:
        return f"InputError: {err}"
    return f"{image.shape} {hashlib.md5(image.tobytes()).hexdigest()}"


def decode_outcomes(data: bytes, times: int) -> set[str]:
    """What decoding the same bytes ``times`` gave, with other data in memory before each."""
    outcomes = set()
    for k in range(times):
        _scribble(0x11 * (k + 1))
        outcomes.add(decode_outcome(data))
    return outcomes


def check_decode_deterministic(data: bytes) -> None:
    """The same bytes, decoded three times: the same pixels or the same InputError every time
    (any other exception fails the property). No default arguments: hypothesis's @given."""
    outcomes = decode_outcomes(data, 3)
    assert len(outcomes) == 1, sorted(outcomes)


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
