"""Faults: batch scoring killed with SIGKILL at random points three times in a row, then run to
the end, leaves exactly one record per input; a server whose model folder is missing or corrupt
never reports ready, and its log says why; `mlflow models serve` told to stop while a long
request runs exits within that request's deadline."""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import requests

from helpers import VENV_BIN, free_port
from hostile_cases import b64, encoded, picture
from mmdet_mlflow import servers

KILLS = 3
FILES = 7  # images; plus a two-row table and a file that is no image


def _batch_input(folder: Path) -> dict[tuple[str, int], bool]:
    """The input folder; returns the (file, row) records a complete run must hold."""
    folder.mkdir()
    expected = {}
    for i in range(FILES):
        (folder / f"img{i:02d}.png").write_bytes(encoded("PNG", picture(32 + 8 * i, 24, seed=i)))
        expected[(f"img{i:02d}.png", 0)] = True
    pd.DataFrame({"image": [b64(encoded("JPEG")), "%%%"]}).to_csv(folder / "table.csv", index=False)
    expected[("table.csv", 0)] = expected[("table.csv", 1)] = True
    (folder / "zz_notes.txt").write_text("no picture here")
    expected[("zz_notes.txt", 0)] = True
    return expected


def _complete_lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def test_batch_killed_three_times_then_completed_has_one_record_per_input(tmp_path, tiny_model_dir):
    """Each run is killed once the output has grown by a random number of records (the random
    points fixed by a seed, in records rather than seconds, so no timing decides the test):
    wherever in its writes (records, progress file, the next model pass) the run then is."""
    expected = _batch_input(tmp_path / "input")
    output = tmp_path / "out" / "predictions.jsonl"
    cmd = [sys.executable, "-m", "mmdet_mlflow.cli", "batch", "--model", str(tiny_model_dir),
           "--input", str(tmp_path / "input"), "--output", str(output), "--mini-batch-size", "1",
           "--max-detections", "2"]
    env = {**os.environ, "TQDM_DISABLE": "1"}
    rng = random.Random(11)
    growth = [rng.randrange(1, 3) for _ in range(KILLS)]  # records per run: 3 x 1-2 < 10
    kills = 0
    for grow in growth:
        target = _complete_lines(output) + grow
        process = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        deadline = time.monotonic() + 300
        while process.poll() is None and time.monotonic() < deadline and _complete_lines(output) < target:
            time.sleep(0.005)
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            kills += 1
        process.wait()
    final = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert final.returncode == 1, final.stdout[-2000:] + final.stderr[-3000:]  # the bad rows are errors
    assert kills == KILLS, "every run was killed before it finished"
    records = [json.loads(line) for line in output.read_text().splitlines()]  # every line is whole
    keys = [(r["file"], r["row"]) for r in records]
    assert sorted(keys) == sorted(expected), "exactly one record per input row"
    errors = {key for key, r in zip(keys, records) if r["error"]}
    assert errors == {("table.csv", 1), ("zz_notes.txt", 0)}
    assert all(r["prediction"] and len(r["prediction"]["boxes"]) <= 2 for r in records if not r["error"])


# --- readiness with a missing or corrupt model ---------------------------------------------------

def _broken_models(base: Path, tiny_model_dir: Path) -> dict[str, tuple[Path, str]]:
    """name -> (model folder, what the log must say)."""
    missing = base / "missing"
    missing.mkdir()
    corrupt = base / "corrupt"
    shutil.copytree(tiny_model_dir, corrupt)
    weights = corrupt / "model" / "weights.pth"
    weights.write_bytes(weights.read_bytes()[:1000])  # cut short, as by a failed copy
    return {"missing": (missing, "MLmodel"),
            "corrupt": (corrupt, r"weights.pth is not a readable PyTorch checkpoint \(corrupt or truncated\?\)")}


