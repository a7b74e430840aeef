"""The MLClient every workspace operation uses (register, deploy, pipeline submit), and the
logging those operations share.

Credentials come from azure-identity's DefaultAzureCredential (environment, managed identity,
Azure CLI login, ...): nothing secret is read from or written to files, and only resource names
are logged.
"""
from __future__ import annotations

import logging
import os


def ml_client(subscription_id: str | None = None, resource_group: str | None = None,
              workspace: str | None = None):
    """An MLClient with DefaultAzureCredential. The workspace comes from the arguments, else
    from the variables Azure sets inside a job (AZUREML_ARM_*), else from a config.json."""
    # azure.ai.ml takes seconds to import, and the CLI imports this module to build its parser:
    # only the paths that talk to a workspace pay for it
    from azure.ai.ml import MLClient
    from azure.identity import DefaultAzureCredential

    credential = DefaultAzureCredential()
    subscription_id = subscription_id or os.environ.get("AZUREML_ARM_SUBSCRIPTION")
    resource_group = resource_group or os.environ.get("AZUREML_ARM_RESOURCEGROUP")
    workspace = workspace or os.environ.get("AZUREML_ARM_WORKSPACE_NAME")
    if subscription_id and resource_group and workspace:
        return MLClient(credential, subscription_id, resource_group, workspace)
    return MLClient.from_config(credential)


def log_progress() -> None:
    """Our progress messages at INFO; the SDK's own HTTP request logging off."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("azure").setLevel(logging.WARNING)
