"""`mmdet-mlflow serve` (the README's serve command) stops its server however it is stopped.
Ctrl-C is what tests/test_readme.py sends; here `kill` (SIGTERM), which used to end the command
and leave the server it had started running in its own session, holding the port."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from helpers import free_port, wait_until_closed
from mmdet_mlflow.servers import wait_until_healthy


def test_sigterm_stops_the_served_model_too(tmp_path, tiny_model_dir):
    port = free_port()
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        command = subprocess.Popen([sys.executable, "-m", "mmdet_mlflow.cli", "serve", "--model",
                                    str(tiny_model_dir), "--port", str(port), "--log", str(tmp_path / "server.log")],
                                   stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
        wait_until_healthy(f"http://127.0.0.1:{port}/ping", command, timeout=300, log_path=log)
        command.send_signal(signal.SIGTERM)
        assert command.wait(timeout=60) != 0
    finally:
        if command.poll() is None:
            command.kill()
    if not wait_until_closed(port):
        stop_orphans(port)
        raise AssertionError(f"the server outlived `mmdet-mlflow serve`; {log}:\n{log.read_text()[-2000:]}")


def stop_orphans(port: int) -> None:
    """Kill what a failed run left listening on ``port`` (the server's own process group)."""
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if f"-p\0{port}\0".encode() in (proc / "cmdline").read_bytes():
                os.killpg(os.getpgid(int(proc.name)), signal.SIGKILL)
        except (OSError, ProcessLookupError):
            pass
