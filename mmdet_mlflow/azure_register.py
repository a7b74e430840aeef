"""Register an MLflow model folder as an Azure ML model (azure-ai-ml SDK v2), and say which
version it became in a small JSON file the deploy steps of a pipeline read."""
from __future__ import annotations

import json
import logging
from pathlib import Path

logger = logging.getLogger(__name__)
DETAILS_FILE = "model.json"


def model_entity(model_folder: Path, name: str, description: str | None = None):
    from azure.ai.ml.constants import AssetTypes
    from azure.ai.ml.entities import Model

    info = json.loads((Path(model_folder) / "model" / "model.json").read_text())
    return Model(
        path=str(model_folder), type=AssetTypes.MLFLOW_MODEL, name=name,
        description=description or f"RTMDet-Ins ({info['config_name']}) instance segmentation, "
                                   f"{len(info['classes'])} classes, packaged by mmdet-mlflow",
        tags={"base_model_task": "image-instance-segmentation", "config_name": info["config_name"],
              "classes": ",".join(info["classes"])[:250]},
    )


def register(model_folder: Path, name: str, details_dir: Path, client=None, dry_run: bool = False) -> dict:
    """Create the model version (unless ``dry_run``) and write ``details_dir/model.json`` with
    its ``azureml:name:version`` id (``azureml:name@latest`` in a dry run)."""
    entity = model_entity(model_folder, name)
    details_dir.mkdir(parents=True, exist_ok=True)
    if dry_run:
        details = {"name": name, "version": None, "id": f"azureml:{name}@latest", "dry_run": True}
        logger.info("dry run: would register %s from %s", name, model_folder)
    else:
        if client is None:
            from mmdet_mlflow.azure_deploy import ml_client

            client = ml_client()
        created = client.models.create_or_update(entity)
        details = {"name": created.name, "version": created.version,
                   "id": f"azureml:{created.name}:{created.version}", "dry_run": False}
        logger.info("registered %s", details["id"])
    (details_dir / DETAILS_FILE).write_text(json.dumps(details, indent=2))
    return details


def registered_model_id(details_dir: Path) -> str:
    """The model id a register step wrote."""
    return json.loads((Path(details_dir) / DETAILS_FILE).read_text())["id"]
