"""The trained weights as our two model folders, each published atomically (built aside, fsynced,
ordinary permissions, then moved in place: mmdet_mlflow.files.publishing)."""
from __future__ import annotations

from pathlib import Path

import mlflow_model
from mlflow_model.checkpoints import write_weights
from scoring.model_dir import WeightsDir
from mmdet_mlflow.files import atomic_write_json, publishing


def export_models(cfg, weights: dict, classes: list[str], pytorch_dir: Path, mlflow_dir: Path,
                  info: dict | None = None, runtime: str = "torch",
                  default_params: dict | None = None) -> tuple[Path, Path]:
    """Write ``pytorch_dir`` (a weights folder: config.py, weights.pth as plain tensors,
    model.json) and ``mlflow_dir`` (our MLflow flavor, served by ``runtime``, answering with
    ``default_params`` unless a request says otherwise)."""
    weights = {k.removeprefix("module."): v for k, v in weights.items()}
    with publishing(pytorch_dir) as tmp:
        staged = WeightsDir(tmp)
        cfg.dump(str(staged.config))
        write_weights(weights, staged.weights)
        atomic_write_json(staged.info_file, dict(classes=classes, **(info or {})))
    exported = WeightsDir(pytorch_dir)
    with publishing(mlflow_dir) as tmp:
        tmp.rmdir()  # save_model creates the folder itself
        mlflow_model.save_model(tmp, str(exported.config), str(exported.weights), classes=classes,
                                runtime=runtime, default_params=default_params)
    return pytorch_dir, mlflow_dir
