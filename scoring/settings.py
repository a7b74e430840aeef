"""Every setting mmdet-mlflow reads, in one place, read at use.

Each ``Setting`` names its variable, its default and what it means; ``value()`` reads it every
time it is called (never frozen at import), so a server, a test or a batch job that sets a
variable sees it take effect. A value that does not parse is an error naming where it came from.
The settings table (docs/settings.md) is generated from ``SETTINGS`` (``markdown_table``), and a
test keeps the two the same. This module ships inside every saved model (``code/scoring``).

A model's runtime options are also its MLflow ``model_config`` (``MODEL_CONFIG_SETTINGS``: the
key is the variable's name in lower case, e.g. ``batch_size``). Where a key's value comes from,
first found wins:

1. the model's ``model_config``: what ``mlflow.pyfunc.load_model(uri, model_config=...)``,
   ``spark_udf(..., model_config=...)`` or MLflow's ``MLFLOW_PYFUNC_INFERENCE_CONFIG`` pass at
   load, over what ``save_model(model_config=...)`` recorded in the MLmodel (MLflow merges the
   two before the model's loader sees them, so the loader cannot tell them apart);
2. the ``MMDET_MLFLOW_*`` environment variable: the fallback for what the model's config leaves
   unset (a saved model records every key, unset unless its packager chose a value), and the
   only way for servers and jobs that load a model without a config;
3. the built-in default.

The loaded model's config is active (``using``) only while that model loads and scores, in the
thread doing it (a context variable, not the process environment): two models loaded in one
process with different configs do not see each other's.
"""
from __future__ import annotations

import contextlib
import contextvars
import json
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping

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
    model_config: bool = False  # whether it is one of a model's model_config keys

    @property
    def env(self) -> str:
        return PREFIX + self.name

    @property
    def key(self) -> str:
        """Its name as a model_config key."""
        return self.name.lower()

    def value(self) -> Any:
        """Its value now (parsed): the active model config's (see ``using``), else the
        variable's, else the default when it is unset or empty."""
        config = _ACTIVE_CONFIG.get()
        if config is not None and self in config.values:
            return config.values[self]
        raw = os.environ.get(self.env, "").strip()
        if not raw:
            return self.default
        try:
            return self.parse(raw)
        except (ValueError, TypeError) as err:
            raise SettingError(f"{self.env}={raw!r} is not valid: {err} ({self.doc})") from None

    def source(self) -> str:
        """Where ``value()`` takes it from now, for messages that tell the reader what to change:
        the model_config key when the active config sets it, else the variable."""
        config = _ACTIVE_CONFIG.get()
        if config is not None and self in config.values:
            return f"model_config {self.key}"
        return self.env

    def from_config(self, value: Any) -> Any:
        """A model_config value parsed as the variable's text would be (YAML and JSON bring
        numbers, booleans and lists as they are); None: unset."""
        if value is None:
            return None
        text = ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
        try:
            return self.parse(text.strip())
        except (ValueError, TypeError) as err:
            raise SettingError(f"model_config {self.key}={value!r} is not valid: {err} "
                               f"({self.doc})") from None


DEVICE = Setting("DEVICE", None, str, "torch device for inference, e.g. cpu or cuda:1 (default: cuda when "
                 "available, else cpu)", "serving, predict, evaluate", model_config=True)
BATCH_SIZE = Setting("BATCH_SIZE", None, int, "images per forward pass (default: the model's batch "
                     "of 8 on a GPU, 1 on a CPU, where batching was measured slower)",
                     "serving, predict, evaluate, batch", model_config=True)
PRECISION = Setting("PRECISION", "auto", _precision, "the network's precision on the openvino "
                    "runtime: auto (OpenVINO's choice for the CPU: bf16 where it computes bf16 "
                    "natively, e.g. AMX, else f32), fp32 or bf16; chosen at load",
                    "serving, predict, evaluate (openvino models)", model_config=True)
NUM_THREADS = Setting("NUM_THREADS", None, int, "CPU threads of the network's pass on the onnx and "
                      "openvino runtimes (default: OMP_NUM_THREADS when set, which Spark sets to each "
                      "task's cores and torch follows, else the runtime's own choice: every core)",
                      "serving, predict, evaluate, batch, Spark (onnx and openvino models)",
                      model_config=True)
