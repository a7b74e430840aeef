"""The hostile-input suite: every case of tests/hostile_cases.py against ``mlflow models serve``,
``azmlinfsrv`` with our entry script, and the pyfunc in this process (through our request
parser, as Azure's script does), the last for the torch and the ONNX Runtime model alike (the
servers share the request and decoding code; the runtimes differ in what they do with an image). Each answer is a 200 for a valid request, else a 4xx whose
message names the row and the problem, never a stack trace; every server keeps answering (a
probe after every case, a good request every few cases and at the end) within an address-space
limit, so a regression that allocates gigabytes fails here instead of swapping.

The servers run with the slow test server's name (``localhost``) allow-listed for the slow-URL
cases only: SSRF cases use IP literals and numeric forms, which stay refused (an allow-listed
name does not allow its addresses), and refused hosts are never connected to.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import requests

from helpers import VENV_BIN, free_port
from hostile_cases import FEW, GOOD, OVERSIZED_LIMIT, Case, all_cases, split
from mmdet_mlflow import servers
from slow_server import slow_server as serving

CASES = all_cases()
TARGETS = ("pyfunc", "pyfunc-onnx", "mlflow-serve", "azmlinfsrv")
GOOD_EVERY = 15  # a good request after every this many cases (each costs a forward pass)
# Settings of every target: small fetch deadlines so slow-server cases end in seconds, and a
# small body limit so an oversized request costs little.
SUITE_ENV = {
    "MMDET_MLFLOW_URL_ALLOWLIST": "localhost",
    "MMDET_MLFLOW_FETCH_TOTAL_TIMEOUT": "2",
    "MMDET_MLFLOW_FETCH_REQUEST_BUDGET": "1.5",
    "MMDET_MLFLOW_MAX_REQUEST_BYTES": str(OVERSIZED_LIMIT),
    "MMDET_MLFLOW_BATCH_SIZE": "1",
}
# The address space a server process may map (prlimit --as, inherited by its workers), so that
# a regression fails with an allocation error instead of swapping. Measured with the tiny model
# over all the cases: under 4 GiB peak for both servers' workers (most of it address space that
# torch and each pool thread's malloc arenas reserve and never touch; resident peaks were under
# 1 GiB). 6 GiB lets that through and stops what the hardening prevents: mmdet's 9.3 GiB mask
# buffer for the 50000x500 image (checked: with the windowed resampling switched off, that case
# fails on both servers), a decoded bomb (12.8 GB for the 65500x65500 JPEG). HOSTILE_SERVER_AS
# (bytes) overrides it, to measure again.
SERVER_ADDRESS_SPACE = int(os.environ.get("HOSTILE_SERVER_AS", 6 * 1024 ** 3))
RSS_BOUND = 2 * 1024 ** 3  # resident peak of any server process after every case


@pytest.fixture(scope="module")
def slow_server():
    with serving("localhost") as url:
        yield url


# --- the three targets ---------------------------------------------------------------------------

class Answer:
    def __init__(self, status: int, text: str):
        self.status, self.text = status, text

    def json(self):
        return json.loads(self.text)

    def message(self) -> str:
        body = self.json()
        return body.get("message", "") if isinstance(body, dict) else ""

    def entries(self) -> list:
        body = self.json()
        return body["predictions"] if isinstance(body, dict) else body


class ServerTarget:
    def __init__(self, name: str, url: str, route: str, probe: str, process, slow: str):
        self.name, self.url, self.route, self.probe = name, url, route, probe
        self.process, self.slow = process, slow

    def send(self, case: Case) -> Answer:
        body = case.payload(self.slow)
        # a generator: requests sends it chunked, with no length declared
        payload = (body[at:at + 65536] for at in range(0, len(body), 65536)) if case.chunked else body
        response = requests.post(f"{self.url}{self.route}", data=payload, timeout=180,
                                 headers={"Content-Type": "application/json"})
        return Answer(response.status_code, response.text)

    def alive(self) -> bool:
        return requests.get(f"{self.url}{self.probe}", timeout=60).status_code == 200

    def processes(self) -> list[int]:
        """The server's process group (its workers too)."""
        pgid = os.getpgid(self.process.pid)
        pids = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    if os.getpgid(int(entry.name)) == pgid:
                        pids.append(int(entry.name))
                except ProcessLookupError:
                    pass
        return pids


class PyfuncTarget:
    """The pyfunc in this process, through our request parser (as Azure's script does)."""

    def __init__(self, name: str, model, slow: str):
        self.name, self.model, self.slow = name, model, slow

    def send(self, case: Case) -> Answer:
        from mlflow.exceptions import MlflowException

        from scoring.azureml.request import parse_request
        from scoring.errors import InputError

        try:
            frame, params = parse_request(case.payload(self.slow))
            out = self.model.predict(frame, params=params)
        except InputError as err:
            return Answer(err.status, json.dumps({"message": str(err)}))
        except MlflowException as err:
            return Answer(err.get_http_status_code(), json.dumps({"message": err.message}))
        return Answer(200, json.dumps(out.to_dict(orient="records")))

    def alive(self) -> bool:
        return True

    def processes(self) -> list[int]:
        return []


