"""Deployment settings -> the azure-ai-ml entities: endpoint, deployment, and our environment
when the settings name none. Pure construction: nothing here contacts Azure."""
from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

from azure.ai.ml.entities import (BatchEndpoint, BatchRetrySettings, CodeConfiguration, Environment,
                                  ManagedOnlineDeployment, ManagedOnlineEndpoint,
                                  ModelBatchDeployment, ModelBatchDeploymentSettings,
                                  OnlineRequestSettings, ProbeSettings, ResourceConfiguration)

import scoring.azureml
from mmdet_mlflow.azure.deployment_settings import BatchSettings, DeploySettingsError, OnlineSettings
from mmdet_mlflow.azure.environment import environment_entity
from scoring import settings as env_settings
from scoring.schema import PredictParams
from scoring.work import before_timeout

DESCRIPTION = "mmdet object detection / instance segmentation (mmdet-mlflow)"


class Entities(NamedTuple):
    endpoint: object
    deployment: object
    environment: Environment | None  # ours, to create first; None when the settings name one


def scoring_code(kind: str) -> tuple[Path, str]:
    """(the folder a deployment uploads as its code, the entry script in it): the one place
    that knows where the Azure entry scripts live."""
    return Path(scoring.azureml.__file__).resolve().parent, {"online": "score.py", "batch": "batch_score.py"}[kind]


def environment_reference(environment: str | None) -> tuple[str, Environment | None]:
    """(the ``azureml:name:version`` a deployment names, the Environment entity to create
    first or None when it is already registered)."""
    if environment:
        return environment, None
    ours = environment_entity()
    return f"azureml:{ours.name}:{ours.version}", ours


def deployment_basics(kind: str, settings: OnlineSettings | BatchSettings) -> tuple[dict, Environment | None]:
    """(what both kinds of deployment name: itself, its endpoint, model, environment and
    scoring code; our environment to create first, or None)."""
    env_ref, environment = environment_reference(settings.environment)
    folder, script = scoring_code(kind)
    return dict(name=settings.deployment_name, endpoint_name=settings.endpoint_name,
                model=settings.model, environment=env_ref,
                code_configuration=CodeConfiguration(code=str(folder), scoring_script=script)), environment


def online_entities(settings: OnlineSettings) -> Entities:
    if settings.no_code:
        if settings.environment:
            raise DeploySettingsError("a no-code deployment names no environment: Azure makes one "
                                      "from the model's conda.yaml")
        # What Azure completes itself for an MLflow model: the environment and scoring script.
        basics = dict(name=settings.deployment_name, endpoint_name=settings.endpoint_name,
                      model=settings.model)
        environment = None
    else:
        basics, environment = deployment_basics("online", settings)
    endpoint = ManagedOnlineEndpoint(
        name=settings.endpoint_name, auth_mode=settings.auth_mode, description=DESCRIPTION,
        traffic={settings.deployment_name: settings.traffic_percent})

    def probe(initial_delay: int):
        return ProbeSettings(initial_delay=initial_delay, period=settings.probe_period,
                             timeout=settings.probe_timeout,
                             failure_threshold=settings.probe_failure_threshold, success_threshold=1)

    deployment = ManagedOnlineDeployment(
        **basics,
        instance_type=settings.instance_type,
        instance_count=settings.instance_count,
        request_settings=OnlineRequestSettings(
            request_timeout_ms=settings.request_timeout_ms,
            max_concurrent_requests_per_instance=settings.max_concurrent_requests,
            max_queue_wait_ms=settings.max_queue_wait_ms),
        liveness_probe=probe(settings.liveness_initial_delay),
        readiness_probe=probe(settings.readiness_initial_delay),
        # one model copy per instance, serving one request at a time (max_concurrent_requests)
        # A request's work stops before Azure's request timeout, so the client gets our answer
        # (what to change) rather than a bare 408, and the worker is free for the next request.
        environment_variables=_deployment_env(
            {"WORKER_COUNT": "1",
             env_settings.REQUEST_TIMEOUT.env: f"{before_timeout(settings.request_timeout_ms / 1000):g}"},
            settings),
    )
    return Entities(endpoint, deployment, environment)


def batch_entities(settings: BatchSettings) -> Entities:
    PredictParams().updated(settings.params)  # a bad param fails here, not in every job
    basics, environment = deployment_basics("batch", settings)
    endpoint = BatchEndpoint(name=settings.endpoint_name, description=DESCRIPTION)
    variables = {env_settings.BATCH_PARAMS.env: json.dumps(settings.params)} if settings.params else {}
    # Each picture of a mini-batch gets its share of the mini-batch's timeout: one picture that
    # takes too long becomes an error row instead of failing (and retrying) its whole mini-batch.
    picture_seconds = before_timeout(settings.retry_timeout) / max(1, settings.mini_batch_size)
    variables[env_settings.BATCH_PICTURE_TIMEOUT.env] = f"{picture_seconds:g}"
    deployment = ModelBatchDeployment(
        **basics,
        compute=settings.compute,
        resources=ResourceConfiguration(instance_count=settings.instance_count),
        settings=ModelBatchDeploymentSettings(
            mini_batch_size=settings.mini_batch_size,
            max_concurrency_per_instance=settings.max_concurrency_per_instance,
            output_action="append_row",
            output_file_name=settings.output_file_name,
            retry_settings=BatchRetrySettings(max_retries=settings.max_retries,
                                              timeout=settings.retry_timeout),
            error_threshold=settings.error_threshold,
            logging_level="info",
            environment_variables=_deployment_env(variables, settings),
        ),
    )
    return Entities(endpoint, deployment, environment)


def build_entities(kind: str, settings: OnlineSettings | BatchSettings) -> Entities:
    return {"online": online_entities, "batch": batch_entities}[kind](settings)


def _deployment_env(variables: dict, settings: OnlineSettings | BatchSettings) -> dict:
    """The deployment's environment variables: ``variables``, the URL allow-list, and the
    model's ``model_config`` as MLflow's own variable for it (what the entry scripts and
    MLflow's loader read when nobody passes ``model_config`` at load), checked here so a bad
    key fails at deploy time, not in every container."""
    variables = dict(variables)
    if settings.url_allowlist:
        variables[env_settings.URL_ALLOWLIST.env] = settings.url_allowlist
    if settings.model_config:
        try:
            env_settings.ModelConfig(settings.model_config)
        except env_settings.SettingError as err:
            raise DeploySettingsError(str(err)) from None
        variables["MLFLOW_PYFUNC_INFERENCE_CONFIG"] = json.dumps(settings.model_config)
    return variables
