"""scoring/azureml/score.py under the real Azure ML inference server (azureml-inference-server-http),
laid out as Azure lays it out: the script alone in the app folder, the MLflow model mounted a
few folders down AZUREML_MODEL_DIR, and none of this project on the path (the model's own
code/ is all the script gets)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import requests

from helpers import assert_object_detection_answers, b64, free_port, running
from mmdet_mlflow import servers

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def image_server(image_files):
    """The test images over HTTP on 127.0.0.1 (allow-listed for the scoring server)."""
    import functools
    import http.server
    import threading

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(image_files[0].parent))
    handler.log_message = lambda *args: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def _azure_served(tmp_path_factory, model_dir):
    base = tmp_path_factory.mktemp("azure-online")
    # azmlinfsrv always binds 0.0.0.0 (DEFAULT_HOST); the tests run the very same entry point,
    # amlserver.run(), with the host set to 127.0.0.1 so that nothing listens beyond this machine.
    app = servers.azure_app_folder(base / "app")
    model_root = base / "azureml-models" / "rtmdet-ins-tiny" / "1"  # as Azure mounts it
    shutil.copytree(model_dir, model_root / "tiny-model")
    port = free_port()
    log = base / "server.log"
    with running(servers.azmlinfsrv_command(model_root, port), f"http://127.0.0.1:{port}/", log, cwd=app,
                 env={**servers.azmlinfsrv_env(app), "MMDET_MLFLOW_URL_ALLOWLIST": "127.0.0.1/32"}):
        log_when_healthy = log.read_text()  # running() returned: GET / has answered 200
        yield f"http://127.0.0.1:{port}", log, model_root / "tiny-model", log_when_healthy


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model_dir):
    yield from _azure_served(tmp_path_factory, tiny_model_dir)


@pytest.fixture(scope="module")
def od_server(tmp_path_factory, tiny_od_model_dir):
    """The object-detection test model under the same server and entry script."""
    yield from _azure_served(tmp_path_factory, tiny_od_model_dir)


def _seed_request(image_files, **extra) -> dict:
    return {"input_data": {"columns": ["image"], "index": [0, 1],
                           "data": [b64(p) for p in image_files]}, **extra}


@pytest.fixture(scope="module")
def pyfunc(tiny_model_dir):
    import mlflow

    return mlflow.pyfunc.load_model(str(tiny_model_dir))


@pytest.fixture(scope="module")
def expected_default(pyfunc, image_files) -> list:
    """The pyfunc's answer for the two test images with the model's default params."""
    return _expected(pyfunc, image_files)


def _expected(pyfunc, image_files, params=None) -> list:
    """What the model's pyfunc answers (as under mlflow models serve)."""
    frame = pd.DataFrame({"image": [b64(p) for p in image_files]})
    return pyfunc.predict(frame, params=params).to_dict(orient="records")


def test_liveness_and_readiness_routes(server):
    """Azure probes GET / for both liveness and readiness: it must answer only once init() has
    loaded the model (the worker accepts connections after init), then stay healthy."""
    url, _, _, log_when_healthy = server
    assert "model loaded; scoring code from" in log_when_healthy
    assert "Users's init has completed successfully" in log_when_healthy
    live = requests.get(f"{url}/", timeout=10)
    assert live.status_code == 200 and live.text == "Healthy"


def test_seed_request_gives_the_seed_response(server, image_files, expected_default):
    url, log, model_dir, _ = server
    response = requests.post(f"{url}/score", json=_seed_request(image_files), timeout=120)
    assert response.status_code == 200, response.text
    body = response.json()
    assert isinstance(body, list) and len(body) == 2
    assert body == expected_default
    assert any(body[i]["boxes"] for i in range(2)), "the tiny model should find something"
    for entry in body:
        assert set(entry) == {"boxes"}
        for det in entry["boxes"]:
            assert set(det) == {"box", "label", "score", "polygon"}
            assert set(det["box"]) == {"topX", "topY", "bottomX", "bottomY"}
            assert all(0.0 <= v <= 1.0 for v in det["box"].values())
    # the script used the model's own code, found two folders down AZUREML_MODEL_DIR
    assert f"scoring code from {model_dir / 'code'}" in log.read_text()


def test_params_and_dataframe_split(server, image_files, pyfunc):
    url = server[0]
    params = {"score_threshold": 0.6, "max_detections": 3}
    response = requests.post(f"{url}/score", json=_seed_request(image_files, params=params), timeout=120)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body == _expected(pyfunc, image_files, params)
    assert all(len(e["boxes"]) <= 3 and all(d["score"] >= 0.6 for d in e["boxes"]) for e in body)
    split = {"dataframe_split": {"columns": ["image"], "index": [0, 1],
                                 "data": [[b64(p)] for p in image_files]}, "params": params}
    assert requests.post(f"{url}/score", json=split, timeout=120).json() == body


