"""Property-based fuzzing (hypothesis) of the request parser, the decoder and the predict
params: only our own InputError may escape, and what passes is well-formed. A short,
derandomized run (the same examples every time, no example database written); bench/fuzz.py
runs the same properties for longer."""
from __future__ import annotations

from hypothesis import HealthCheck, given, settings

from fuzz_properties import check_decode, check_parse_request, check_params, image_values, params, requests

SHORT = settings(derandomize=True, database=None, deadline=None, max_examples=150,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@SHORT
@given(requests())
def test_parse_request_raises_only_input_errors(body):
    check_parse_request(body)


@SHORT
@given(image_values)
def test_decode_image_raises_only_input_errors(value):
    check_decode(value)


@SHORT
@given(params)
def test_params_raise_only_input_errors(values):
    check_params(values)
