"""The work one request or picture may cost (scoring.work): refused before any pass when it can
be counted (a tiled merge over its budget), stopped at a deadline when it cannot (before the
server's own timeout, on every server), no mask work at all for ``mask_format`` "none", and a
batch job's picture past its deadline written as an error row while the job goes on."""
from __future__ import annotations

import time

import numpy as np
import pytest
import requests

from helpers import VENV_BIN, free_port, scene_image
from hostile_cases import b64, encoded, picture
from load_harness import busy_seconds_after
from mmdet_mlflow import servers
from scoring.errors import InputError
from scoring.runner import score_images

# 64 rows of a picture in an 8x8 grid: 4160 passes of the network, minutes on any CPU, while
# the merge budget (65 x 100 detections a picture) lets it through.
LONG_ROWS = 64
LONG_PARAMS = {"tile_grid_size": "8x8", "max_detections": 100, "mask_format": "none"}


@pytest.fixture(scope="module")
def runtimes(tiny_model_dir, tiny_onnx_model_dir):
    import mlflow_model

    return {"torch": mlflow_model.load_predictor(tiny_model_dir / "model", device="cpu"),
            "onnx": mlflow_model.load_predictor(tiny_onnx_model_dir / "model", device="cpu")}


def counting_passes(predictor) -> list:
    passes = []
    original = predictor.forward
    predictor.forward = lambda batch, params: passes.append(1) or original(batch, params)
    return passes


@pytest.mark.parametrize("runtime", ["torch", "onnx"])
def test_a_tiled_picture_over_the_merge_budget_is_refused_before_any_pass(runtimes, runtime):
    predictor = runtimes[runtime]
    passes = counting_passes(predictor)
    try:
        image = np.zeros((2000, 2000, 3), np.uint8)
        params = {"tile_grid_size": "8x8", "max_detections": 1000, "score_threshold": 0.0,
                  "mask_format": "none"}
        with pytest.raises(InputError) as refused:
            list(score_images(predictor, [("big", image)], params, decode=lambda key, value: value))
    finally:
        del predictor.forward
    message = str(refused.value)
    assert message.startswith("row big: ")
    assert "65 passes x max_detections 1000 = 65000" in message
    assert "MMDET_MLFLOW_MAX_TILE_CANDIDATES" in message
    assert "lower max_detections" in message and "coarser tile_grid_size" in message
    assert passes == []


def test_the_merge_budget_is_a_setting(runtimes, monkeypatch):
    image = scene_image(640, 480, 1)
    params = {"tile_grid_size": "2x2", "max_detections": 20}
    monkeypatch.setenv("MMDET_MLFLOW_MAX_TILE_CANDIDATES", "99")
    with pytest.raises(InputError, match=r"5 passes x max_detections 20 = 100 .* limit of 99"):
        list(score_images(runtimes["onnx"], [(0, image)], params, decode=lambda key, value: value))
    monkeypatch.setenv("MMDET_MLFLOW_MAX_TILE_CANDIDATES", "100")
    assert list(score_images(runtimes["onnx"], [(0, image)], params, decode=lambda key, value: value))[0].ok


@pytest.mark.parametrize("runtime", ["torch", "onnx"])
def test_mask_format_none_makes_no_mask_work(runtimes, runtime):
    """No mask logits and no masks: the detections carry none, and the boxes, scores and labels
    are those of the same request with masks."""
    predictor = runtimes[runtime]
    image = scene_image(640, 480, 2)
    params = {"score_threshold": 0.05, "max_detections": 30}
    with_masks = next(score_images(predictor, [(0, image)], params, keep_images=True,
                                   decode=lambda key, value: value))
    without = next(score_images(predictor, [(0, image)], {**params, "mask_format": "none"},
                                keep_images=True, decode=lambda key, value: value))
    assert without.detections.masks is None and with_masks.detections.masks is not None
    assert len(without.detections) == len(with_masks.detections) > 0
    np.testing.assert_array_equal(without.detections.boxes, with_masks.detections.boxes)
    np.testing.assert_array_equal(without.detections.labels, with_masks.detections.labels)
    assert [{k: v for k, v in box.items() if k != "polygon"} for box in with_masks.response["boxes"]] == \
        without.response["boxes"]


