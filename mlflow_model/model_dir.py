"""The folder layouts only tooling writes: a fine-tune's outputs and an Azure registration's
details. A saved model's own layout, which serving reads, is ``scoring.model_dir``'s.

A fine-tune's output folder holds ``mlflow_model_folder/`` (a saved MLflow model) and
``pytorch_model_folder/`` (a weights folder, ``scoring.model_dir.WeightsDir``) beside its training
state. An Azure registration step writes ``registration.json`` (what was registered, its id) into
its output folder. This module knows these names; nobody else spells them.
"""
from __future__ import annotations

import os
from pathlib import Path

FINETUNE_MLFLOW_DIR = "mlflow_model_folder"
FINETUNE_PYTORCH_DIR = "pytorch_model_folder"
REGISTRATION_FILE = "registration.json"


def finetune_outputs(output_dir: str | os.PathLike) -> tuple[Path, Path]:
    """(mlflow_model_folder, pytorch_model_folder) of a fine-tune's output folder."""
    output_dir = Path(output_dir)
    return output_dir / FINETUNE_MLFLOW_DIR, output_dir / FINETUNE_PYTORCH_DIR
