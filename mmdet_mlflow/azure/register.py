"""Register a saved MLflow model folder as an Azure ML model (azure-ai-ml SDK v2), and say
which version it became in ``registration.json`` (``model_dir.REGISTRATION_FILE``), the file the
deploy steps of a pipeline read."""
from __future__ import annotations

import json
import logging
from pathlib import Path

from azure.ai.ml.constants import AssetTypes
from azure.ai.ml.entities import Model

from scoring.families import family_of
from scoring.model_dir import ModelDir
from scoring.schema import AZURE_TASKS
from mlflow_model.model_dir import REGISTRATION_FILE
from mmdet_mlflow.azure.client import ml_client
from mmdet_mlflow.files import atomic_write_json

logger = logging.getLogger(__name__)


def model_entity(model_folder: Path, name: str, description: str | None = None):
    """The model version to create, tagged with the task it serves (``task``: ours, and
    ``base_model_task``: Azure's name for it) so a workspace tells an object detector from an
    instance segmenter without loading either."""
    info = ModelDir(model_folder).data.read_info()
    family = family_of(info)
    return Model(
        path=str(model_folder), type=AssetTypes.MLFLOW_MODEL, name=name,
        description=description or f"{family.title} ({info['config_name']}) {family.task}, "
                                   f"{len(info['classes'])} classes, packaged by mmdet-mlflow",
        tags={"task": family.task, "base_model_task": AZURE_TASKS[family.task],
              "family": family.name, "config_name": info["config_name"],
              "classes": ",".join(info["classes"])[:250]},
    )


def register(model_folder: Path, name: str, details_dir: Path, client=None, dry_run: bool = False) -> dict:
    """Create the model version (unless ``dry_run``) and write ``details_dir/registration.json``
    with its ``azureml:name:version`` id (``azureml:name@latest`` in a dry run). ``client``:
    an MLClient (default: ``client.ml_client()``); a dry run never makes one."""
    entity = model_entity(model_folder, name)
    if dry_run:
        details = {"name": name, "version": None, "id": f"azureml:{name}@latest", "dry_run": True}
        logger.info("dry run: would register %s from %s", name, model_folder)
    else:
        created = (client or ml_client()).models.create_or_update(entity)
        details = {"name": created.name, "version": created.version,
                   "id": f"azureml:{created.name}:{created.version}", "dry_run": False}
        logger.info("registered %s", details["id"])
    atomic_write_json(Path(details_dir) / REGISTRATION_FILE, details)
    return details


def registered_model_id(details_dir: Path) -> str:
    """The model id a register step wrote into ``details_dir``."""
    return json.loads((Path(details_dir) / REGISTRATION_FILE).read_text())["id"]
