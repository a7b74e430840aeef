"""Property-based fuzzing (hypothesis) of the request parser, the decoder and the predict
params: only our own InputError may escape, and what passes is well-formed; damaged images
decode to the same pixels or the same error every time, in this process and in a fresh one.
A short, derandomized run (the same examples every time, no example database written);
bench/fuzz.py runs the same properties for longer."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from hypothesis import HealthCheck, given, settings

from fuzz_properties import (DAMAGE_SEEDS, check_decode, check_decode_deterministic, check_parse_request,
                             check_params, damage_corpus, damaged_images, decode_outcome, decode_outcomes,
                             image_values, params, requests)

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


@SHORT
@given(damaged_images())
def test_damaged_images_decode_the_same_every_time(data):
    check_decode_deterministic(data)


def test_every_accepted_format_decodes_the_same_every_time():
    for name, data in DAMAGE_SEEDS.items():
        assert not decode_outcome(data).startswith("InputError"), name
        assert len(decode_outcomes(data, 5)) == 1, name


def test_damaged_images_decode_the_same_in_a_fresh_process():
    corpus = damage_corpus()
    here = [decode_outcome(data) for data in corpus]
    tests = Path(__file__).resolve().parent
    script = ("import json, sys; from fuzz_properties import damage_corpus, decode_outcome; "
              "print(json.dumps([decode_outcome(data) for data in damage_corpus()]))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tests.parent), str(tests),
                                                         os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                          timeout=300, check=True)
    there = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(here) == len(there) == len(corpus)
    differ = [(k, a, b) for k, (a, b) in enumerate(zip(here, there)) if a != b]
    assert not differ, differ[:5]
    assert any(not outcome.startswith("InputError") for outcome in here)  # some damage decodes
