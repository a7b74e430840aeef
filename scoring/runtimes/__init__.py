"""The runtimes a saved model can run on, and the one place that picks one.

``model.json`` (in a saved model's ``model/`` folder) names the model's runtime: ``torch`` (mmdet
on torch; the default, and what models saved before the field existed use) or ``onnx`` (ONNX
Runtime, no torch/mmcv/mmdet needed) or ``openvino`` (the same exported graph on OpenVINO
Runtime, in the precision the CPU runs fastest), and its family (``scoring.families``), whose
registry says which module loads it on that runtime. Each runtime module is imported only when a model needs
it, so a model's code loads without the other runtime's packages.
"""
from __future__ import annotations

import os

from scoring.errors import MmdetMlflowError
from scoring.runtimes.base import ImageDetections, MaskSource, Predictor

# Every runtime a saved model can name in model.json (the one list: the flavor, the CLI, the
# components and the pipeline take their choices from here).
RUNTIMES = ("torch", "onnx", "openvino")
DEFAULT_RUNTIME = "torch"

__all__ = ["DEFAULT_RUNTIME", "RUNTIMES", "ImageDetections", "MaskSource", "Predictor",
           "load_predictor", "runtime_of"]


class RuntimeNotAvailable(MmdetMlflowError):
    """The model asks for a runtime this code does not know or cannot import."""


def runtime_of(info: dict) -> str:
    runtime = info.get("runtime", DEFAULT_RUNTIME)
    if runtime not in RUNTIMES:
        raise RuntimeNotAvailable(f"the model's runtime {runtime!r} is not one of {', '.join(RUNTIMES)}")
    return runtime


def load_predictor(weights_dir: str | os.PathLike, device: str | None = None,
                   batch_size: int | None = None, model_config=None) -> Predictor:
    """The predictor of a saved model's ``model/`` folder: model.json is read once, here, and
    the loader its family registers for its runtime builds the predictor. ``model_config``: the
    model's options (a dict or ``scoring.settings.ModelConfig``; an unknown key is refused),
    read first while it loads and, kept as ``predictor.model_config``, while it scores."""
    from scoring import settings
    from scoring.families import family_of
    from scoring.model_dir import WeightsDir

    config = model_config if isinstance(model_config, settings.ModelConfig) else \
        settings.ModelConfig(model_config)
    with settings.using(config):
        margin = settings.MASK_BOX_MARGIN.value()  # a bad value is refused before the model loads
        info = WeightsDir(weights_dir).read_info()
        load = family_of(info).loader(runtime_of(info))
        predictor = load(weights_dir, info=info, device=device, batch_size=batch_size)
    predictor.mask_box_margin = margin
    predictor.model_config = config
    return predictor
