"""``mmdet-mlflow spark-batch``: score a folder (or a lake path) of pictures on Spark, resumably.

Spark reads the pictures (``binaryFile``: recursive, an optional glob), the model scores them in
the Python workers (loaded once per worker, through ``mlflow.pyfunc.load_model``, and the one
runner), and one row per picture is written as Parquet (and optionally JSON lines):

    OUTPUT/parquet/batch=N/part-*.parquet   path, modificationTime, length, boxes, error,
    OUTPUT/jsonl/batch=N/part-*.json        model, params (the same rows, with --jsonl)
    OUTPUT/_checkpoint/                     what has been done (Spark's streaming checkpoint)

``boxes`` holds what the model's ``predict`` answers for the picture (typed: a list of structs)
and ``error`` is null; or ``boxes`` is null and ``error`` names the file and its problem
(corrupt, empty, over the pixel or byte limit, not an image). One bad picture never fails the
job, and no picture is scored twice.

Resuming: the job is a Structured Streaming query over the input folder run with
``trigger(availableNow=True)``: it plans the pictures into micro-batches (``files_per_batch``
each), records each batch's files in the checkpoint before scoring it, writes the batch's rows
to ``batch=N`` (replacing whatever a killed attempt left there) and then records the batch as
committed. A rerun after a kill redoes the one uncommitted batch with the same files and the
same N, skips every committed one, and picks up pictures added since. Within a batch, Spark's
commit protocol keeps exactly one attempt of each retried task. Readers skip ``_checkpoint``
and Spark's ``_temporary`` folders (their names start with an underscore).

Why not ``mlflow.pyfunc.spark_udf`` itself: a served request with one bad picture is refused
as a whole (400), and MLflow's UDF hands each Arrow batch to ``predict`` as one request, so one
corrupt file would fail its task and then the job. The job's function loads the same pyfunc
model and scores through the same runner, per picture. (``spark_udf`` works on our models for
tables of good pictures: see docs/spark.md.)
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from scoring.errors import MmdetMlflowError

PARQUET_DIR = "parquet"
JSONL_DIR = "jsonl"
CHECKPOINT_DIR = "_checkpoint"
# Pictures per Arrow batch handed to a Python worker. Spark's default (10000 rows) would put
# 10000 pictures' bytes in a worker's memory at once; the model takes one or a few at a time.
RECORDS_PER_ARROW_BATCH = 16
FILES_PER_BATCH = 1000  # pictures per micro-batch: what one kill can cost at most
# Spark's file listing ignores names that start with "_" or "." (Hadoop's hidden files).


# The fixed schema of Spark's binaryFile source (a streaming source must be told it).
BINARY_FILE_SCHEMA = "path STRING, modificationTime TIMESTAMP, length BIGINT, content BINARY"


class SparkBatchError(MmdetMlflowError):
    """The job cannot start: no model, not one of ours, a runtime this code lacks, no input."""


@dataclass(frozen=True)
class ResolvedModel:
    uri: str  # as the user gave it, for the rows
    local_path: Path  # the MLflow model folder on the driver
    runtime: str
    default_params: object  # scoring.schema.PredictParams


def resolve_model(model_uri: str) -> ResolvedModel:
    """Find the model and check, before any Spark work, that it is an mmdet-mlflow model whose
    runtime this code can run: a local folder or any MLflow URI (``runs:/``, ``models:/``)."""
    from scoring.model_dir import ModelDir
    from scoring.runtimes import runtime_of
    from scoring.schema import PredictParams

    local = Path(model_uri).expanduser()
    if not local.exists():
        if "://" not in model_uri and not model_uri.startswith(("runs:/", "models:/")):
            raise SparkBatchError(f"no model at {model_uri}: give an MLflow model folder saved by "
                                  f"`mmdet-mlflow package` or an MLflow model URI")
        try:
            from mlflow.artifacts import download_artifacts

            local = Path(download_artifacts(artifact_uri=model_uri))
        except Exception as err:
            raise SparkBatchError(f"cannot fetch the model {model_uri}: {err}") from None
    model = ModelDir(local)
    if not model.mlmodel.is_file():
        raise SparkBatchError(f"{model_uri} is not an MLflow model (it has no MLmodel file)")
    if not model.data.info_file.is_file():
        raise SparkBatchError(f"{model_uri} is not an mmdet-mlflow model (no {model.data.info_file.name} "
                              f"in its {model.data.path.name}/ folder)")
    info = model.data.read_info()
    runtime = runtime_of(info)  # RuntimeNotAvailable (an MmdetMlflowError) for an unknown one
    defaults = PredictParams.from_dict(info.get("default_params") or {})
    return ResolvedModel(model_uri, local.resolve(), runtime, defaults)


def boxes_spark_type():
    """The Spark type of a picture's ``boxes``: from the model signature's output (the one
    definition of the response), as ``mlflow.pyfunc.spark_udf`` derives it."""
    from scoring.schema import OUTPUT_COLUMN, PredictParams, mlflow_signature

    record = mlflow_signature(PredictParams()).outputs.inputs[0].type  # {"boxes": [...]}
    boxes = next(p.dtype for p in record.properties if p.name == OUTPUT_COLUMN)
    return _spark_type(boxes)


def _spark_type(spec):
    from mlflow.types.schema import Array, DataType, Object
    from pyspark.sql.types import ArrayType, StructField, StructType

    if isinstance(spec, DataType):
        return spec.to_spark()
    if isinstance(spec, Array):
        return ArrayType(_spark_type(spec.dtype))
    if isinstance(spec, Object):
        return StructType([StructField(p.name, _spark_type(p.dtype)) for p in spec.properties])
    raise TypeError(f"no Spark type for {spec!r}")


def scored_schema():
    """What the scoring function returns for each picture (the job adds model and params)."""
    from pyspark.sql.types import LongType, StringType, StructField, StructType, TimestampType

    return StructType([
        StructField("path", StringType(), False),
        StructField("modificationTime", TimestampType()),
        StructField("length", LongType()),
        StructField("boxes", boxes_spark_type()),
        StructField("error", StringType()),
    ])


# --- in the Python workers ---------------------------------------------------------------------

def score_pictures(batches: Iterator, model_path: str, params: dict, max_file_bytes: int,
                   loads=None) -> Iterator:
    """``mapInPandas`` function: Arrow batches of binaryFile rows (``content`` null for files
    over ``max_file_bytes``, which were not read) -> one row per picture (``scored_schema``).
    The model is loaded once per Python worker (``scoring.pyfunc`` keeps it); ``loads``, a Spark
    accumulator, is told which worker loaded it."""
    import mlflow.pyfunc
    import pandas as pd

    from scoring import pyfunc
    from scoring.runner import score_images

    before = pyfunc.pyfunc_load_count()
    segmenter = mlflow.pyfunc.load_model(model_path).get_raw_model()
    if loads is not None and pyfunc.pyfunc_load_count() > before:
        loads.add({os.getpid(): 1})
    predict_params = segmenter.default_params.updated(params)
    for frame in batches:
        errors: dict[str, str] = {}
        items = []
        for path, length, content in zip(frame["path"], frame["length"], frame["content"]):
            if content is None:
                errors[path] = (f"{path}: the file is {length} bytes, over the limit of "
                                f"{max_file_bytes} (--max-file-bytes)")
            else:
                items.append((path, content))
        boxes: dict[str, list] = {}
        try:
            scored_items = list(score_images(segmenter, items, predict_params, on_error="yield"))
        except Exception:  # not an input problem (a bug, or a picture that trips a library):
            scored_items = _one_by_one(segmenter, items, predict_params, errors)  # find which
        for scored in scored_items:
            if scored.ok:
                boxes[scored.key] = scored.response["boxes"]
            else:
                errors[scored.key] = f"{scored.key}: {scored.error.problem}"
        yield pd.DataFrame({
            "path": frame["path"],
            "modificationTime": frame["modificationTime"],
            "length": frame["length"],
            "boxes": [boxes.get(p) for p in frame["path"]],
            "error": [errors.get(p) for p in frame["path"]],
        })


def _one_by_one(segmenter, items, params, errors: dict) -> list:
    """Score each picture alone, so that the one an unexpected error comes from is an error
    row (its traceback in the worker's log, as ``mmdet-mlflow batch`` does) and the others are
    scored: one picture never fails the job."""
    from scoring.batch_files import problem
    from scoring.runner import score_images

    scored_items = []
    for key, value in items:
        try:
            scored_items.extend(score_images(segmenter, [(key, value)], params, on_error="yield"))
        except Exception as err:
            errors[key] = f"{key}: {problem(err)}"
    return scored_items


# --- on the driver -----------------------------------------------------------------------------

def spark_session(master: str | None = None, app_name: str = "mmdet-mlflow spark-batch",
                  records_per_arrow_batch: int = RECORDS_PER_ARROW_BATCH):
    """A SparkSession for the job (the active one, when there is one: its settings stay as they
    are, as on Databricks or Synapse). A new local one runs its Python workers with this
    Python, and passes the MMDET_MLFLOW_ settings on to executors."""
    from pyspark.sql import SparkSession

    if master is None or master.startswith("local"):
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    builder = SparkSession.builder.appName(app_name)
    if master:
        builder = builder.master(master)
    builder = (builder
               .config("spark.sql.execution.arrow.maxRecordsPerBatch", str(records_per_arrow_batch))
               .config("spark.ui.showConsoleProgress", "false"))
    for name, value in os.environ.items():
        if name.startswith("MMDET_MLFLOW_"):
            builder = builder.config(f"spark.executorEnv.{name}", value)
    return builder.getOrCreate()


class _PidCounts:
    """AccumulatorParam of {worker pid: model loads}."""

    def zero(self, value):
        return {}

    def addInPlace(self, a, b):
        for pid, count in b.items():
            a[pid] = a.get(pid, 0) + count
        return a


def _join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *parts])


def _is_local(path: str) -> bool:
    return "://" not in path and not path.startswith("file:")


def run_spark_batch(model: str, input_path: str, output: str, master: str | None = None,
                    glob: str | None = None, jsonl: bool = False, params: dict | None = None,
                    files_per_batch: int = FILES_PER_BATCH,
                    records_per_arrow_batch: int = RECORDS_PER_ARROW_BATCH,
                    max_file_bytes: int | None = None, spark=None, log=None) -> dict:
    """Score every picture under ``input_path`` into ``output`` (see the module docstring);
    rerun with the same ``output`` to resume. Returns counts over the whole output:
    ``pictures``, ``errors``, ``this_run`` (rows written by this run), ``model_loads`` ({worker
    pid: loads} in this run)."""
    import functools

    from pyspark.sql import functions as F

    from scoring import settings

    log = log or (lambda message: print(message, file=sys.stderr, flush=True))
    resolved = resolve_model(model)
    predict_params = resolved.default_params.updated(params)  # a bad param fails here
    params_json = json.dumps(predict_params.as_dict(), sort_keys=True)
    max_file_bytes = max_file_bytes or settings.MAX_REQUEST_BYTES.value()
    if _is_local(input_path) and not Path(input_path).is_dir():
        raise SparkBatchError(f"{input_path} is not a folder")
    parquet_out = _join(output, PARQUET_DIR)
    checkpoint = _join(output, CHECKPOINT_DIR)
    if _is_local(output):
        if (Path(output) / PARQUET_DIR).exists() and not (Path(output) / CHECKPOINT_DIR).exists():
            raise FileExistsError(f"{output} has results but no {CHECKPOINT_DIR}/ to resume from: "
                                  f"write to a new folder")
        Path(output).mkdir(parents=True, exist_ok=True)

    spark = spark or spark_session(master, records_per_arrow_batch=records_per_arrow_batch)
    # Also in a session that was already running (Databricks, Synapse): Spark's default of
    # 10000 rows per Arrow batch would put 10000 pictures in a worker's memory at once.
    spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", str(records_per_arrow_batch))
    context = spark.sparkContext
    model_path = str(resolved.local_path)
    if not context.master.startswith("local"):  # executors get their own copy of the folder
        context.addFile(model_path, recursive=True)
        model_path = None
    loads = context.accumulator({}, _PidCounts())
    score = functools.partial(_score_on_executor, model_path=model_path,
                              model_name=resolved.local_path.name, params=dict(params or {}),
                              max_file_bytes=max_file_bytes, loads=loads)
    schema = scored_schema()
    totals = {"this_run": 0, "errors_this_run": 0}

    def write_batch(batch, batch_id: int) -> None:
        started = time.monotonic()
        small = batch.where(F.col("length") <= max_file_bytes)
        # Column pruning: the big files' content is never read (binaryFile reads it only when
        # the column is needed, and the length filter above is checked before reading).
        big = batch.where(F.col("length") > max_file_bytes).select(
            "path", "modificationTime", "length", F.lit(None).cast("binary").alias("content"))
        rows = small.select("path", "modificationTime", "length", "content").unionByName(big)
        rows = rows.mapInPandas(score, schema)
        empty = _unscanned_files(spark, checkpoint, batch_id, batch)
        if empty:  # Spark's file scans skip files of 0 bytes: they get their error row here
            rows = rows.unionByName(spark.createDataFrame(
                [(path, None, 0, None, f"{path}: empty file (0 bytes)") for path in empty], schema))
        rows = (rows
                .withColumn("model", F.lit(resolved.uri))
                .withColumn("params", F.lit(params_json)))
        target = _join(parquet_out, f"batch={batch_id}")
        rows.write.mode("overwrite").parquet(target)  # a redone batch replaces its own rows
        written = spark.read.parquet(target)
        if jsonl:
            (written.write.mode("overwrite").option("ignoreNullFields", "false")
             .json(_join(output, JSONL_DIR, f"batch={batch_id}")))
        count, errors = written.select(F.count("*"), F.count("error")).first()
        totals["this_run"] += count
        totals["errors_this_run"] += errors
        log(f"batch {batch_id}: {count} pictures ({errors} errors) in {time.monotonic() - started:.1f} s; "
            f"{totals['this_run']} this run")

    reader = (spark.readStream.format("binaryFile").schema(BINARY_FILE_SCHEMA)
              .option("recursiveFileLookup", "true")
              .option("maxFilesPerTrigger", str(files_per_batch))
              # Spark skips files older than maxFileAge (default 7 days) before the newest one it
              # has seen once it resumes: a folder of old photos must not be skipped.
              .option("maxFileAge", "36500d"))
    if glob:
        reader = reader.option("pathGlobFilter", glob)
    query = (reader.load(input_path).writeStream
             .foreachBatch(write_batch)
             .option("checkpointLocation", checkpoint)
             .trigger(availableNow=True)
             .start())
    try:
        query.awaitTermination()
    finally:
        if query.isActive:
            query.stop()
    counts = _output_counts(spark, parquet_out)
    counts.update(this_run=totals["this_run"], model_loads=dict(loads.value))
    return counts


def _score_on_executor(batches, model_path, model_name, params, max_file_bytes, loads):
    if model_path is None:  # on a cluster: the copy Spark shipped with addFile
        from pyspark import SparkFiles

        model_path = SparkFiles.get(model_name)
    return score_pictures(batches, model_path, params, max_file_bytes, loads)


def _unscanned_files(spark, checkpoint: str, batch_id: int, batch) -> list[str]:
    """The files of micro-batch ``batch_id`` that its scan returns no row for: files of 0 bytes,
    which Spark's file scans drop (``FileSourceScanExec`` keeps only files with a length). The
    batch's files are those the file source recorded for it in the checkpoint before running
    it (``sources/0/<N>``, or ``<N>.compact``, which also holds earlier batches': JSON lines
    after a version line, paths as URIs), named here as the scan names them."""
    from urllib.parse import unquote

    log_dir = _join(checkpoint, "sources", "0")
    lines = None
    for name in (str(batch_id), f"{batch_id}.compact"):
        try:
            lines = [row.value for row in spark.read.text(_join(log_dir, name)).collect()]
            break
        except Exception:  # not this name (AnalysisException: path does not exist)
            continue
    if lines is None:
        return []
    listed = []
    for line in lines:
        if not line.startswith("{"):
            continue  # the version line
        entry = json.loads(line)
        if entry.get("batchId") == batch_id:
            listed.append(_scan_path(unquote(entry["path"])))
    scanned = {row.path for row in batch.select("path").collect()}  # no content is read
    return sorted(set(listed) - scanned)


def _scan_path(uri: str) -> str:
    """A file URI as Hadoop's Path prints it (what binaryFile's ``path`` holds): ``file:/x``
    for ``file:///x``."""
    return "file:/" + uri[len("file:///"):] if uri.startswith("file:///") else uri


def _output_counts(spark, parquet_out: str) -> dict:
    from pyspark.sql import functions as F

    try:
        table = spark.read.parquet(parquet_out)
    except Exception:  # nothing written yet (an empty input)
        return {"pictures": 0, "errors": 0}
    pictures, errors = table.select(F.count("*"), F.count("error")).first()
    return {"pictures": pictures, "errors": errors}
