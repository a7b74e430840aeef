"""mmdet-mlflow spark-batch: score a folder of pictures on Spark into Parquet, resumably."""
from __future__ import annotations

import argparse

from mmdet_mlflow.commands.batch import _positive_int
from mmdet_mlflow.commands.predict import add_params_arguments, params_from_args


def add_parser(subparsers):
    p = subparsers.add_parser(
        "spark-batch", help="score every picture under a folder (or a lake path) on Spark: one "
                            "row per picture in Parquet (+ JSON lines); rerun to resume")
    p.add_argument("--model", required=True,
                   help="an MLflow model folder saved by `package`, or an MLflow model URI")
    p.add_argument("--input", required=True, help="a folder of pictures, read recursively "
                                                  "(any path Spark reads: abfss://, dbfs:/, ...)")
    p.add_argument("--output", required=True,
                   help="a folder: parquet/batch=N/ with one row per picture, _checkpoint/ to resume")
    p.add_argument("--master", help="Spark master, e.g. local[2] (default: the cluster's, "
                                    "or the active session's)")
    p.add_argument("--glob", help="only file names matching this glob, e.g. '*.jpg'")
    p.add_argument("--jsonl", action="store_true", help="also write the rows as JSON lines "
                                                        "under jsonl/batch=N/")
    p.add_argument("--files-per-batch", type=_positive_int, default=1000,
                   help="pictures per micro-batch, the most a killed run redoes (default 1000)")
    p.add_argument("--records-per-arrow-batch", type=_positive_int, default=16,
                   help="pictures per Arrow batch sent to a Python worker (default 16)")
    p.add_argument("--max-file-bytes", type=_positive_int, default=None,
                   help="larger files are error rows, never read (default: "
                        "MMDET_MLFLOW_MAX_REQUEST_BYTES, 64 MiB)")
    p.add_argument("--fast-start", action=argparse.BooleanOptionalAction, default=None,
                   help="start a local[N] Spark's driver JVM in about 2 s instead of 4 to 5: the "
                        "first such run writes a class-data archive of about 190 MB to the cache "
                        "(said before it is written) and later ones start from it (default: "
                        "MMDET_MLFLOW_SPARK_FAST_START, off)")
    add_params_arguments(p)
    p.set_defaults(handler=run)


def run(args):
    from mmdet_mlflow import spark_jvm
    from mmdet_mlflow.spark_batch import run_spark_batch

    try:
        counts = run_spark_batch(args.model, args.input, args.output, master=args.master,
                                 glob=args.glob, jsonl=args.jsonl,
                                 params=params_from_args(args) or None,
                                 files_per_batch=args.files_per_batch,
                                 records_per_arrow_batch=args.records_per_arrow_batch,
                                 max_file_bytes=args.max_file_bytes, fast_start=args.fast_start)
    finally:
        spark_jvm.write_archive_if_asked()
    loads = counts["model_loads"]
    unlisted = f" ({counts['unlisted']} entries Spark does not list)" if counts["unlisted"] else ""
    hidden = f"; {counts['hidden']} hidden, not read" if counts["hidden"] else ""
    print(f"{counts['this_run']} pictures scored this run; {counts['pictures']} in the output, "
          f"{counts['errors']} of them errors{unlisted}{hidden} -> {args.output}; the model loaded "
          f"{sum(loads.values())} times in {len(loads)} Python workers")
    return 0  # unreadable pictures are rows of the output, not a failed job
