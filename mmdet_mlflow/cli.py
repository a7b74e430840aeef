"""``mmdet-mlflow``: one command, a subcommand per job. Each subcommand lives in
``mmdet_mlflow/commands/<name>.py`` with ``add_parser(subparsers)``; its handler only turns
arguments into a library call."""
from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = ("package", "predict", "batch", "convert", "synth", "finetune", "evaluate", "demo",
            "pipeline")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mmdet-mlflow",
        description="RTMDet-Ins instance segmentation as an MLflow model: package, predict, "
                    "fine-tune, evaluate, serve and deploy on Azure ML.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"mmdet_mlflow.commands.{name}").add_parser(subparsers)
    return parser


def quiet_known_noise() -> None:
    """Deprecation chatter from mmdet 3.3 / mmengine under torch 2.13 that users can do nothing
    about; real warnings still show."""
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(mmdet|mmengine|mmcv)\.")
    warnings.filterwarnings("ignore", message=r"torch\.meshgrid")
    warnings.filterwarnings("ignore", category=DeprecationWarning)


def main(argv=None) -> int:
    from mlflow_model.checkpoints import CheckpointError
    from mlflow_model.configs import ConfigError
    from mmdet_mlflow.azure_pipeline import PipelineError
    from mmdet_mlflow.data import DataError
    from mmdet_mlflow.training import FinetuneError
    from mmdet_mlflow.metrics import EvaluationError
    from scoring.errors import InputError

    quiet_known_noise()
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args) or 0
    except (CheckpointError, ConfigError, DataError, EvaluationError, FinetuneError, InputError,
            PipelineError, FileNotFoundError, FileExistsError) as err:
        print(f"mmdet-mlflow {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"mmdet-mlflow {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
