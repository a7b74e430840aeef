"""Concurrent load against a running server, mixed good and bad requests with different params:
used by tests/test_load.py (a short run) and bench/load.py (200 and 1000 requests).

Every distinct good request is first answered alone; under load, every good answer must be
exactly that answer (no cross-talk between concurrent requests: params, images or masks of one
request never leak into another's), every bad one a 4xx, and there must be no connection error
and no 5xx. Latencies and the server's resident memory are reported."""
from __future__ import annotations

import json
import os
import random
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import requests

from hostile_cases import all_cases, b64, encoded, picture, split


@dataclass(frozen=True)
class Server:
    name: str
    url: str  # the scoring route
    pid: int  # the server's process group leader

    def rss_bytes(self) -> int:
        """Resident memory of the server's whole process group (its workers too)."""
        total = 0
        pgid = os.getpgid(self.pid)
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                if os.getpgid(int(entry.name)) != pgid:
                    continue
                status = (entry / "status").read_text()
            except (ProcessLookupError, FileNotFoundError):
                continue
            for line in status.splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        return total


def good_requests(count: int, seed: int = 0) -> list[dict]:
    """``count`` distinct valid requests: small pictures, one or two rows, different params."""
    rng = random.Random(seed)
    bodies = []
    for i in range(count):
        images = [b64(encoded("PNG", picture(rng.randrange(24, 96), rng.randrange(24, 96), seed=i * 7 + r)))
                  for r in range(rng.choice((1, 1, 2)))]
        params = {"max_detections": rng.randrange(1, 6), "score_threshold": rng.choice((0.1, 0.3, 0.5)),
                  "class_agnostic_nms": rng.choice((True, False))}
        if rng.random() < 0.5:
            params["polygon_tolerance"] = rng.choice((0.0, 2.0))
        bodies.append(split(images, params))
    return bodies


def over_budget_requests() -> list[bytes]:
    """Requests whose work is over the merge budget (a picture tiled 8x8 at max_detections 10000,
    score_threshold 0): every server must refuse them before any pass, so that a few of them mixed
    into the load cost the good ones nothing."""
    return [case.payload() for case in all_cases() if case.name == "tiled-over-the-merge-budget"]


def bad_requests() -> list[bytes]:
    """Hostile cases that both servers refuse before the model runs, fetching nothing."""
    return [case.payload() for case in all_cases()
            if not case.ok and not case.slow and not case.status and not case.our_parser_only
            and not case.name.startswith("ssrf")
            and case.family in ("shape", "base64", "format", "bomb", "params", "truncated")]


@dataclass
class Outcome:
    latencies: list = field(default_factory=list)
    good_latencies: list = field(default_factory=list)
    over_budget_statuses: list = field(default_factory=list)
    connection_errors: list = field(default_factory=list)
    server_errors: list = field(default_factory=list)
    wrong_answers: list = field(default_factory=list)
    unexpected: list = field(default_factory=list)
    rss_after: dict = field(default_factory=dict)  # requests done -> bytes

    def percentile(self, share: float, latencies: list | None = None) -> float:
        ordered = sorted(self.latencies if latencies is None else latencies)
        return ordered[min(len(ordered) - 1, int(share * len(ordered)))] if ordered else float("nan")

    def summary(self) -> str:
        rss = ", ".join(f"after {n}: {value / 2**20:.0f} MiB" for n, value in sorted(self.rss_after.items()))
        over = (f"{len(self.over_budget_statuses)} over the budget (statuses "
                f"{sorted(set(self.over_budget_statuses))}), " if self.over_budget_statuses else "")
        return (f"{len(self.latencies)} requests, {over}p50 {statistics.median(self.latencies):.2f} s, "
                f"p95 {self.percentile(0.95):.2f} s, good p50 {self.percentile(0.5, self.good_latencies):.2f} s, "
                f"good p95 {self.percentile(0.95, self.good_latencies):.2f} s, "
                f"connection errors {len(self.connection_errors)}, "
                f"5xx {len(self.server_errors)}, wrong answers {len(self.wrong_answers)}, "
                f"unexpected statuses {len(self.unexpected)}; RSS {rss}")


