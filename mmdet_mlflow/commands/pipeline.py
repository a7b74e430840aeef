"""mmdet-mlflow pipeline submit: load a pipeline job YAML with azure-ai-ml, resolve its
components from their files, validate it, then print it (--dry-run) or submit it."""
from __future__ import annotations

from pathlib import Path

from mmdet_mlflow.commands.workspace import add_workspace_arguments, workspace_client


def add_parser(subparsers):
    p = subparsers.add_parser("pipeline", help="validate and submit an Azure ML pipeline job")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    submit = actions.add_parser("submit", help="validate a pipeline YAML, then print or submit it")
    submit.add_argument("--file", default="pipelines/finetune-evaluate-deploy.yaml", type=Path)
    submit.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a field, as `az ml job create --set` does (e.g. inputs.number_of_epochs=5)")
    submit.add_argument("--dry-run", action="store_true", help="print the resolved job; contact nothing")
    add_workspace_arguments(submit)
    submit.set_defaults(handler=run)


def run(args):
    # azure.ai.ml takes seconds to import: only when the command runs, not for `--help`
    from mmdet_mlflow.azure.pipeline import load_pipeline, resolved_yaml, submit

    job = load_pipeline(args.file, args.overrides)
    print(resolved_yaml(job), end="")
    if args.dry_run:
        return 0
    created = submit(job, workspace_client(args))
    print(f"submitted {created.name}: {created.studio_url}")
    return 0
