"""Dense-head detectors (RTMDet-Ins, RTMDet, YOLOF) on OpenVINO Runtime: the ONNX runtime's model (the same exported ``model.onnx`` and
its data file, the same numpy pre- and post-processing) with OpenVINO executing the network, in
the precision the serving CPU computes fastest (imports numpy, OpenCV and openvino only).

Only loading and ``forward`` differ from ``scoring.runtimes.onnx_rtmdet.OnnxPredictor``; its
``preprocess`` and ``postprocess`` are inherited, not copied. The precision is chosen at load
(``MMDET_MLFLOW_PRECISION``, ``scoring.settings.PRECISION``):

- ``auto`` (default): OpenVINO's own choice for the CPU, which is bf16 where the CPU computes
  bf16 natively (AMX, AVX512-BF16) and f32 elsewhere (AVX2-only CPUs: as fast as ONNX Runtime);
- ``fp32``: answers equal the torch model's as the ONNX model's do;
- ``bf16``: several times faster than f32 on an AMX CPU (docs/runtimes.md); packaging measures what it
  costs in accuracy (``mmdet-mlflow package --runtime openvino``).

The precision used is logged at load and kept on the predictor (``predictor.precision``).
"""
from __future__ import annotations

import os
import sys
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Sequence

from scoring.families import RTMDET_INS, family_of
from scoring.runtimes.base import forward_batch_size
from scoring.runtimes.onnx_rtmdet import (OnnxModelError, OnnxPredictor, build_while_checking,
                                          check_session_fits, read_onnx_model, release_freed_heap)
from scoring.schema import PredictParams
from scoring.settings import network_threads

# Our precision names -> OpenVINO's INFERENCE_PRECISION_HINT, and back.
OPENVINO_PRECISIONS = {"fp32": "f32", "bf16": "bf16"}
_OUR_NAMES = {"f32": "fp32", "bf16": "bf16", "f16": "fp16"}

_core = None
_core_lock = threading.Lock()


def openvino_core():
    """The process's one ``openvino.Core`` (it holds the loaded plugins; making one per model
    would load the CPU plugin again)."""
    global _core
    with _core_lock:
        if _core is None:
            import openvino

            _core = openvino.Core()
        return _core


def cpu_has_bf16() -> bool:
    """Whether OpenVINO's CPU plugin computes bf16 natively on this CPU."""
    return "BF16" in openvino_core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


class OpenVinoPredictor(OnnxPredictor):
    """A dense-head detector through OpenVINO Runtime, with the ONNX runtime's numpy pre- and
    post-processing. ``compiled_model``: an ``openvino.CompiledModel`` of the exported graph."""

    runtime = "openvino"

    def __init__(self, compiled_model, spec, class_names: Sequence[str],
                 default_params: PredictParams, batch_size: int = 1, precision: str = "fp32",
                 family=RTMDET_INS):
        super().__init__(None, spec, class_names, default_params, batch_size, family=family)
        self.compiled_model = compiled_model
        self.precision = precision  # what the network runs in: "fp32" or "bf16"
        # An infer request is not thread-safe, and servers call predict from threads: one each.
        self._requests = threading.local()

    def _request(self):
        request = getattr(self._requests, "request", None)
        if request is None:
            request = self._requests.request = self.compiled_model.create_infer_request()
        return request

    def forward(self, batch: dict, params: PredictParams) -> dict:
        results = self._request().infer({self.spec.input_name: batch["inputs"]})
        # infer() copies the outputs out of the request's tensors (share_outputs=False), so they
        # stay valid across the next pass.
        outputs = {name: results[name] for name in self._output_names}
        return {"outputs": outputs, "metas": batch["metas"]}


# ----------------------------------------------------------------------------- loading


def requested_precision(precision: str | None = None) -> str:
    """``precision`` or else MMDET_MLFLOW_PRECISION: "auto", "fp32" or "bf16"; a clear error
    naming the choices for anything else."""
    from scoring.settings import PRECISION, PRECISIONS

    if precision is None:
        return PRECISION.value()
    name = str(precision).strip().lower()
    if name not in PRECISIONS:
        raise OnnxModelError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    return name