def test_a_batch_job_writes_an_error_row_for_a_picture_past_its_deadline(runtimes, tmp_path, monkeypatch):
    """Each picture of a batch job has its own deadline: one past it is an error row naming the
    setting, and the job goes on to the next picture."""
    from scoring.batch_files import score_files

    files = []
    for i in range(3):
        path = tmp_path / f"p{i}.png"
        path.write_bytes(encoded("PNG", picture(320, 240, i)))
        files.append(path)
    monkeypatch.setenv("MMDET_MLFLOW_BATCH_PICTURE_TIMEOUT", "0.000001")
    records = list(score_files(runtimes["onnx"], files, {"tile_grid_size": "2x2"}))
    assert [r["file"] for r in records] == ["p0.png", "p1.png", "p2.png"]
    for record in records:
        assert record["prediction"] is None
        assert "the picture took longer than 1e-06 s (MMDET_MLFLOW_BATCH_PICTURE_TIMEOUT)" in record["error"]
    monkeypatch.delenv("MMDET_MLFLOW_BATCH_PICTURE_TIMEOUT")
    records = list(score_files(runtimes["onnx"], files, {"tile_grid_size": "2x2"}))
    assert all(r["error"] is None for r in records)


def test_a_served_request_stops_before_the_servers_own_timeout(monkeypatch):
    """The request deadline follows the server's timeout where one is known (MLflow's scoring
    server, 60 s unless MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT says otherwise; azmlinfsrv's
    SCORING_TIMEOUT_MS), and MMDET_MLFLOW_REQUEST_TIMEOUT where it is shorter."""
    import sys

    from scoring.work import request_seconds

    monkeypatch.delenv("MMDET_MLFLOW_REQUEST_TIMEOUT", raising=False)
    monkeypatch.delenv("SCORING_TIMEOUT_MS", raising=False)
    monkeypatch.delitem(sys.modules, "mlflow.pyfunc.scoring_server", raising=False)
    assert request_seconds() == (60.0, "MMDET_MLFLOW_REQUEST_TIMEOUT")
    monkeypatch.setenv("SCORING_TIMEOUT_MS", "10000")
    assert request_seconds() == (7.0, "before the server's 10 s timeout, SCORING_TIMEOUT_MS")
    monkeypatch.setenv("MMDET_MLFLOW_REQUEST_TIMEOUT", "5")
    assert request_seconds() == (5.0, "MMDET_MLFLOW_REQUEST_TIMEOUT")
    monkeypatch.setenv("SCORING_TIMEOUT_MS", "90000")  # an Azure deployment's 90 s: 15 % margin
    monkeypatch.delenv("MMDET_MLFLOW_REQUEST_TIMEOUT")
    assert request_seconds() == (60.0, "MMDET_MLFLOW_REQUEST_TIMEOUT")
    monkeypatch.setenv("MMDET_MLFLOW_REQUEST_TIMEOUT", "100")
    assert request_seconds() == (76.5, "before the server's 90 s timeout, SCORING_TIMEOUT_MS")
    monkeypatch.delenv("SCORING_TIMEOUT_MS")
    monkeypatch.delenv("MMDET_MLFLOW_REQUEST_TIMEOUT")
    import mlflow.pyfunc.scoring_server  # noqa: F401  (what a `mlflow models serve` worker has)

    assert request_seconds() == (51.0, "before the server's 60 s timeout, MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT")
    monkeypatch.setenv("MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT", "300")
    assert request_seconds() == (60.0, "MMDET_MLFLOW_REQUEST_TIMEOUT")


def long_request() -> dict:
    rows = [b64(encoded("JPEG", picture(640, 480, seed))) for seed in range(LONG_ROWS)]
    return {"dataframe_split": {"columns": ["image"], "data": [[row] for row in rows]},
            "params": LONG_PARAMS}


# The servers' own timeout in the long-request test: work stops a margin before it (at least 3 s,
# scoring.work.before_timeout), the same margin at 12 s as at 20, and the request runs until then.
SERVER_TIMEOUT = 12


