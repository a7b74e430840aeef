"""mmdet-mlflow register: register a saved MLflow model folder as an Azure ML model and write
registration.json (its azureml:name:version id) for the deploy steps."""
from __future__ import annotations

from pathlib import Path

from mmdet_mlflow.azure.client import log_progress
from mmdet_mlflow.commands.args import boolean
from mmdet_mlflow.commands.workspace import add_workspace_arguments, workspace_client


def add_parser(subparsers):
    p = subparsers.add_parser("register", help="register a saved model in an Azure ML workspace",
                              description=__doc__)
    p.add_argument("--model", required=True, type=Path, help="an MLflow model folder saved by `package` or `finetune`")
    p.add_argument("--name", required=True, help="the registered model's name")
    p.add_argument("--output", required=True, type=Path,
                   help="folder for registration.json (the registered model's id)")
    p.add_argument("--dry-run", nargs="?", const=True, default=False, type=boolean, metavar="BOOL",
                   help="write registration.json (id azureml:NAME@latest) without registering; contact nothing")
    add_workspace_arguments(p)
    p.set_defaults(handler=run)


def run(args):
    # azure.ai.ml takes seconds to import: only when the command runs, not for `--help`
    from mmdet_mlflow.azure import register

    log_progress()
    client = None if args.dry_run else workspace_client(args)
    details = register.register(args.model, args.name, args.output, client=client, dry_run=args.dry_run)
    print(details["id"])
    return 0
