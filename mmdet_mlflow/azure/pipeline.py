"""Pipeline jobs (pipelines/*.yaml): loaded and validated offline with azure-ai-ml's own loader,
which resolves every component the job names from its file, then submitted."""
from __future__ import annotations

import json
from pathlib import Path

import yaml
from azure.ai.ml import load_job

from scoring.errors import MmdetMlflowError


class PipelineError(MmdetMlflowError, ValueError):
    """A pipeline YAML that does not load or validate, or an override that does not parse."""


def load_pipeline(path: Path, overrides: list[str] | None = None):
    """The PipelineJob, with ``key=value`` overrides applied (as ``az ml job create --set``),
    validated locally: schema, component files, input/output wiring."""
    params = []
    for override in overrides or []:
        key, sep, value = override.partition("=")
        if not sep:
            raise PipelineError(f"--set wants KEY=VALUE, got {override!r}")
        params.append({key: yaml.safe_load(value)})  # numbers, booleans and strings as YAML reads them
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
    return yaml.safe_dump(json.loads(json.dumps(job._to_dict(), default=str)), sort_keys=False)


def submit(job, client):
    """Submit ``job`` with an MLClient (``client.ml_client``); returns the created job."""
    return client.jobs.create_or_update(job)
