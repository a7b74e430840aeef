"""The runner (scoring.runner): params checked, work capped before the model runs, work stopped
at the request's deadline."""
from __future__ import annotations


import numpy as np
import pandas as pd
import pytest
from helpers import b64_png, scene_image

from scoring.errors import InputError


# Params: unknown names refused, work capped, work stopped at the deadline

def test_an_unknown_param_is_refused_naming_the_known_ones(tiny_pyfunc):
    from mlflow.exceptions import MlflowException

    with pytest.raises(MlflowException) as err:
        tiny_pyfunc.predict(pd.DataFrame({"image": ["x"]}), params={"score_thresold": 0.9})
    assert err.value.get_http_status_code() == 400
    assert "unknown param 'score_thresold'; known params: score_threshold" in err.value.message


def test_the_work_cap_refuses_before_the_model_runs(tiny_pyfunc):
    from mlflow.exceptions import MlflowException

    image = b64_png(np.zeros((1000, 1000, 3), np.uint8))
    with pytest.raises(MlflowException, match="row 0: max_detections 10000 x 1000x1000 pixels"):
        tiny_pyfunc.predict(pd.DataFrame({"image": [image]}), params={"max_detections": 10000})


class _PassesAfter:
    """A request deadline that passes at its n-th check (a clock the test controls, so the test
    says exactly where the runner checks, whatever the machine's speed)."""

    what = "took longer than the test allows"

    def __init__(self, checks: int):
        self.checks = checks

    def passed(self) -> bool:
        self.checks -= 1
        return self.checks < 0


def test_a_passed_deadline_stops_the_masks_of_an_image(tiny_pyfunc):
    """The runner checks before decoding and before the forward pass; a deadline that passes
    during the forward pass stops the encoding at the next mask (10000 masks of a 700x700 image
    took 6 minutes, long after the client had gone), instead of after the last one."""
    from scoring.runner import score_images

    predictor = tiny_pyfunc.get_raw_model()
    image = scene_image(64, 48, 0)
    params = {"score_threshold": 0.0, "max_detections": 50}
    items = [(0, image)]
    decode = lambda key, value: value  # noqa: E731  (the image is already decoded)
    whole = list(score_images(predictor, items, params, decode=decode, deadline=_PassesAfter(99)))
    assert len(whole[0].response["boxes"]) == 50
    with pytest.raises(InputError, match="took longer than the test allows"):
        list(score_images(predictor, items, params, decode=decode, deadline=_PassesAfter(2)))
