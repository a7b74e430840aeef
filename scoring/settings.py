"""Every setting mmdet-mlflow reads from the environment, in one place, read at use.

Each ``Setting`` names its variable, its default and what it means; ``value()`` reads the
environment every time it is called (never frozen at import), so a server, a test or a batch
job that sets a variable sees it take effect. A value that does not parse is an error naming the
variable. The README's settings table is generated from ``SETTINGS`` (``markdown_table``), and a
test keeps the two the same. This module ships inside every saved model (``code/scoring``).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Callable

from scoring.errors import MmdetMlflowError

PREFIX = "MMDET_MLFLOW_"


class SettingError(MmdetMlflowError, ValueError):
    """An environment variable of ours holds a value that does not parse."""


def _json_object(text: str) -> dict:
    value = json.loads(text)
    if not isinstance(value, dict):
        raise ValueError("not a JSON object")
    return value


PRECISIONS = ("auto", "fp32", "bf16")


def _precision(text: str) -> str:
    name = text.strip().lower()
    if name not in PRECISIONS:
        raise ValueError(f"not one of {', '.join(PRECISIONS)}")
    return name


def _cells(text: str) -> float | None:
    if text.lower() == "none":
        return None
    value = float(text)
    if not 0 <= value <= 1000:
        raise ValueError("a number of cells from 0 to 1000, or none")
    return value


def _switch(text: str) -> bool:
    name = text.strip().lower()
    if name in ("1", "true", "yes", "on"):
        return True
    if name in ("0", "false", "no", "off"):
        return False
    raise ValueError("1 or 0 (true or false)")


def _names(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


@dataclass(frozen=True)
class Setting:
    name: str  # without the MMDET_MLFLOW_ prefix
    default: Any
    parse: Callable[[str], Any]
    doc: str
    used_by: str

    @property
    def env(self) -> str:
        return PREFIX + self.name

    def value(self) -> Any:
        """The variable's value now (parsed), or the default when it is unset or empty."""
        raw = os.environ.get(self.env, "").strip()
        if not raw:
            return self.default
        try:
            return self.parse(raw)
        except (ValueError, TypeError) as err:
            raise SettingError(f"{self.env}={raw!r} is not valid: {err} ({self.doc})") from None


DEVICE = Setting("DEVICE", None, str, "torch device for inference, e.g. cpu or cuda:1 (default: cuda when "
                 "available, else cpu)", "serving, predict, evaluate")
BATCH_SIZE = Setting("BATCH_SIZE", None, int, "images per forward pass (default: the model's batch "
                     "of 8 on a GPU, 1 on a CPU, where batching was measured slower)",
                     "serving, predict, evaluate, batch")
PRECISION = Setting("PRECISION", "auto", _precision, "the network's precision on the openvino "
                    "runtime: auto (OpenVINO's choice for the CPU: bf16 where it computes bf16 "
                    "natively, e.g. AMX, else f32), fp32 or bf16; chosen at load",
                    "serving, predict, evaluate (openvino models)")
NUM_THREADS = Setting("NUM_THREADS", None, int, "CPU threads of the network's pass on the onnx and "
                      "openvino runtimes (default: OMP_NUM_THREADS when set, which Spark sets to each "
                      "task's cores and torch follows, else the runtime's own choice: every core)",
                      "serving, predict, evaluate, batch, Spark (onnx and openvino models)")
MASK_BOX_MARGIN = Setting("MASK_BOX_MARGIN", None, _cells, "cut each detection's mask to its box "
                          "grown by this many cells of the mask logits (a cell is the mask "
                          "head's stride in network-input pixels, scaled to the picture), e.g. "
                          "4: mask work in proportion to the box even where a model's masks spread over the picture (untrained or poorly "
                          "trained models); none (default): masks exactly as mmdet makes them, over "
                          "the window where they can be set", "serving, predict, evaluate, batch")
MAX_IMAGE_PIXELS = Setting("MAX_IMAGE_PIXELS", 50_000_000, int, "largest image accepted, in "
                           "pixels (width x height), checked before decoding", "every input")
MAX_ROWS = Setting("MAX_ROWS", 64, int, "most images one request may carry (400 above it); "
                   "batch jobs are not limited", "serving")
MAX_MASK_PIXELS = Setting("MAX_MASK_PIXELS", 5_000_000_000, int, "most mask pixels one image may "
                          "cost: max_detections x width x height (400 above it); the default lets "
                          "100 detections through on the largest image", "every input")
REQUEST_TIMEOUT = Setting("REQUEST_TIMEOUT", 60.0, float, "seconds a served request's work may "
                          "take, shortened to end before the server's own timeout "
                          "(MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT, the Azure deployment's request "
                          "timeout); checked between forward passes, merge steps and masks: past it "
                          "the work stops and the request is answered 400", "serving")
BATCH_PICTURE_TIMEOUT = Setting("BATCH_PICTURE_TIMEOUT", 600.0, float, "seconds one picture's work "
                                "may take in a batch job: past it the picture gets an error row "
                                "and the job goes on", "batch, Azure batch, spark-batch")
MAX_TILE_CANDIDATES = Setting("MAX_TILE_CANDIDATES", 50_000, int, "most detections one tiled "
                              "picture may bring to the merge, counted before any pass as (tiles + "
                              "1) x max_detections (400 above it)", "every input")
