"""The runtimes a saved model can run on, and the one place that picks one.

``model.json`` (in a saved model's ``model/`` folder) names the model's runtime: ``torch`` (mmdet
on torch; the default, and what models saved before the field existed use) or ``onnx`` (ONNX
Runtime, no torch/mmcv/mmdet needed) or ``openvino`` (the same exported graph on OpenVINO
Runtime, in the precision the CPU runs fastest: ``scoring.runtimes.openvino_rtmdet``). Each runtime module is imported only when a model needs
it, so a model's code loads without the other runtime's packages.
"""
from __future__ import annotations

import os
from pathlib import Path

from scoring.errors import MmdetMlflowError
from scoring.runtimes.base import ImageDetections, MaskSource, Segmenter

DEFAULT_RUNTIME = "torch"
RUNTIMES = ("torch", "onnx", "openvino")

__all__ = ["DEFAULT_RUNTIME", "RUNTIMES", "ImageDetections", "MaskSource", "Segmenter",
           "load_segmenter", "runtime_of"]


class RuntimeNotAvailable(MmdetMlflowError):
    """The model asks for a runtime this code does not know or cannot import."""


def runtime_of(info: dict) -> str:
    runtime = info.get("runtime", DEFAULT_RUNTIME)
    if runtime not in RUNTIMES:
        raise RuntimeNotAvailable(f"the model's runtime {runtime!r} is not one of {', '.join(RUNTIMES)}")
    return runtime


def load_segmenter(weights_dir: str | os.PathLike, device: str | None = None,
                   batch_size: int | None = None) -> Segmenter:
    """The segmenter of a saved model's ``model/`` folder, on the runtime its model.json names."""
    from mlflow_model.model_dir import WeightsDir

    weights = WeightsDir(Path(weights_dir))
    runtime = runtime_of(weights.read_info())
    if runtime == "onnx":
        from mlflow_model.model_dir import ONNX_FILE, ONNX_INFO_KEY
        from scoring.runtimes.onnx_rtmdet import load_onnx_segmenter

        served = weights.read_info().get(ONNX_INFO_KEY, {}).get("serve", ONNX_FILE)
        providers = ["CPUExecutionProvider"] if device == "cpu" else None  # else CUDA when present
        return load_onnx_segmenter(weights.path, batch_size=batch_size, onnx_file=served,
                                   providers=providers)
    if runtime == "openvino":
        from scoring.runtimes.openvino_rtmdet import load_openvino_segmenter

        return load_openvino_segmenter(weights.path, batch_size=batch_size)
    from scoring.runtimes.torch_rtmdet import load_torch_segmenter

    return load_torch_segmenter(weights, device=device, batch_size=batch_size)