def entries(server: Server, response: requests.Response) -> list:
    body = response.json()
    return body["predictions"] if isinstance(body, dict) else body


def post(server: Server, payload: bytes, timeout: float = 300) -> requests.Response:
    return requests.post(server.url, data=payload, timeout=timeout, headers={"Content-Type": "application/json"})


def run_load(server: Server, total: int, concurrency: int, distinct_good: int = 8, good_share: float = 0.6,
             seed: int = 0, rss_at: tuple[int, ...] = (), over_budget: int = 0) -> Outcome:
    """``total`` requests, ``concurrency`` at a time, ``over_budget`` of them over the work budget
    (in place of bad ones); RSS is read after the ``rss_at`` counts."""
    rng = random.Random(seed)
    goods = [json.dumps(body).encode() for body in good_requests(distinct_good, seed)]
    alone = []
    for payload in goods:  # the reference: each good request answered with nothing else running
        response = post(server, payload)
        response.raise_for_status()
        alone.append(entries(server, response))
    bads = bad_requests()
    plan = [("good", i) if rng.random() < good_share else ("bad", rng.randrange(len(bads)))
            for i in (rng.randrange(len(goods)) for _ in range(total))]
    bad_places = [n for n, (kind, _) in enumerate(plan) if kind == "bad"]
    for place in rng.sample(bad_places, min(over_budget, len(bad_places))):
        plan[place] = ("over-budget", 0)
    payloads = {"good": goods, "bad": bads, "over-budget": over_budget_requests()}
    outcome = Outcome()

    def one(item):
        kind, index = item
        payload = payloads[kind][index]
        start = time.monotonic()
        try:
            response = post(server, payload)
        except requests.RequestException as err:
            outcome.connection_errors.append(f"{kind} {index}: {err}")
            return
        outcome.latencies.append(time.monotonic() - start)
        if kind == "good":
            outcome.good_latencies.append(outcome.latencies[-1])
        if kind == "over-budget":
            outcome.over_budget_statuses.append(response.status_code)
        if response.status_code >= 500:
            outcome.server_errors.append(f"{kind} {index}: {response.status_code} {response.text[:300]}")
        elif kind == "good":
            if response.status_code != 200:
                outcome.unexpected.append(f"good {index}: {response.status_code} {response.text[:300]}")
            elif entries(server, response) != alone[index]:
                outcome.wrong_answers.append(f"good {index}: differs from its answer alone")
        elif kind == "over-budget" and (response.status_code != 400
                                        or "MMDET_MLFLOW_MAX_TILE_CANDIDATES" not in response.text):
            outcome.unexpected.append(f"over-budget: {response.status_code} {response.text[:300]}")
        elif not 400 <= response.status_code < 500:
            outcome.unexpected.append(f"bad {index}: {response.status_code} {response.text[:300]}")

    done = 0
    with ThreadPoolExecutor(concurrency) as pool:
        for stop in sorted(set(rss_at) | {total}):
            list(pool.map(one, plan[done:stop]))
            done = stop
            outcome.rss_after[done] = server.rss_bytes()
    return outcome


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) used so far by a process and all its descendants alive now."""
    total, todo = 0.0, [pid]
    while todo:
        current = todo.pop()
        try:
            fields = Path(f"/proc/{current}/stat").read_text().rsplit(")", 1)[1].split()
            children = Path(f"/proc/{current}/task/{current}/children").read_text().split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        todo.extend(int(child) for child in children)
    return total


def busy_seconds_after(pid: int, seconds: float = 3.0) -> float:
    """CPU seconds a server spends in the next ``seconds`` with no request sent: about 0 when no
    worker kept working after its request was answered."""
    before = cpu_seconds(pid)
    time.sleep(seconds)
    return cpu_seconds(pid) - before
