"""mmdet-mlflow pipeline submit: load a pipeline job YAML with azure-ai-ml, resolve its
components from this repo, validate it, then print it (--dry-run) or submit it."""
from __future__ import annotations

from pathlib import Path


def add_parser(subparsers):
    p = subparsers.add_parser("pipeline", help="validate and submit an Azure ML pipeline job")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    submit = actions.add_parser("submit", help="validate a pipeline YAML, then print or submit it")
    submit.add_argument("--file", default="pipelines/finetune-evaluate-deploy.yaml", type=Path)
    submit.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a field, as `az ml job create --set` does (e.g. inputs.number_of_epochs=5)")
    submit.add_argument("--dry-run", action="store_true", help="print the resolved job; contact nothing")
    submit.add_argument("--subscription-id")
    submit.add_argument("--resource-group")
    submit.add_argument("--workspace-name")
    submit.set_defaults(handler=run)


def run(args):
    from mmdet_mlflow.azure_pipeline import load_pipeline, resolved_yaml, submit

    job = load_pipeline(args.file, args.overrides)
    print(resolved_yaml(job), end="")
    if args.dry_run:
        return 0
    created = submit(job, args.subscription_id, args.resource_group, args.workspace_name)
    print(f"submitted {created.name}: {created.studio_url}")
    return 0