TORCH_EXACT = Setting("TORCH_EXACT", False, _switch, "1: the torch runtime runs the network exactly "
                      "as mmdet builds it, its answers bit for bit mmdet's inference_detector's; 0 "
                      "(default): with batch norms folded into their convolutions and, on a CPU, "
                      "channels-last memory, where the model's family is tested in that form "
                      "(a detector of no named family: where a probe picture at load shows the "
                      "same outputs), faster, the same answers within float rounding; chosen at load",
                      "serving, predict, evaluate, batch (torch models)", model_config=True)
MASK_BOX_MARGIN = Setting("MASK_BOX_MARGIN", None, _cells, "cut each detection's mask to its box "
                          "grown by this many cells of the mask logits (a cell is the mask "
                          "head's stride in network-input pixels, scaled to the picture), e.g. "
                          "4: mask work in proportion to the box even where a model's masks spread over the picture (untrained or poorly "
                          "trained models); none (default): masks exactly as mmdet makes them, over "
                          "the window where they can be set", "serving, predict, evaluate, batch",
                          model_config=True)
MAX_IMAGE_PIXELS = Setting("MAX_IMAGE_PIXELS", 50_000_000, int, "largest image accepted, in "
                           "pixels (width x height), checked before decoding", "every input",
                           model_config=True)
MAX_ROWS = Setting("MAX_ROWS", 64, int, "most images one request may carry (400 above it); "
                   "batch jobs are not limited", "serving", model_config=True)
MAX_MASK_PIXELS = Setting("MAX_MASK_PIXELS", 5_000_000_000, int, "most mask pixels one image may "
                          "cost: max_detections x width x height (400 above it); the default lets "
                          "100 detections through on the largest image", "every input",
                          model_config=True)
REQUEST_TIMEOUT = Setting("REQUEST_TIMEOUT", 60.0, float, "seconds a served request's work may "
                          "take, shortened to end before the server's own timeout "
                          "(MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT, the Azure deployment's request "
                          "timeout); checked between forward passes, merge steps and masks: past it "
                          "the work stops and the request is answered 400", "serving",
                          model_config=True)
BATCH_PICTURE_TIMEOUT = Setting("BATCH_PICTURE_TIMEOUT", 600.0, float, "seconds one picture's work "
                                "may take in a batch job: past it the picture gets an error row "
                                "and the job goes on", "batch, Azure batch, spark-batch",
                                model_config=True)
MAX_TILE_CANDIDATES = Setting("MAX_TILE_CANDIDATES", 50_000, int, "most detections one tiled "
                              "picture may bring to the merge, counted before any pass as (tiles + "
                              "1) x max_detections (400 above it)", "every input",
                              model_config=True)
FETCH_REQUEST_BUDGET = Setting("FETCH_REQUEST_BUDGET", 30.0, float, "seconds all of one request's "
                               "image URLs may take together (time spent fetching; the model's "
                               "passes between rows do not count)", "image URLs", model_config=True)
MAX_REQUEST_BYTES = Setting("MAX_REQUEST_BYTES", 64 * 1024 * 1024, int, "largest request body "
                            "the servers read (413 above it): the Azure online scoring script, "
                            "and `mlflow models serve` of our models", "serving")
MAX_DOWNLOAD_BYTES = Setting("MAX_DOWNLOAD_BYTES", 32 * 1024 * 1024, int, "largest image "
                             "downloaded from a URL", "image URLs", model_config=True)
FETCH_TIMEOUT = Setting("FETCH_TIMEOUT", 10.0, float, "seconds one read from an image URL may "
                        "wait", "image URLs", model_config=True)
FETCH_CONNECT_TIMEOUT = Setting("FETCH_CONNECT_TIMEOUT", 5.0, float, "seconds connecting to one "
                                "address of an image URL's host may take", "image URLs",
                                model_config=True)
FETCH_TOTAL_TIMEOUT = Setting("FETCH_TOTAL_TIMEOUT", 20.0, float, "seconds one image URL may take "
                              "in all: DNS, connecting, TLS, headers, body and redirects", "image URLs",
                              model_config=True)
FETCH_MAX_REDIRECTS = Setting("FETCH_MAX_REDIRECTS", 5, int, "redirects followed for one image "
                              "URL", "image URLs", model_config=True)