FETCH_REQUEST_BUDGET = Setting("FETCH_REQUEST_BUDGET", 30.0, float, "seconds all of one request's "
                               "image URLs may take together (time spent fetching; the model's "
                               "passes between rows do not count)", "image URLs")
MAX_REQUEST_BYTES = Setting("MAX_REQUEST_BYTES", 64 * 1024 * 1024, int, "largest request body "
                            "the servers read (413 above it): the Azure online scoring script, "
                            "and `mlflow models serve` of our models", "serving")
MAX_DOWNLOAD_BYTES = Setting("MAX_DOWNLOAD_BYTES", 32 * 1024 * 1024, int, "largest image "
                             "downloaded from a URL", "image URLs")
FETCH_TIMEOUT = Setting("FETCH_TIMEOUT", 10.0, float, "seconds one read from an image URL may "
                        "wait", "image URLs")
FETCH_CONNECT_TIMEOUT = Setting("FETCH_CONNECT_TIMEOUT", 5.0, float, "seconds connecting to one "
                                "address of an image URL's host may take", "image URLs")
FETCH_TOTAL_TIMEOUT = Setting("FETCH_TOTAL_TIMEOUT", 20.0, float, "seconds one image URL may take "
                              "in all: DNS, connecting, TLS, headers, body and redirects", "image URLs")
FETCH_MAX_REDIRECTS = Setting("FETCH_MAX_REDIRECTS", 5, int, "redirects followed for one image "
                              "URL", "image URLs")
URL_ALLOWLIST = Setting("URL_ALLOWLIST", (), _names, "comma-separated host names, IP addresses "
                        "or CIDR networks that image URLs may reach although they are not public "
                        "(e.g. a storage account's private endpoint)", "image URLs")
BATCH_PARAMS = Setting("BATCH_PARAMS", None, _json_object, "predict params for every image of a "
                       "batch job, a JSON object", "Azure batch, mmdet-mlflow batch")
BATCH_INPUT_ROOT = Setting("BATCH_INPUT_ROOT", None, str, "folder that batch records name files "
                           "relative to (default: the file's base name)", "Azure batch")
CACHE = Setting("CACHE", None, str, "where downloaded checkpoints and the local Spark driver's "
                "class-data archive are kept (default: ~/.cache/mmdet-mlflow)",
                "package, finetune, spark-batch")
CHECKPOINT_MIRROR = Setting("CHECKPOINT_MIRROR", None, str, "a server laid out like "
                            "download.openmmlab.com to take official checkpoints from",
                            "package, finetune")
DOWNLOAD_TIMEOUT = Setting("DOWNLOAD_TIMEOUT", 20.0, float, "seconds to wait for a checkpoint "
                           "server to answer", "package, finetune")
SPARK_FAST_START = Setting("SPARK_FAST_START", False, _switch, "1: JVM options for a short-lived "
                           "driver and a class-data archive in the cache (about 190 MB, written by "
                           "the first such run), for a local Spark that spark-batch starts itself "
                           "(as --fast-start)", "spark-batch")

SETTINGS = (DEVICE, BATCH_SIZE, PRECISION, NUM_THREADS, MASK_BOX_MARGIN, MAX_IMAGE_PIXELS, MAX_ROWS,
            MAX_MASK_PIXELS, MAX_TILE_CANDIDATES, REQUEST_TIMEOUT, BATCH_PICTURE_TIMEOUT,
            MAX_REQUEST_BYTES, MAX_DOWNLOAD_BYTES, FETCH_TIMEOUT, FETCH_CONNECT_TIMEOUT,
            FETCH_TOTAL_TIMEOUT, FETCH_REQUEST_BUDGET, FETCH_MAX_REDIRECTS,
            URL_ALLOWLIST, BATCH_PARAMS, BATCH_INPUT_ROOT, CACHE, CHECKPOINT_MIRROR,
            DOWNLOAD_TIMEOUT, SPARK_FAST_START)


def cache_root():
    """The folder of what mmdet-mlflow keeps between runs (MMDET_MLFLOW_CACHE)."""
    from pathlib import Path

    return Path(CACHE.value() or Path.home() / ".cache" / "mmdet-mlflow")


def network_threads() -> int | None:
    """Threads for a wheel runtime's network pass: MMDET_MLFLOW_NUM_THREADS, else OMP_NUM_THREADS
    (ONNX Runtime and OpenVINO ignore it, so two Spark workers on two cores would each start a
    thread per core and wait on each other), else None: the runtime decides."""
    chosen = NUM_THREADS.value()
    if chosen is None:
        omp = os.environ.get("OMP_NUM_THREADS", "").strip()
        chosen = int(omp) if omp.isdigit() else None
    if chosen is not None and chosen < 1:
        raise SettingError(f"{NUM_THREADS.env}={chosen} is not valid: at least 1 thread")
    return chosen or None


def markdown_table() -> str:
    """The settings as the README's table."""
    rows = ["| variable | default | used by | meaning |", "| --- | --- | --- | --- |"]
    for s in SETTINGS:
        default = "unset" if s.default in (None, ()) else f"`{s.default}`"
        rows.append(f"| `{s.env}` | {default} | {s.used_by} | {s.doc} |")
    return "\n".join(rows)