@pytest.mark.parametrize("server", ["mlflow-serve", "azmlinfsrv"])
def test_a_long_request_is_answered_before_the_servers_timeout_and_frees_its_worker(
        server, tiny_model_dir, tmp_path):
    """A request of 4160 tiled passes against a server whose own timeout is 12 s: our 400
    (naming the server's timeout and what to change) comes before the server's 504 or error;
    afterwards the worker is idle (its work stopped, not left running behind the answer) and
    answers a good request."""
    import shutil

    port = free_port()
    log = tmp_path / "server.log"
    if server == "mlflow-serve":
        cmd = [str(VENV_BIN / "mlflow"), "models", "serve", "-m", str(tiny_model_dir), "--env-manager",
               "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1", "-t", str(SERVER_TIMEOUT)]
        route, health, env, cwd = "/invocations", "/ping", {}, None
        timeout_env = "MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT"
    else:
        app = servers.azure_app_folder(tmp_path / "app")
        model_root = tmp_path / "azureml-models" / "tiny" / "1"
        shutil.copytree(tiny_model_dir, model_root / "model")
        cmd = servers.azmlinfsrv_command(model_root, port)
        route, health, cwd = "/score", "/", app
        env = {**servers.azmlinfsrv_env(app), "SCORING_TIMEOUT_MS": str(SERVER_TIMEOUT * 1000)}
        timeout_env = "SCORING_TIMEOUT_MS"
    url = f"http://127.0.0.1:{port}"
    with servers.serve(cmd, url + health, log, env=env, cwd=cwd, timeout=300) as process:
        body = long_request()
        if server == "azmlinfsrv":
            body = {"input_data": body["dataframe_split"], "params": body["params"]}
        sent = time.monotonic()
        answer = requests.post(url + route, json=body, timeout=120)
        took = time.monotonic() - sent
        assert answer.status_code == 400, (answer.status_code, answer.text[:1000])
        message = answer.json()["message"]
        assert f"before the server's {SERVER_TIMEOUT} s timeout, {timeout_env}" in message, message
        assert "coarser tile_grid_size" in message
        assert took < SERVER_TIMEOUT, f"answered after {took:.1f} s, not before the server's {SERVER_TIMEOUT} s"
        idle = busy_seconds_after(process.pid)
        assert idle < 1.0, f"the server used {idle:.1f} s of CPU in the 3 s after answering"
        good = {"dataframe_split": {"columns": ["image"], "data": [[b64(encoded("PNG", picture()))]]},
                "params": {"max_detections": 2}}
        if server == "azmlinfsrv":
            good = {"input_data": good["dataframe_split"], "params": good["params"]}
        again = requests.post(url + route, json=good, timeout=60)
        assert again.status_code == 200, again.text[:1000]
        print(f"{server}: answered the long request in {took:.1f} s; {idle:.2f} s CPU in the 3 s after")


def test_spark_batch_scoring_writes_an_error_row_for_a_picture_past_its_deadline(
        tiny_onnx_model_dir, monkeypatch):
    """spark-batch's scoring function (what each Spark task runs over its Arrow batches) gives
    each picture the same deadline as a batch job: an error row naming the setting, and the
    batch's other rows still come back."""
    import pandas as pd

    from mmdet_mlflow.spark_batch import score_pictures

    contents = [encoded("PNG", picture(320, 240, i)) for i in range(2)]
    batch = pd.DataFrame({"path": ["file:/in/a.png", "file:/in/b.png"], "length": [len(c) for c in contents],
                          "content": contents, "modificationTime": pd.to_datetime([0, 0])})
    monkeypatch.setenv("MMDET_MLFLOW_BATCH_PICTURE_TIMEOUT", "0.000001")
    rows = pd.concat(score_pictures(iter([batch]), str(tiny_onnx_model_dir), {"tile_grid_size": "2x2"},
                                    max_file_bytes=10 ** 6))
    assert list(rows["path"]) == ["file:/in/a.png", "file:/in/b.png"]
    assert rows["boxes"].isna().all()
    assert all("took longer than 1e-06 s (MMDET_MLFLOW_BATCH_PICTURE_TIMEOUT)" in e for e in rows["error"])
