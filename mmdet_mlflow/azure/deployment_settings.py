"""What an online or a batch deployment can be told: one dataclass each.

The ``deploy`` command's options and the deploy components' inputs are made from these fields
(``commands.args.add_dataclass_arguments``, ``specs.component_yaml``), so settings, CLI and
component cannot drift apart. Light on purpose: the CLI imports it to build its parser.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from scoring.errors import MmdetMlflowError


class DeploySettingsError(MmdetMlflowError, ValueError):
    """Deployment settings that cannot work (no model named, ...)."""


@dataclass
class OnlineSettings:
    """A managed online endpoint + deployment. Defaults follow Azure's catalog examples
    (Standard_DS3_v2, 1 instance, 90 s timeout, 1 request at a time, 500 ms queue wait)."""

    endpoint_name: str
    model: str  # azureml:<name>:<version> (a registered MLflow model)
    deployment_name: str = "blue"
    environment: str | None = None  # azureml:<name>:<version>; None: ours (environment.py)
    instance_type: str = "Standard_DS3_v2"
    instance_count: int = 1
    request_timeout_ms: int = 90_000
    max_concurrent_requests: int = 1
    max_queue_wait_ms: int = 500
    traffic_percent: int = 100
    # Loading a ~400 MB model (imports, weights, model build) takes minutes on a small CPU
    # instance; and with one worker busy scoring a 90 s request, a probe may wait, so failures
    # are tolerated for well over a request timeout before the container is restarted.
    liveness_initial_delay: int = 180
    readiness_initial_delay: int = 30
    probe_period: int = 10
    probe_timeout: int = 10
    probe_failure_threshold: int = 30
    url_allowlist: str | None = None  # MMDET_MLFLOW_URL_ALLOWLIST in the deployment
    model_config: dict[str, Any] = field(default_factory=dict)
    auth_mode: str = "key"
    # Azure's no-code MLflow deployment: no environment and no scoring script; Azure installs the
    # model's conda.yaml at container start and scores with its generated script. Only for a
    # model packaged with --runtime onnx (a torch model's mmcv cannot compile there).
    no_code: bool = False


@dataclass
class BatchSettings:
    """A batch endpoint + model deployment. Defaults follow Azure's catalog examples (mini-batch
    of 2 files, 1 process per instance, 1 instance, 3 retries of 600 s, error threshold 0)."""

    endpoint_name: str
    model: str
    compute: str  # an AmlCompute cluster name
    deployment_name: str = "default"
    environment: str | None = None
    instance_count: int = 1
    mini_batch_size: int = 2
    max_concurrency_per_instance: int = 1
    max_retries: int = 3
    retry_timeout: int = 600
    error_threshold: int = 0  # bad files and rows are error records, not failed mini-batches
    output_file_name: str = "predictions.csv"
    params: dict[str, Any] = field(default_factory=dict)  # predict params for every image
    url_allowlist: str | None = None
    model_config: dict[str, Any] = field(default_factory=dict)


SETTINGS = {"online": OnlineSettings, "batch": BatchSettings}

# Help for the fields whose name does not say enough (the others: the name in words).
FIELD_HELP = {
    "endpoint_name": "endpoint name (unique in the Azure region)",
    "model": "registered MLflow model, azureml:<name>:<version> (or give registration_details)",
    "environment": "azureml:<name>:<version>; default: components/environment (built on first use)",
    "compute": "AmlCompute cluster that runs the batch jobs",
    "params": "predict params for every image, a JSON object",
    "url_allowlist": "hosts or CIDR networks image URLs may point to beyond the public internet",
    "model_config": "the model's options for this deployment, a JSON object of model_config keys "
                    "(docs/settings.md), e.g. {\"max_image_pixels\": 20000000}; passed to the "
                    "model as MLflow's MLFLOW_PYFUNC_INFERENCE_CONFIG",
    "no_code": "true: Azure's no-code MLflow deployment (no environment, no scoring script; "
               "models packaged with --runtime onnx only)",
}


def field_help(name: str) -> str:
    return FIELD_HELP.get(name, name.replace("_", " "))