URL_ALLOWLIST = Setting("URL_ALLOWLIST", (), _names, "comma-separated host names, IP addresses "
                        "or CIDR networks that image URLs may reach although they are not public "
                        "(e.g. a storage account's private endpoint)", "image URLs",
                        model_config=True)
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

SETTINGS = (DEVICE, BATCH_SIZE, PRECISION, NUM_THREADS, TORCH_EXACT, MASK_BOX_MARGIN,
            MAX_IMAGE_PIXELS, MAX_ROWS, MAX_MASK_PIXELS, MAX_TILE_CANDIDATES, REQUEST_TIMEOUT, BATCH_PICTURE_TIMEOUT,
            MAX_REQUEST_BYTES, MAX_DOWNLOAD_BYTES, FETCH_TIMEOUT, FETCH_CONNECT_TIMEOUT,
            FETCH_TOTAL_TIMEOUT, FETCH_REQUEST_BUDGET, FETCH_MAX_REDIRECTS,
            URL_ALLOWLIST, BATCH_PARAMS, BATCH_INPUT_ROOT, CACHE, CHECKPOINT_MIRROR,
            DOWNLOAD_TIMEOUT, SPARK_FAST_START)


MODEL_CONFIG_SETTINGS = tuple(s for s in SETTINGS if s.model_config)
MODEL_CONFIG_KEYS = tuple(s.key for s in MODEL_CONFIG_SETTINGS)


class ModelConfig:
    """A model's ``model_config``, checked and parsed: the values of the keys it sets (a key
    whose value is None is unset, so its variable or default applies)."""

    def __init__(self, config: Mapping[str, Any] | None = None):
        config = dict(config or {})
        by_key = {s.key: s for s in MODEL_CONFIG_SETTINGS}
        unknown = sorted(set(config) - set(by_key))
        if unknown:
            raise SettingError(f"unknown model_config key{'s' if len(unknown) > 1 else ''} "
                               f"{', '.join(map(repr, unknown))}; the keys are: "
                               f"{', '.join(MODEL_CONFIG_KEYS)} (see docs/settings.md)")
        parsed = {by_key[k]: by_key[k].from_config(v) for k, v in config.items()}
        self.values = {s: v for s, v in parsed.items() if v is not None}

    def as_dict(self) -> dict:
        """The keys it sets, with their parsed values (what tells two configs apart)."""
        return {s.key: v for s, v in self.values.items()}

    def __eq__(self, other) -> bool:
        return isinstance(other, ModelConfig) and self.values == other.values

    def __hash__(self) -> int:
        return hash(tuple(sorted((s.key, repr(v)) for s, v in self.values.items())))

    def __repr__(self) -> str:
        return f"ModelConfig({self.as_dict()!r})"


NO_CONFIG = ModelConfig()
_ACTIVE_CONFIG: contextvars.ContextVar[ModelConfig | None] = contextvars.ContextVar(
    "mmdet_mlflow_model_config", default=None)


@contextlib.contextmanager
def using(config: ModelConfig | None) -> Iterator[None]:
    """Make ``config`` the one ``Setting.value()`` reads first, in this thread, until the block
    ends: around a model's load and each of its calls, so its options reach every reader
    without passing through the process environment."""
    token = _ACTIVE_CONFIG.set(config)
    try:
        yield
    finally:
        _ACTIVE_CONFIG.reset(token)


def recorded_config(config: Mapping[str, Any] | None = None) -> dict:
    """What ``save_model`` records as the MLmodel's ``model_config``: every key (MLflow passes
    a key at load only when the MLmodel names it), None (unset) unless ``config`` sets it."""
    ModelConfig(config)  # an unknown key or a bad value: refused before anything is written
    return {**{key: None for key in MODEL_CONFIG_KEYS}, **dict(config or {})}


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
        raise SettingError(f"{NUM_THREADS.source()}={chosen} is not valid: at least 1 thread")
    return chosen or None


def markdown_table() -> str:
    """The settings as the README's table."""
    rows = ["| variable | model_config key | default | used by | meaning |",
            "| --- | --- | --- | --- | --- |"]
    for s in SETTINGS:
        default = "unset" if s.default in (None, ()) else f"`{s.default}`"
        key = f"`{s.key}`" if s.model_config else "-"
        rows.append(f"| `{s.env}` | {key} | {default} | {s.used_by} | {s.doc} |")
    return "\n".join(rows)
