"""Starting and stopping the servers a model runs under, on this machine: ``mlflow models
serve`` and Azure's inference server (``azmlinfsrv``) with our online entry script. One
launcher for the demo, ``mmdet-mlflow serve`` and the tests.

A server runs in its own process group (so a Ctrl-C meant for us does not reach it half-way and
stopping it stops its workers too), bound to 127.0.0.1, with its output in a log file; it is
waited for until its health route answers, and stopped (the whole group, SIGTERM then SIGKILL)
however the ``with`` block ends.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

from scoring.errors import MmdetMlflowError

# azmlinfsrv binds 0.0.0.0 by default; we run the same entry point bound to 127.0.0.1.
AZMLINFSRV_ON_LOOPBACK = ("import sys; from azureml_inference_server_http import amlserver; "
                          "amlserver.DEFAULT_HOST = '127.0.0.1'; sys.argv[0] = 'azmlinfsrv'; amlserver.run()")


class ServerError(MmdetMlflowError, RuntimeError):
    """A server exited or did not answer in time; the message ends with its log's tail."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def python_bin_dir() -> str:
    """The folder of this Python's scripts: MLflow starts ``uvicorn`` by name, so it must be on
    PATH even when the venv is not activated."""
    return str(Path(sys.executable).parent)


def mlflow_serve_command(model_uri: str, port: int, workers: int = 1) -> list[str]:
    return [sys.executable, "-m", "mlflow", "models", "serve", "-m", str(model_uri),
            "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-w", str(workers)]


def azmlinfsrv_command(model_dir: str | os.PathLike, port: int, entry_script: str = "score.py") -> list[str]:
    return [sys.executable, "-c", AZMLINFSRV_ON_LOOPBACK, "--entry_script", entry_script,
            "--model_dir", str(model_dir), "--port", str(port)]


def azure_app_folder(folder: Path) -> Path:
    """A folder holding our online entry script, as Azure uploads it (scoring/azureml)."""
    import scoring.azureml

    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(Path(scoring.azureml.__file__).with_name("score.py"), folder / "score.py")
    return folder


def azmlinfsrv_env(app: Path, workers: int = 1) -> dict:
    # PYTHONPATH cleared: the entry script must load the model's own code/, not this checkout.
    return {"AML_APP_ROOT": str(app), "WORKER_COUNT": str(workers), "PYTHONPATH": ""}


def wait_until_healthy(url: str, process: subprocess.Popen, timeout: float, log_path: Path) -> None:
    import requests

    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise ServerError(f"the server exited with {process.returncode} before answering "
                              f"{url}; {log_path}:\n{_tail(log_path)}")
        with contextlib.suppress(requests.RequestException):
            if requests.get(url, timeout=2).status_code == 200:
                return
        if time.monotonic() > deadline:
            raise ServerError(f"{url} did not answer within {timeout:g} s; {log_path}:\n{_tail(log_path)}")
        time.sleep(0.5)


@contextlib.contextmanager
def serve(cmd: list[str], health_url: str, log_path: str | os.PathLike, cwd=None, env=None,
          timeout: float = 300) -> Iterator[subprocess.Popen]:
    """Run ``cmd`` as a server until the ``with`` block ends (see the module docstring)."""
    log_path = Path(log_path)
    environment = {**os.environ, "PATH": f"{python_bin_dir()}:{os.environ.get('PATH', '')}", **(env or {})}
    with open(log_path, "wb") as log:
        process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=cwd,
                                   env=environment, start_new_session=True)
        try:
            wait_until_healthy(health_url, process, timeout, log_path)
            yield process
        finally:
            stop(process)


def stop(process: subprocess.Popen, grace: float = 20) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def _tail(path: Path, size: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-size:]
    except OSError:
        return "(no log)"
