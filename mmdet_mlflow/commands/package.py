"""mmdet-mlflow package: config + checkpoint -> MLflow model directory."""
from __future__ import annotations


def add_parser(subparsers):
    p = subparsers.add_parser("package", help="write an MLflow model directory from a config and checkpoint")
    p.add_argument("--config", required=True,
                   help="an RTMDet-Ins config name mmdet ships (e.g. rtmdet-ins_x_8xb16-300e_coco) or a config file")
    p.add_argument("--checkpoint", required=True,
                   help="a checkpoint path, an http(s) URL, or 'official' (published COCO weights, sha256-checked)")
    p.add_argument("--output", required=True, help="the model directory to create (must not exist)")
    p.add_argument("--classes", help="comma-separated class names (default: from the checkpoint, else COCO)")
    p.set_defaults(handler=run)


def run(args):
    import mlflow_model

    classes = [c.strip() for c in args.classes.split(",")] if args.classes else None
    model = mlflow_model.save_model(args.output, args.config, args.checkpoint, classes=classes)
    flavor = model.flavors[mlflow_model.FLAVOR_NAME]
    print(f"packaged {flavor['config_name']} ({len(flavor['classes'])} classes, weights sha256 "
          f"{flavor['checkpoint']['sha256'][:12]}) into {args.output}")
    print(f"serve it: mlflow models serve -m {args.output} --env-manager local -p 5000")
