"""The DataFrame interface every server uses (scoring.frame): rows in are rows scored."""
from __future__ import annotations

import json

import pandas as pd
import pytest

from scoring import settings
from scoring.errors import InputError


# Row amplification through index

def test_a_nested_index_is_refused_not_multiplied():
    from scoring.azureml.request import parse_request

    body = json.dumps({"input_data": {"index": [list(range(1_000_000))], "data": ["aGVsbG8="]}})
    with pytest.raises(InputError, match="index labels must be strings or numbers"):
        parse_request(body)


def test_rows_in_are_rows_scored_and_the_maximum_is_enforced(monkeypatch):
    from scoring.azureml.request import parse_request

    frame, _ = parse_request({"input_data": {"index": ["a", 7], "data": ["x", "y"]}})
    assert list(frame.index) == ["a", 7] and len(frame) == 2
    monkeypatch.setenv(settings.MAX_ROWS.env, "3")
    with pytest.raises(InputError, match="4 images, over the limit of 3"):
        parse_request({"input_data": {"data": ["x"] * 4}})


def test_the_pyfunc_refuses_a_multiindex(tiny_pyfunc):
    from mlflow.exceptions import MlflowException

    frame = pd.DataFrame({"image": ["x", "y"]}, index=pd.MultiIndex.from_tuples([(0, 1), (0, 2)]))
    with pytest.raises(MlflowException, match="flat list of labels"):
        tiny_pyfunc.predict(frame)