def _never_ready(cmd, probe: str, log: Path, env: dict, cwd=None, wait: float = 240) -> bool:
    """Start ``cmd`` and watch it until it exits or ``wait`` seconds pass: ``probe`` must never
    answer 200. Returns whether the server exited by itself (it is stopped either way)."""
    environment = {**os.environ, "PATH": f"{servers.python_bin_dir()}:{os.environ.get('PATH', '')}", **env}
    with open(log, "wb") as out:
        process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=cwd, env=environment,
                                   start_new_session=True)
    try:
        deadline = time.monotonic() + wait
        while process.poll() is None and time.monotonic() < deadline:
            try:
                status = requests.get(probe, timeout=5).status_code
            except requests.RequestException:
                status = None
            assert status != 200, f"{probe} answered 200 with a broken model; log:\n{log.read_text()[-3000:]}"
            time.sleep(0.5)
        return process.poll() is not None
    finally:
        servers.stop(process)


@pytest.mark.parametrize("broken", ["missing", "corrupt"])
def test_azmlinfsrv_with_a_broken_model_is_never_ready(tmp_path, tiny_model_dir, broken):
    model, reason = _broken_models(tmp_path, tiny_model_dir)[broken]
    app = servers.azure_app_folder(tmp_path / "app")
    port = free_port()
    log = tmp_path / "server.log"
    _never_ready(servers.azmlinfsrv_command(model, port), f"http://127.0.0.1:{port}/", log,
                 servers.azmlinfsrv_env(app), cwd=app, wait=90)
    text = log.read_text()
    assert re.search(reason, text), text[-3000:]


@pytest.mark.parametrize("broken", ["missing", "corrupt"])
def test_mlflow_serve_with_a_broken_model_exits_saying_why(tmp_path, tiny_model_dir, broken):
    model, reason = _broken_models(tmp_path, tiny_model_dir)[broken]
    port = free_port()
    log = tmp_path / "server.log"
    cmd = [str(VENV_BIN / "mlflow"), "models", "serve", "-m", str(model), "--env-manager", "local",
           "-h", "127.0.0.1", "-p", str(port), "-w", "1"]
    assert _never_ready(cmd, f"http://127.0.0.1:{port}/ping", log, {}), "it should exit, not linger unready"
    text = log.read_text()
    assert re.search(reason, text), text[-3000:]


def test_mlflow_serve_stops_on_sigterm_while_a_long_request_runs(tmp_path, tiny_model_dir):
    """Found 8: a request that ran for minutes kept `mlflow models serve` from stopping on
    SIGTERM (uvicorn waits for the requests it is answering). A request's work now stops at its
    deadline (MMDET_MLFLOW_REQUEST_TIMEOUT, 3 s here), so a server told to stop while a request
    of 64 full-size rows runs answers that request and exits within seconds."""
    import threading

    port = free_port()
    log = tmp_path / "server.log"
    cmd = [str(VENV_BIN / "mlflow"), "models", "serve", "-m", str(tiny_model_dir), "--env-manager", "local",
           "-h", "127.0.0.1", "-p", str(port), "-w", "1"]
    env = {"MMDET_MLFLOW_REQUEST_TIMEOUT": "3", "MMDET_MLFLOW_BATCH_SIZE": "1"}
    rows = [b64(encoded("JPEG", picture(640, 480, seed))) for seed in range(64)]
    body = {"dataframe_split": {"columns": ["image"], "data": [[row] for row in rows]},
            "params": {"score_threshold": 0.0, "max_detections": 100}}
    answers = []
    with servers.serve(cmd, f"http://127.0.0.1:{port}/ping", log, env=env, timeout=300) as process:
        sender = threading.Thread(target=lambda: answers.append(
            requests.post(f"http://127.0.0.1:{port}/invocations", json=body, timeout=120)))
        sender.start()
        time.sleep(1.5)  # the request is being scored
        assert sender.is_alive(), "the request should still be running"
        told = time.monotonic()
        os.killpg(process.pid, signal.SIGTERM)  # what servers.stop and a container stop send
        process.wait(timeout=60)  # the mlflow command; uvicorn, its child, answers first
        while _group_alive(process.pid):
            assert time.monotonic() - told < 60, f"still running 60 s after SIGTERM:\n{log.read_text()[-3000:]}"
            time.sleep(0.1)
        stopped = time.monotonic() - told
        sender.join(timeout=60)
    assert answers and answers[0].status_code == 400, answers and answers[0].text[:1000]
    assert "took longer than 3 s (MMDET_MLFLOW_REQUEST_TIMEOUT)" in answers[0].json()["message"]
    print(f"stopped {stopped:.1f} s after SIGTERM")


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True
