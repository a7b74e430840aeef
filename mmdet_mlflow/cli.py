"""``mmdet-mlflow``: one command, a subcommand per job. Each subcommand lives in
``mmdet_mlflow/commands/<name>.py`` with ``add_parser(subparsers)``; its handler only turns
arguments into a library call."""
from __future__ import annotations

import argparse
import importlib
import sys

# Only the error base class, nothing heavy: the register and deploy components run the CLI in
# an environment without the serving stack (components/environment/deploy-conda.yaml).
from scoring.errors import MmdetMlflowError

COMMANDS = ("package", "predict", "serve", "batch", "spark-batch", "convert", "synth", "finetune",
            "evaluate", "demo", "register", "deploy", "pipeline")


def build_parser(commands: tuple[str, ...] = COMMANDS) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mmdet-mlflow",
        description="mmdet detectors (object detection and instance segmentation) as MLflow models: package, predict, "
                    "fine-tune, evaluate, serve and deploy on Azure ML.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in commands:
        importlib.import_module(f"mmdet_mlflow.commands.{name.replace('-', '_')}").add_parser(subparsers)
    return parser


def quiet_known_noise() -> None:
    """Deprecation chatter from mmdet 3.3 / mmengine under torch 2.13 that users can do nothing
    about; real warnings still show."""
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(mmdet|mmengine|mmcv)\.")
    warnings.filterwarnings("ignore", message=r"torch\.meshgrid")
    warnings.filterwarnings("ignore", category=DeprecationWarning)


def commands_to_load(argv: list[str]) -> tuple[str, ...]:
    """Only the command being run when it comes first: a command's module may import what
    another command's environment lacks (fine-tuning needs numpy; the deploy components have
    only the Azure ML SDK). Otherwise (``--help``, a typo) all of them, for the usage message."""
    return (argv[0],) if argv and argv[0] in COMMANDS else COMMANDS


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    quiet_known_noise()
    args = build_parser(commands_to_load(argv)).parse_args(argv)
    try:
        return args.handler(args) or 0
    except (MmdetMlflowError, FileNotFoundError, FileExistsError) as err:
        print(f"mmdet-mlflow {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"mmdet-mlflow {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