class _Ports:
    """An OpenVINO model's inputs and outputs as ``check_session_fits`` reads an ORT session's:
    ``.name`` and ``.shape`` (the dynamic batch as ``"batch"``, another dynamic size as None)."""

    def __init__(self, model):
        self._model = model

    @staticmethod
    def _view(port):
        # a dynamic size as None, but the batch axis, named as ORT names it
        shape = [d.get_length() if d.is_static else ("batch" if i == 0 else None)
                 for i, d in enumerate(port.get_partial_shape())]
        return SimpleNamespace(name=port.get_any_name(), shape=shape)

    def get_inputs(self):
        return [self._view(p) for p in self._model.inputs]

    def get_outputs(self):
        # a port may carry several tensor names; the ONNX output's is among them
        return [SimpleNamespace(name=name, shape=self._view(p).shape)
                for p in self._model.outputs for name in p.get_names()]


def compile_network(onnx_path: Path, spec, precision: str = "auto", num_threads: int | None = None):
    """(an ``openvino.CompiledModel`` of the ONNX file for the CPU, the precision it runs in).

    OnnxModelError where OpenVINO cannot read the file (a damaged file, an OpenVINO too old for
    its opset) or the graph does not fit model.json's settings. The latency hint: one request at
    a time, all the cores on it, as the other runtimes serve."""
    import openvino

    core = openvino_core()
    try:
        model = core.read_model(str(onnx_path))
    except Exception as err:  # OpenVINO raises RuntimeError / its own GeneralFailure types
        raise OnnxModelError(f"{onnx_path} is not an ONNX model OpenVINO {openvino.__version__} "
                             f"can read: {type(err).__name__}: {str(err).strip()[:500]}") from None
    check_session_fits(_Ports(model), spec, onnx_path)
    config = {"PERFORMANCE_HINT": "LATENCY"}
    if precision != "auto":
        config["INFERENCE_PRECISION_HINT"] = OPENVINO_PRECISIONS[precision]
    if num_threads:
        config["INFERENCE_NUM_THREADS"] = int(num_threads)
    try:
        compiled = core.compile_model(model, "CPU", config)
    except Exception as err:
        raise OnnxModelError(f"OpenVINO {openvino.__version__} cannot compile {onnx_path} for this "
                             f"CPU at {precision}: {type(err).__name__}: {str(err).strip()[:500]}") from None
    used = compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
    return compiled, _OUR_NAMES.get(used, used)


def load_openvino_predictor(weights_dir_path: str | os.PathLike, batch_size: int | None = None,
                            num_threads: int | None = None, precision: str | None = None,
                            onnx_file: str | None = None, quiet: bool = False, *,
                            info: dict | None = None, device: str | None = None) -> OpenVinoPredictor:
    """The OpenVinoPredictor of a weights folder holding model.json (with its "onnx" section) and
    the ONNX file, compiled at ``precision`` (default: MMDET_MLFLOW_PRECISION, "auto"). Clear
    OnnxModelError for a missing, changed, damaged or mismatched file or a bad precision name,
    as the ONNX runtime refuses them; the precision used is printed (stderr) unless ``quiet``.
    ``info``: the model.json, when already read; the CPU is the only device (``device`` is
    accepted for the family registry's call and ignored)."""
    wanted = requested_precision(precision)  # a bad name is refused before any work
    info, spec, onnx_path, record = read_onnx_model(weights_dir_path, onnx_file, info)
    compiled, used = build_while_checking(
        onnx_path, record, lambda: compile_network(onnx_path, spec, wanted, num_threads or network_threads()))
    release_freed_heap()
    if not quiet:
        note = "" if wanted in ("auto", used) else " (bf16 asked for, but this CPU has no native bf16)"
        print(f"mmdet-mlflow: openvino runtime, precision {used}{note} (MMDET_MLFLOW_PRECISION="
              f"{wanted}; {onnx_path.name})", file=sys.stderr, flush=True)
    batch_size = batch_size or forward_batch_size(info, on_gpu=False)
    return OpenVinoPredictor(compiled, spec, info["classes"],
                             PredictParams.from_dict(info["default_params"]),
                             batch_size=batch_size, precision=used, family=family_of(info))
