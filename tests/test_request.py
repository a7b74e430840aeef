"""Request shapes and pictures that crashed servers with a 500 are input errors (4xx)."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from helpers import b64_png

from scoring.errors import InputError


# 500s where 400s are due

def test_an_image_too_thin_for_the_resize_is_a_400(tiny_pyfunc):
    from mlflow.exceptions import MlflowException

    thin = np.full((1, 2000, 3), 128, np.uint8)
    with pytest.raises(MlflowException) as err:
        tiny_pyfunc.predict(pd.DataFrame({"image": [b64_png(thin)]}, index=[4]))
    assert err.value.get_http_status_code() == 400
    assert "row 4: image is 2000x1: too thin for the model" in err.value.message


@pytest.mark.parametrize("body, message", [
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ('{"input_data": {"data": ["x"]}, "params": ' + "{\"a\": " * 50_000 + "1" + "}" * 50_000 + "}",
     "nested too deeply"),
    (json.dumps({"input_data": {"columns": [1], "data": [["x"]]}}), "columns must be a list of distinct names"),
    (json.dumps({"input_data": {"columns": [["image"]], "data": [["x"]]}}), "columns must be a list"),
    (json.dumps({"input_data": {"index": [[0, 1]], "data": ["x"]}}), "index labels must be"),
    (json.dumps({"input_data": {"index": [{"a": 1}], "data": ["x"]}}), "index labels must be"),
])
def test_request_shapes_that_crashed_are_input_errors(body, message):
    from scoring.azureml.request import parse_request

    with pytest.raises(InputError, match=message):
        parse_request(body)