def _limited(cmd: list[str]) -> list[str]:
    return ["prlimit", f"--as={SERVER_ADDRESS_SPACE}", "--", *cmd]


@pytest.fixture(scope="module", params=TARGETS)
def target(request, tiny_model_dir, slow_server, tmp_path_factory):
    name = request.param
    if name.startswith("pyfunc"):
        import mlflow

        model_dir = request.getfixturevalue("tiny_onnx_model_dir") if name == "pyfunc-onnx" else tiny_model_dir
        saved = {key: os.environ.get(key) for key in SUITE_ENV}
        os.environ.update(SUITE_ENV)
        try:
            yield PyfuncTarget(name, mlflow.pyfunc.load_model(str(model_dir)), slow_server)
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
        return
    base = tmp_path_factory.mktemp(name)
    port = free_port()
    log = base / "server.log"
    if name == "mlflow-serve":
        cmd = [str(VENV_BIN / "mlflow"), "models", "serve", "-m", str(tiny_model_dir), "--env-manager",
               "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1"]
        with servers.serve(_limited(cmd), f"http://127.0.0.1:{port}/ping", log, env=SUITE_ENV,
                           timeout=300) as process:
            yield ServerTarget(name, f"http://127.0.0.1:{port}", "/invocations", "/ping", process, slow_server)
    else:
        app = servers.azure_app_folder(base / "app")
        model_root = base / "azureml-models" / "tiny" / "1"
        shutil.copytree(tiny_model_dir, model_root / "model")
        with servers.serve(_limited(servers.azmlinfsrv_command(model_root, port)), f"http://127.0.0.1:{port}/",
                           log, cwd=app, env={**servers.azmlinfsrv_env(app), **SUITE_ENV},
                           timeout=300) as process:
            yield ServerTarget(name, f"http://127.0.0.1:{port}", "/score", "/", process, slow_server)


# --- the checks --------------------------------------------------------------------------------

TRACE = re.compile(r"Traceback|File \"|stack_trace|line \d+, in ")
GOOD_REQUEST = Case("good", "request", split([GOOD], FEW), ok=True)


def check_answer(target, case: Case, answer: Answer) -> None:
    assert not TRACE.search(answer.text), f"a stack trace in the answer: {answer.text[:2000]}"
    if case.mlflow_only and target.name != "mlflow-serve":
        # a body only MLflow's server reads: ours refuses it, naming the keys it reads
        assert 400 <= answer.status < 500, (answer.status, answer.text[:2000])
        return
    if case.either and answer.status == 200:
        case = dataclasses.replace(case, ok=True)
    if case.ok:
        assert answer.status == 200, (answer.status, answer.text[:2000])
        entries = answer.entries()
        assert len(entries) == case.rows and all(set(e) == {"boxes"} for e in entries), answer.text[:500]
        return
    assert 400 <= answer.status < 500, (answer.status, answer.text[:2000])
    if case.status:
        assert answer.status == case.status, answer.text[:500]
    if case.either:
        return  # damaged data refused: any message, the same every time (test_hostile_case)
    if target.name == "mlflow-serve" and case.mlflow_parses:
        return  # MLflow's own parser answered; its words are its own
    message = answer.message()
    assert re.search(case.message, message), f"{message[:1000]!r} does not match {case.message!r}"


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_hostile_case(target, case):
    answer = target.send(case)
    if case.our_parser_only and target.name == "mlflow-serve":
        # MLflow's server reads these bodies its own way (it ignores input_data): what must
        # still hold there is no 5xx and no stack trace.
        assert answer.status < 500 and not TRACE.search(answer.text), (answer.status, answer.text[:2000])
    else:
        check_answer(target, case, answer)
    for _ in range(case.repeat - 1):
        # the same request, the same answer: a decoder that leaves memory unwritten does not
        again = target.send(case)
        assert (again.status, again.text) == (answer.status, answer.text), (
            f"a second send of the same request got another answer: {answer.status} {answer.text[:300]!r} "
            f"then {again.status} {again.text[:300]!r}")
    assert target.alive(), "the server stopped answering its health probe"
    if CASES.index(case) % GOOD_EVERY == GOOD_EVERY - 1:
        check_answer(target, GOOD_REQUEST, target.send(GOOD_REQUEST))


def test_still_serves_a_good_request_within_bounded_memory(target):
    check_answer(target, GOOD_REQUEST, target.send(GOOD_REQUEST))
    for pid in target.processes():
        status = Path(f"/proc/{pid}/status").read_text()
        peak_rss = int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) * 1024
        peak_space = int(re.search(r"VmPeak:\s+(\d+) kB", status).group(1)) * 1024
        print(f"{target.name} pid {pid}: peak RSS {peak_rss / 2**20:.0f} MiB, "
              f"peak address space {peak_space / 2**20:.0f} MiB (limit {SERVER_ADDRESS_SPACE / 2**20:.0f} MiB)")
        assert peak_rss < RSS_BOUND
