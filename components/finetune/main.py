"""Azure ML entry of the fine-tune component (spec.yaml): arguments -> mmdet_mlflow.finetune.

Azure starts one process per GPU (distribution: pytorch) with torchrun's environment; the
library sets up DDP and lets rank 0 write the outputs. Resuming: a restarted job finds its
checkpoints in the training_state output.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the code snapshot's root

from mmdet_mlflow.commands.finetune import add_settings_arguments, settings_from_args  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Fine-tune RTMDet-Ins (Azure ML component entry)")
    parser.add_argument("--mlflow-model", help="MLflow model folder to start from")
    parser.add_argument("--pytorch-model", help="pytorch_model_folder to start from")
    parser.add_argument("--model-name", help="config name to start from (with --checkpoint)")
    parser.add_argument("--checkpoint", default="official", help="with --model-name: URL, official or none")
    parser.add_argument("--training-data", required=True)
    parser.add_argument("--validation-data", required=True)
    parser.add_argument("--mlflow-model-folder", required=True)
    parser.add_argument("--pytorch-model-folder", required=True)
    parser.add_argument("--output", required=True, help="training state: checkpoints, metrics, plot")
    add_settings_arguments(parser)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    from mmdet_mlflow.finetune import finetune

    args = parse_args(argv)
    finetune(args.training_data, args.validation_data, args.output,
             model=args.mlflow_model or args.pytorch_model, config=args.model_name,
             checkpoint=args.checkpoint if args.model_name else None,
             settings=settings_from_args(args), mlflow_model_dir=args.mlflow_model_folder,
             pytorch_model_dir=args.pytorch_model_folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
