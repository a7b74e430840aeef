"""A fine-tune's output folder, which is also its resume state::

    checkpoints/            mmengine's checkpoints (last_checkpoint names the newest)
    data/                   the training and validation sets as COCO JSON (what mmdet reads)
    run.json                start point, classes, settings, MLflow run id (for resume)
    metrics.json            per-epoch validation metrics and the exported epoch
    history.jsonl           per-step losses and per-epoch metrics (survives restarts)
    training_curves.png     loss and validation metrics
    evaluation.log          pycocotools' tables, per validation
    mlflow_model_folder/    the exported models, unless put elsewhere (names owned by
    pytorch_model_folder/   mlflow_model.model_dir)
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from scoring.model_dir import WeightsDir
from mlflow_model.model_dir import finetune_outputs


class TrainingOutput:
    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)

    @property
    def checkpoints(self) -> Path:
        return self.folder / "checkpoints"

    @property
    def data(self) -> Path:
        return self.folder / "data"

    @property
    def train_coco(self) -> Path:
        return self.data / "train.coco.json"

    @property
    def validation_coco(self) -> Path:
        return self.data / "validation.coco.json"

    @property
    def run_info(self) -> Path:
        return self.folder / "run.json"

    @property
    def metrics(self) -> Path:
        return self.folder / "metrics.json"

    @property
    def history(self) -> Path:
        return self.folder / "history.jsonl"

    @property
    def curves(self) -> Path:
        return self.folder / "training_curves.png"

    @property
    def evaluation_log(self) -> Path:
        return self.folder / "evaluation.log"

    @property
    def mlflow_model(self) -> Path:
        return finetune_outputs(self.folder)[0]

    @property
    def pytorch_model(self) -> Path:
        return finetune_outputs(self.folder)[1]

    def read_run_info(self) -> dict:
        return json.loads(self.run_info.read_text()) if self.run_info.is_file() else {}


def finetuned_classes(output_dir: str | os.PathLike) -> list[str]:
    """The class names a fine-tune's exported model predicts, in its order (for the demo and
    anyone registering the pytorch_model_folder)."""
    return list(WeightsDir(TrainingOutput(output_dir).pytorch_model).read_info()["classes"])
