"""Entities -> the YAML files ``az ml`` and azure-ai-ml's loaders read: what ``deploy --dry-run``
writes, and the examples in components/deploy_*/."""
from __future__ import annotations

import json
import os
from pathlib import Path

import yaml

from mmdet_mlflow.azure import environment
from mmdet_mlflow.azure.entities import Entities
from mmdet_mlflow.files import atomic_write_text

SCHEMA = "https://azuremlschemas.azureedge.net/latest/{}.schema.json"


def dump(data) -> str:
    return yaml.safe_dump(data, sort_keys=False)


def entity_yaml(entity, schema: str, base_dir: Path) -> str:
    """``entity`` as YAML, with local paths relative to ``base_dir`` (where the file goes).
    Written from the entity's own dict because the SDK's Endpoint.dump writes nothing
    (azure-ai-ml 1.35.2)."""
    data = _without_empty({"$schema": SCHEMA.format(schema), **json.loads(json.dumps(entity._to_dict()))})
    code = data.get("code_configuration", {})
    if code.get("code") and os.path.isabs(code["code"]):
        code["code"] = os.path.relpath(code["code"], base_dir)
    return dump(data)


def _without_empty(data):
    """Drop empty mappings (tags: {}, properties: {}, environment_variables: {}) recursively."""
    if isinstance(data, dict):
        return {k: _without_empty(v) for k, v in data.items() if v != {}}
    return data


def environment_yaml(base_dir: Path) -> str:
    """Our environment (``environment.environment_entity``) as ``environment.yml`` in
    ``base_dir``, its build context given relative to that folder."""
    return dump({
        "$schema": SCHEMA.format("environment"),
        "name": environment.NAME,
        "version": environment.environment_version(),
        "description": environment.DESCRIPTION,
        "build": {"path": os.path.relpath(environment.CONTEXT_DIR, Path(base_dir).resolve()),
                  "dockerfile_path": environment.DOCKERFILE},
        "tags": dict(environment.TAGS),
    })


def yaml_texts(kind: str, entities: Entities, base_dir: Path, with_environment: bool = True) -> dict[str, str]:
    """``<kind>-endpoint.yml``, ``<kind>-deployment.yml`` and (when the deployment uses our
    environment) ``environment.yml``, as text for files in ``base_dir``."""
    endpoint, deployment, env = entities
    base_dir = Path(base_dir).resolve()
    if kind == "online":
        # The service refuses traffic for a deployment that does not exist yet, so the endpoint
        # file carries none; deploy.deploy() sets it once the deployment is up (by hand: the
        # command written at the top of the file).
        traffic = dict(endpoint.traffic or {})
        endpoint.traffic = {}
        shown = ",".join(f"{name}={percent}" for name, percent in traffic.items())
        endpoint_text = (f"# Traffic ({shown}) is set once the deployment exists:\n"
                         f"#   az ml online-endpoint update -n {endpoint.name} --traffic \"{shown}\"\n"
                         + entity_yaml(endpoint, "managedOnlineEndpoint", base_dir))
        endpoint.traffic = traffic
        files = {"online-endpoint.yml": endpoint_text,
                 "online-deployment.yml": entity_yaml(deployment, "managedOnlineDeployment", base_dir)}
    else:
        files = {"batch-endpoint.yml": entity_yaml(endpoint, "batchEndpoint", base_dir),
                 "batch-deployment.yml": entity_yaml(deployment, "modelBatchDeployment", base_dir)}
    if env is not None and with_environment:
        files["environment.yml"] = environment_yaml(base_dir)
    return files


def write_yaml(kind: str, entities: Entities, out_dir: Path) -> dict[str, Path]:
    """Write yaml_texts() to ``out_dir``. Returns name -> path."""
    out_dir = Path(out_dir)
    return {name: atomic_write_text(out_dir / name, text)
            for name, text in yaml_texts(kind, entities, out_dir).items()}
