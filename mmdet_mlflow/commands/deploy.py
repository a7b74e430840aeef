"""mmdet-mlflow deploy online|batch: create or update an Azure ML endpoint and its deployment
for a registered model. --dry-run writes the endpoint, deployment and environment YAML that
`az ml` takes, and contacts nothing. One option per deployment setting
(mmdet_mlflow.azure.deployment_settings), as the deploy components have one input per setting."""
from __future__ import annotations

from pathlib import Path

from mmdet_mlflow.azure.client import log_progress
from mmdet_mlflow.azure.deployment_settings import FIELD_HELP, SETTINGS, DeploySettingsError, field_help
from mmdet_mlflow.commands.args import add_dataclass_arguments, boolean, dataclass_values
from mmdet_mlflow.commands.workspace import add_workspace_arguments, workspace_client

WHERE = {"online": "a managed online endpoint", "batch": "a batch endpoint"}


def add_parser(subparsers):
    p = subparsers.add_parser("deploy", help="deploy a registered model to an Azure ML endpoint",
                              description=__doc__)
    kinds = p.add_subparsers(dest="kind", required=True, metavar="KIND")
    for kind, where in WHERE.items():
        k = kinds.add_parser(kind, help=f"deploy to {where}", description=f"Deploy to {where}.")
        add_dataclass_arguments(k, SETTINGS[kind], helps=FIELD_HELP, skip=("model",))
        k.add_argument("--model", help=field_help("model"))
        k.add_argument("--registration-details", type=Path,
                       help="instead of --model: the output folder of a register step (registration.json)")
        k.add_argument("--enabled", type=boolean, default=True, metavar="BOOL",
                       help="false: deploy nothing (lets a pipeline switch this deployment off)")
        k.add_argument("--dry-run", nargs="?", const=True, default=False, type=boolean, metavar="BOOL",
                       help="write and print the endpoint, deployment and environment YAML; contact nothing")
        k.add_argument("--output-dir", type=Path,
                       help=f"where the YAML goes (with --dry-run: default ./azure-{kind})")
        add_workspace_arguments(k)
        k.set_defaults(handler=run)


def run(args):
    if not args.enabled:
        print(f"{args.kind} deployment switched off (--enabled false): nothing to do")
        return 0
    # azure.ai.ml takes seconds to import: only when the command runs, not for `--help`
    from mmdet_mlflow.azure.deploy import deploy
    from mmdet_mlflow.azure.entities import build_entities
    from mmdet_mlflow.azure.register import registered_model_id
    from mmdet_mlflow.azure.yaml_files import write_yaml

    if args.model is None and args.registration_details is None:
        raise DeploySettingsError("give --model azureml:<name>:<version> or --registration-details DIR")
    values = dataclass_values(args, SETTINGS[args.kind])
    values["model"] = args.model or registered_model_id(args.registration_details)
    entities = build_entities(args.kind, SETTINGS[args.kind](**values))
    out_dir = args.output_dir or (Path(f"azure-{args.kind}") if args.dry_run else None)
    if out_dir:
        for path in write_yaml(args.kind, entities, out_dir).values():
            print(f"# --- {path}\n{path.read_text()}", end="" if args.dry_run else "\n")
    if args.dry_run:
        return 0
    log_progress()
    deploy(args.kind, entities, workspace_client(args))
    return 0
