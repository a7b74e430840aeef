"""The workspace options of the commands that talk to Azure ML (register, deploy, pipeline)."""
from __future__ import annotations

from mmdet_mlflow.azure.client import ml_client


def add_workspace_arguments(parser) -> None:
    group = parser.add_argument_group("workspace (default: the job's own inside Azure ML, else config.json)")
    group.add_argument("--subscription-id", help="default: AZUREML_ARM_SUBSCRIPTION in a job, else config.json")
    group.add_argument("--resource-group", help="default: AZUREML_ARM_RESOURCEGROUP in a job, else config.json")
    group.add_argument("--workspace-name", help="default: AZUREML_ARM_WORKSPACE_NAME in a job, else config.json")


def workspace_client(args):
    """An MLClient for the workspace the options name (DefaultAzureCredential)."""
    return ml_client(args.subscription_id, args.resource_group, args.workspace_name)
