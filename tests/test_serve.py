"""A real `mlflow models serve` process on 127.0.0.1, spoken to over HTTP."""
from __future__ import annotations

import json

import pytest
import requests

from helpers import VENV_BIN, assert_object_detection_answers, b64, free_port, running


def _served(model_dir, tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "mlflow-serve.log"
    cmd = [str(VENV_BIN / "mlflow"), "models", "serve", "-m", str(model_dir),
           "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1"]
    with running(cmd, f"http://127.0.0.1:{port}/ping", log):
        yield f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    yield from _served(tiny_model_dir, tmp_path_factory)


@pytest.fixture(scope="module")
def od_server(tiny_od_model_dir, tmp_path_factory):
    """The object-detection test model served the same way."""
    yield from _served(tiny_od_model_dir, tmp_path_factory)


def invoke(server, body, **kwargs):
    payload = body if isinstance(body, (str, bytes)) else json.dumps(body)
    return requests.post(f"{server}/invocations", data=payload, timeout=120,
                         headers={"Content-Type": "application/json", **kwargs})


def seed_request(images, params=None):
    """The model card's request, in MLflow's dataframe_split form."""
    body = {"dataframe_split": {"columns": ["image"], "index": list(range(len(images))),
                                "data": [[b64(p)] for p in images]}}
    if params:
        body["params"] = params
    return body


def test_two_images_answer_in_the_seed_schema(server, image_files):
    response = invoke(server, seed_request(image_files))
    assert response.status_code == 200, response.text
    predictions = response.json()["predictions"]
    assert len(predictions) == 2
    for prediction in predictions:
        assert set(prediction) == {"boxes"}
        assert prediction["boxes"], "the test model detects something"
        for det in prediction["boxes"]:
            assert set(det) == {"box", "label", "score", "polygon"}
            assert set(det["box"]) == {"topX", "topY", "bottomX", "bottomY"}
            assert all(0.0 <= v <= 1.0 for v in det["box"].values())
            assert det["box"]["topX"] <= det["box"]["bottomX"]
            assert isinstance(det["label"], str) and 0.3 < det["score"] <= 1.0
            for segment in det["polygon"]:
                assert len(segment) >= 6 and len(segment) % 2 == 0
                assert all(0.0 <= v <= 1.0 for v in segment)


def test_params_in_the_body_change_the_result(server, image_files):
    default = invoke(server, seed_request(image_files[:1])).json()["predictions"][0]["boxes"]
    few = invoke(server, seed_request(image_files[:1], {"max_detections": 2})).json()
    assert len(default) > 2 and len(few["predictions"][0]["boxes"]) == 2
    threshold = sorted(d["score"] for d in default)[len(default) // 2]
    strict = invoke(server, seed_request(image_files[:1], {"score_threshold": threshold})).json()
    assert 0 < len(strict["predictions"][0]["boxes"]) < len(default)


@pytest.mark.parametrize("body, message", [
    ({"dataframe_split": {"columns": ["image"], "index": [0, 5],
                          "data": [["aGVsbG8="], ["%%%"]]}}, "row 0: not an image"),
    ({"dataframe_split": {"columns": ["image"], "index": [3], "data": [["%%%"]]}},
     "row 3: not valid base64"),
    ({"dataframe_split": {"columns": ["picture"], "data": [["x"]]}}, "image"),
    ({"dataframe_split": {"columns": ["image"], "data": []}}, ""),
    ("{not json", ""),
    ({"input_data": {"columns": ["image"], "data": ["x"]}}, ""),
    ({"dataframe_split": {"columns": ["image"], "data": [["x"]]},
      "params": {"score_threshold": "high"}}, ""),
    # MLflow drops params its signature does not declare: a typo must not silently mean defaults
    ({"dataframe_split": {"columns": ["image"], "data": [["x"]]},
      "params": {"score_thresold": 0.9}}, "unknown param 'score_thresold'; known params: score_threshold"),
    # one image, a nested index of 100000 labels: pandas would score 100000 rows
    ({"dataframe_split": {"columns": ["image"], "index": [list(range(100_000))], "data": [["x"]]}}, ""),
    ({"dataframe_split": {"columns": ["image"], "data": [["x"]] * 65}}, "over the limit of 64"),
])
def test_malformed_requests_get_4xx_and_the_server_keeps_serving(server, image_files, body, message):
    response = invoke(server, body)
    assert 400 <= response.status_code < 500, (response.status_code, response.text)
    assert "Traceback" not in response.text
    if message:
        assert message in response.json()["message"]
    assert invoke(server, seed_request(image_files[:1])).status_code == 200


def test_health_routes(server):
    assert requests.get(f"{server}/ping", timeout=10).status_code == 200
    assert requests.get(f"{server}/version", timeout=10).status_code == 200


def test_an_object_detection_model_answers_boxes_and_refuses_mask_params_naming_its_task(
        od_server, image_files):
    response = invoke(od_server, seed_request(image_files, {"score_threshold": 0.1}))
    assert response.status_code == 200, response.text
    assert_object_detection_answers(response.json()["predictions"])
    for params, named in (({"mask_format": "polygon"}, "mask_format 'polygon'"),
                          ({"mask_threshold": 0.3}, "'mask_threshold'"),
                          ({"polygon_tolerance": 2.0}, "'polygon_tolerance'")):
        response = invoke(od_server, seed_request(image_files[:1], params))
        assert response.status_code == 400, response.text
        message = response.json()["message"]
        assert "this model does object-detection" in message and named in message, message
        assert "Traceback" not in message
