"""Pipeline jobs (pipelines/*.yaml): loaded and validated offline with azure-ai-ml's own loader,
which resolves every component from this repository."""
from __future__ import annotations

from pathlib import Path


class PipelineError(ValueError):
    pass


def load_pipeline(path: Path, overrides: list[str] | None = None):
    """The PipelineJob, with ``key=value`` overrides applied (as ``az ml job create --set``),
    validated locally: schema, component files, input/output wiring."""
    from azure.ai.ml import load_job

    params = []
    for override in overrides or []:
        key, sep, value = override.partition("=")
        if not sep:
            raise PipelineError(f"--set wants KEY=VALUE, got {override!r}")
        params.append({key: _typed(value)})
    try:
        job = load_job(source=str(path), params_override=params)
    except Exception as err:  # the loader raises marshmallow / SDK validation errors
        raise PipelineError(f"{path}: {err}") from None
    result = job._validate()
    if not result.passed:
        raise PipelineError(f"{path}: " + "; ".join(f"{k}: {v}" for k, v in result.error_messages.items()))
    return job


def resolved_yaml(job) -> str:
    """The job as YAML, its components inlined (what would be submitted)."""
    import json

    import yaml

    return yaml.safe_dump(json.loads(json.dumps(job._to_dict(), default=str)), sort_keys=False)


def submit(job, subscription_id=None, resource_group=None, workspace=None):
    from mmdet_mlflow.azure_deploy import ml_client

    return ml_client(subscription_id, resource_group, workspace).jobs.create_or_update(job)


def _typed(value: str):
    import yaml

    return yaml.safe_load(value)  # numbers, booleans and strings as YAML reads them
