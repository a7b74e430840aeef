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
                  default_params: dict | None = None, gate_data: Path | None = None,
                  gate_data_name: str | None = None,
                  accept_accuracy_drop: bool = False,
                  max_accuracy_drop: float | None = None) -> tuple[Path, Path]:
    """Write ``pytorch_dir`` (a weights folder: config.py, weights.pth as plain tensors,
    model.json) and ``mlflow_dir`` (our MLflow flavor, served by ``runtime``, answering with
    ``default_params`` unless a request says otherwise). An OpenVINO model passes
    ``package --runtime openvino``'s accuracy gate first (``precision_check.package_gated``),
    measured on ``gate_data`` (the validation data as COCO JSON; ``gate_data_name`` names them in
    messages): AccuracyDropError, and no ``mlflow_dir``, when bf16 loses too much."""
    weights = {k.removeprefix("module."): v for k, v in weights.items()}
    with publishing(pytorch_dir) as tmp:
        staged = WeightsDir(tmp)
        cfg.dump(str(staged.config))
        write_weights(weights, staged.weights)
        atomic_write_json(staged.info_file, dict(classes=classes, **(info or {})))
    exported = WeightsDir(pytorch_dir)

    def save(path: Path):
        return mlflow_model.save_model(path, str(exported.config), str(exported.weights), classes=classes,
                                       runtime=runtime, default_params=default_params)

    with publishing(mlflow_dir) as tmp:
        tmp.rmdir()  # save_model (or the gate's staging) creates the folder itself
        if runtime == "openvino" and gate_data is not None:
            from mmdet_mlflow.precision_check import MAX_SEGM_MAP_DROP, ImageSource, package_gated

            source = ImageSource.read(Path(gate_data))
            if gate_data_name:  # messages name the data the user gave, not our COCO copy
                source = source._replace(path=Path(gate_data_name))
            package_gated(tmp, save, source, accept_accuracy_drop,
                          MAX_SEGM_MAP_DROP if max_accuracy_drop is None else max_accuracy_drop)
        else:
            save(tmp)
    return pytorch_dir, mlflow_dir
