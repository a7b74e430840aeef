"""The README's shell blocks, run as written (its serve command had once failed for
every new user while the suite passed).

Every ```bash block of README.md runs, in the README's order, with bash in a scratch folder that
looks like a fresh checkout after `make setup` (`.venv` and the folders the commands read are
symlinked in), with the environment a user's shell has: the venv not on PATH, no MLflow
variables. What the test changes is listed below, each with its reason, and each replaced text
must still be in the README: the README cannot drift from the code, nor from this list.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from helpers import free_port, wait_until_closed
from mmdet_mlflow.servers import wait_until_healthy

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
VENV = Path(sys.executable).parent.parent     # the venv the suite runs in: the checkout's .venv
FOLDERS_THE_COMMANDS_READ = ("pipelines", "components")

# (text in the README, what runs instead, why). {checkpoint} and {port} are filled in below.
SUBSTITUTIONS = [
    ("--num-images 300", "--num-images 8", "a small synthetic set"),
    ("--recipe quick-cpu", "--recipe quick-cpu --max-steps 2 --image-size 128 --training-batch-size 2 "
                           "--validation-batch-size 2 --warmup-steps 1", "two training steps, not ten minutes"),
    ("rtmdet-ins_x_8xb16-300e_coco --checkpoint official",
     "rtmdet-ins_tiny_8xb32-300e_coco --checkpoint {checkpoint}",
     "'official' downloads 400 MB: a tiny checkpoint in the published format instead"),
    ("rtmdet_tiny_8xb32-300e_coco --checkpoint official",
     "rtmdet_tiny_8xb32-300e_coco --checkpoint {od_checkpoint}",
     "the object detector's official weights download too: its tiny checkpoint in the published format"),
    ("sqlite:///outputs/demo/mlflow.db --port 5001", "sqlite:///mlflow.db --port {port}",
     "the demo does not run here: the store of the README's own fine-tune stands in"),
    ("127.0.0.1:5000", "127.0.0.1:{port}", "a free port: other test runs may share the machine"),
    ("--port 5000", "--port {port}", "the same free port"),
    ("-p 5000", "-p {port}", "the same free port"),
]

# Blocks not run here, by their first line, and why.
NOT_RUN = {
    "make demo": "`make demo` is the 20-minute main job (tests/test_demo.py runs it reduced) and "
                 "`make test` the suite this test is part of",
}

# Commands that serve until Ctrl-C: started in the background, waited for, probed, then stopped
# with SIGINT as a user's Ctrl-C does; the port must be free afterwards. A model server is probed
# with the README's own request (the block that posts to /invocations); the MLflow UI with its
# REST API, for the experiment the README says the fine-tune run is in.
MODEL_SERVERS = (".venv/bin/mmdet-mlflow serve", "mlflow models serve")
MLFLOW_UI = ".venv/bin/mlflow ui"
REQUEST_BLOCK_MARK = "/invocations"
FINETUNE_EXPERIMENT = "mmdet-mlflow-finetune"

# What the README says the commands write (each file or folder named in it), checked after they ran.
OUTPUTS = ["data/fridge/preview.png", "runs/tiny-fridge/mlflow_model_folder/MLmodel",
           "runs/tiny-fridge/training_curves.png", "evaluation/metrics.json", "evaluation/samples.png",
           "predictions.jsonl", "annotated", "mlflow.db", "mlruns", "models/rtmdet-x/MLmodel"]


def bash_blocks(markdown: str) -> list[str]:
    return [block.strip("\n") for block in re.findall(r"^```bash\n(.*?)^```", markdown, re.S | re.M)]


def substituted(blocks: list[str], values: dict) -> list[str]:
    for readme_text, test_text, why in SUBSTITUTIONS:
        assert any(readme_text in block for block in blocks), \
            f"the README no longer has {readme_text!r} (substituted: {why}); update SUBSTITUTIONS"
        blocks = [block.replace(readme_text, test_text.format(**values)) for block in blocks]
    return blocks


def user_environment() -> dict:
    """A shell's environment as a user has it: the venv not on PATH (a bug seen once: MLflow
    starts uvicorn by name), no MLflow run or store chosen (the suite's conftest chooses one).
    PYTHONPATH names this checkout, so its code runs even where the venv was built by another
    checkout (a git worktree sharing one venv); in a fresh clone that changes nothing."""
    venv_bin = (VENV / "bin").resolve()
    path = [p for p in os.environ.get("PATH", "").split(os.pathsep) if p and Path(p).resolve() != venv_bin]
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("MLFLOW_") and k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    return {**env, "PATH": os.pathsep.join(path), "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}


def run_block(block: str, cwd: Path, env: dict, timeout: float = 900) -> str:
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=cwd, env=env, text=True,
                          capture_output=True, timeout=timeout)
    assert done.returncode == 0, f"$ {block}\nexit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def serve_block(block: str, cwd: Path, env: dict, port: int, health: str, probe) -> None:
    """Run a server block in the background until it answers, probe it, Ctrl-C it."""
    log_path = cwd / f"server-{time.monotonic_ns()}.log"
    with open(log_path, "wb") as log:
        server = subprocess.Popen(["bash", "-euo", "pipefail", "-c", block], cwd=cwd, env=env,
                                  stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until_healthy(f"http://127.0.0.1:{port}{health}", server, timeout=300, log_path=log_path)
        probe()
    finally:
        os.killpg(server.pid, signal.SIGINT)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
            pytest.fail(f"$ {block}\ndid not stop on Ctrl-C; {log_path}:\n{log_path.read_text()[-3000:]}")
    assert wait_until_closed(port), f"$ {block}\nleft a server on port {port} after Ctrl-C"


def test_every_readme_block_runs_as_written(tmp_path, tiny_checkpoint, tiny_od_checkpoint):
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    (checkout / ".venv").symlink_to(VENV)
    for name in FOLDERS_THE_COMMANDS_READ:
        (checkout / name).symlink_to(ROOT / name)
    port = free_port()
    readme = README.read_text()
    blocks = substituted(bash_blocks(readme), {"checkpoint": tiny_checkpoint, "od_checkpoint": tiny_od_checkpoint,
                                                 "port": port})
    env = user_environment()

    for first_line in NOT_RUN:
        assert any(block.startswith(first_line) for block in blocks), f"no README block starts {first_line!r}"
    requests_blocks = [block for block in blocks if REQUEST_BLOCK_MARK in block]
    assert len(requests_blocks) == 1, "expected one README block that asks a model server"
    request_block = requests_blocks[0]

    def ask_model_server():
        answer = json.loads(run_block(request_block, checkout, env))
        assert len(answer["predictions"]) == 1 and isinstance(answer["predictions"][0]["boxes"], list)

    assert FINETUNE_EXPERIMENT in readme, "the README no longer says where the fine-tune run is"

    def look_at_mlflow_ui():
        found = requests.get(f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/search",
                             params={"max_results": 100}, timeout=30)
        assert found.status_code == 200, found.text
        assert FINETUNE_EXPERIMENT in [e["name"] for e in found.json()["experiments"]]

    servers_seen = set()
    for block in blocks:
        started = time.monotonic()
        if any(block.startswith(first_line) for first_line in NOT_RUN) or block == request_block:
            continue
        model_server = next((cmd for cmd in MODEL_SERVERS if cmd in block), None)
        if model_server:
            serve_block(block, checkout, env, port, "/ping", ask_model_server)
            servers_seen.add(model_server)
        elif MLFLOW_UI in block:
            serve_block(block, checkout, env, port, "/health", look_at_mlflow_ui)
            servers_seen.add(MLFLOW_UI)
        else:
            run_block(block, checkout, env)
        print(f"{time.monotonic() - started:6.1f} s  {block.splitlines()[0][:100]}")  # shown with -s
    assert servers_seen == {*MODEL_SERVERS, MLFLOW_UI}, "a server the test knows is no longer in the README"

    for output in OUTPUTS:
        named = Path(output).parent.name if output.endswith("MLmodel") else Path(output).name
        assert named in readme, f"the README no longer names {named}; update OUTPUTS"
        assert (checkout / output).exists(), f"the README's commands did not write {output}"
    assert list((checkout / "annotated").glob("*.png")), "predict --visualize drew nothing"
