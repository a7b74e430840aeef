"""A short load run against both servers (bench/load.py runs the long one): 40 requests, 4 at a
time, good and bad mixed, with different params per request; no connection error, no 5xx, every
bad request a 4xx, every good answer exactly the one the same request got alone."""
from __future__ import annotations

import shutil

import pytest

from helpers import VENV_BIN, free_port
from load_harness import Server, busy_seconds_after, run_load
from mmdet_mlflow import servers


@pytest.fixture(scope="module", params=["mlflow-serve", "azmlinfsrv"])
def server(request, tiny_model_dir, tmp_path_factory):
    base = tmp_path_factory.mktemp(request.param)
    port = free_port()
    log = base / "server.log"
    if request.param == "mlflow-serve":
        cmd = [str(VENV_BIN / "mlflow"), "models", "serve", "-m", str(tiny_model_dir), "--env-manager",
               "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1"]
        with servers.serve(cmd, f"http://127.0.0.1:{port}/ping", log, timeout=300) as process:
            yield Server(request.param, f"http://127.0.0.1:{port}/invocations", process.pid)
    else:
        app = servers.azure_app_folder(base / "app")
        shutil.copytree(tiny_model_dir, base / "models" / "tiny")
        with servers.serve(servers.azmlinfsrv_command(base / "models", port), f"http://127.0.0.1:{port}/",
                           log, cwd=app, env=servers.azmlinfsrv_env(app), timeout=300) as process:
            yield Server(request.param, f"http://127.0.0.1:{port}/score", process.pid)


def test_concurrent_mixed_requests_get_their_own_answers(server):
    """Three of the bad requests are over the work budget: refused before any pass (a 400 naming
    the budget), and no worker is still working once the load has been answered (bench/load.py
    measures what they cost the good requests' latency)."""
    outcome = run_load(server, total=40, concurrency=4, distinct_good=4, seed=3, over_budget=3)
    print(f"{server.name}: {outcome.summary()}")
    assert outcome.connection_errors == []
    assert outcome.server_errors == []
    assert outcome.unexpected == []
    assert outcome.wrong_answers == []
    assert len(outcome.latencies) == 40
    assert outcome.over_budget_statuses == [400, 400, 400]
    idle = busy_seconds_after(server.pid)
    assert idle < 1.0, f"the server used {idle:.1f} s of CPU in the 3 s after the load"