def test_a_large_request_is_read_whole(server, tmp_path, pyfunc):
    """A multi-megabyte body (a noisy 1600x1200 PNG, ~7 MB of base64) arrives complete."""
    import numpy as np

    from helpers import write_png

    noise = np.random.default_rng(0).integers(0, 255, (1200, 1600, 3), dtype=np.uint8)
    big = write_png(tmp_path / "big.png", noise)
    url = server[0]
    params = {"max_detections": 2}  # the size is the point, not the masks of a noise picture
    body = {"input_data": {"columns": ["image"], "index": [0], "data": [b64(big)]}, "params": params}
    assert len(json.dumps(body)) > 5_000_000
    response = requests.post(f"{url}/score", json=body, timeout=300)
    assert response.status_code == 200, response.text
    assert response.json() == _expected(pyfunc, [big], params)


def test_image_urls_from_an_allow_listed_host(server, image_server, image_files, expected_default):
    url = server[0]
    request = {"input_data": {"columns": ["image"], "index": [0, 1],
                              "data": [f"{image_server}/{image_files[0].name}", b64(image_files[1])]}}
    response = requests.post(f"{url}/score", json=request, timeout=120)
    assert response.status_code == 200, response.text
    assert response.json() == expected_default
    request["input_data"]["data"][0] = f"{image_server}/missing.png"
    response = requests.post(f"{url}/score", json=request, timeout=120)
    assert response.status_code == 400 and response.json()["message"].startswith("row 0: fetching")
    assert "HTTP 404" in response.json()["message"]


@pytest.mark.parametrize("body, message", [
    ("not json", "not valid JSON"),
    ("[1, 2]", "must be a JSON object"),
    ("{}", "exactly one of 'input_data' or 'dataframe_split'"),
    (json.dumps({"input_data": {"columns": ["image"], "data": []}}), "non-empty list"),
    (json.dumps({"input_data": {"columns": ["x"], "data": ["a"]}}), "must be a list of distinct names that includes 'image'"),
    (json.dumps({"input_data": {"columns": ["image"], "index": [5, 6], "data": ["aGVsbG8=", 7]}}),
     "row 6: the 'image' value must be a base64 string"),
    (json.dumps({"input_data": {"columns": ["image"], "index": [3], "data": ["%%%"]}}),
     "row 3: not valid base64"),
    (json.dumps({"input_data": {"columns": ["image"], "index": [0, 1], "data": ["aGVsbG8=", "x"]}}),
     "row 0: not an image"),
    (json.dumps({"input_data": {"data": ["http://169.254.169.254/latest/meta-data/"]}}),
     "row 0: refusing to fetch .*link-local"),
    (json.dumps({"input_data": {"data": ["http://10.0.0.7/cat.png"]}}), "row 0: refusing .*private"),
    (json.dumps({"input_data": {"data": ["aGVsbG8="]}, "params": {"score_threshold": 7}}),
     "score_threshold' must be between 0.0 and 1.0"),
    (json.dumps({"input_data": {"data": ["aGVsbG8="]}, "params": {"score_threshold": "high"}}),
     "score_threshold"),
    (json.dumps({"input_data": {"data": ["aGVsbG8="]}, "params": [1]}), "'params' must be a JSON object"),
])
def test_malformed_requests_get_400_naming_the_problem(server, body, message):
    import re

    url = server[0]
    response = requests.post(f"{url}/score", data=body, headers={"Content-Type": "application/json"},
                             timeout=60)
    assert response.status_code == 400, response.text
    text = response.json()["message"]
    assert re.search(message, text), text
    assert "Traceback" not in text


def test_oversized_request_is_refused_before_reading(server, monkeypatch):
    from scoring import settings

    url = server[0]
    # a declared length over the limit is refused without sending (or reading) the body
    import http.client

    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.putrequest("POST", "/score")
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Content-Length", str(settings.MAX_REQUEST_BYTES.value() + 1))
    conn.endheaders()
    response = conn.getresponse()
    assert response.status == 413
    assert "MMDET_MLFLOW_MAX_REQUEST_BYTES" in json.loads(response.read())["message"]
    conn.close()


def test_get_is_not_allowed(server):
    url = server[0]
    response = requests.get(f"{url}/score", timeout=30)
    assert response.status_code == 405 and "POST" in response.json()["message"]


def test_find_model_dir(tmp_path):
    from scoring.azureml.score import find_model_dir

    (tmp_path / "MLmodel").write_text("")
    assert find_model_dir(tmp_path) == tmp_path
    deeper = tmp_path / "deep"
    for version in ("1", "2"):
        (deeper / "name" / version / "model").mkdir(parents=True)
        (deeper / "name" / version / "model" / "MLmodel").write_text("")
    with pytest.raises(RuntimeError, match="2 MLflow models .*deploy one"):
        find_model_dir(deeper)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no MLflow model"):
        find_model_dir(tmp_path / "empty")


def test_an_object_detection_model_answers_boxes_and_refuses_mask_params_naming_its_task(
        od_server, image_files):
    url = od_server[0]
    response = requests.post(f"{url}/score", json=_seed_request(image_files), timeout=120)
    assert response.status_code == 200, response.text
    assert_object_detection_answers(response.json())
    for params, named in (({"mask_format": "rle"}, "mask_format 'rle'"),
                          ({"mask_threshold": 0.3}, "'mask_threshold'")):
        response = requests.post(f"{url}/score", json=_seed_request(image_files, params=params), timeout=120)
        assert response.status_code == 400, response.text
        message = response.json()["message"]
        assert "this model does object-detection" in message and named in message, message
        assert "Traceback" not in message
