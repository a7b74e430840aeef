"""mmdet-mlflow batch: score files with the Azure batch scoring script, locally and resumably."""
from __future__ import annotations

from pathlib import Path

from mmdet_mlflow.commands.predict import add_params_arguments, params_from_args


def add_parser(subparsers):
    p = subparsers.add_parser(
        "batch", help="score a folder (images, CSV / JSONL / parquet tables of images) as an "
                      "Azure batch endpoint would; resumable")
    p.add_argument("--model", required=True, help="an MLflow model directory saved by `package`")
    p.add_argument("--input", required=True,
                   help="a file or a folder (every entry in it, recursively, but hidden ones; "
                        "what cannot be read is an error record)")
    p.add_argument("--output", required=True,
                   help="JSON lines file, one {row, prediction, file, error} per image; rerun to resume")
    p.add_argument("--mini-batch-size", type=_positive_int, default=10,
                   help="files per run() call (default 10)")
    add_params_arguments(p)
    p.set_defaults(handler=run)


def _positive_int(text: str) -> int:
    import argparse

    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def run(args):
    from mmdet_mlflow.batch import run_batch

    counts = run_batch(Path(args.model), Path(args.input), Path(args.output), args.mini_batch_size,
                       params_from_args(args) or None)
    hidden = f"; {counts['hidden']} hidden, not read" if counts["hidden"] else ""
    print(f"{counts['files']} files ({counts['skipped']} already done{hidden}): {counts['images']} "
          f"images scored, {counts['errors']} errors -> {args.output}")
    return 1 if counts["errors"] else 0
