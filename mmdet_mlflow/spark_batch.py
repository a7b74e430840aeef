"""``mmdet-mlflow spark-batch``: score a folder (or a lake path) of pictures on Spark, resumably.

Spark reads the pictures (``binaryFile``: recursive, an optional glob), the model scores them in
the Python workers (loaded once per worker, by the model's own pyfunc loader, and the one
runner), and one row per picture is written as Parquet (and optionally JSON lines):

    OUTPUT/parquet/batch=N/part-*.parquet   path, modificationTime, length, boxes, error,
    OUTPUT/jsonl/batch=N/part-*.json        model, params (the same rows, with --jsonl)
    OUTPUT/_checkpoint/                     what has been done (Spark's streaming checkpoint)

``boxes`` holds what the model's ``predict`` answers for the picture (typed: a list of structs)
and ``error`` is null; or ``boxes`` is null and ``error`` names the file and its problem
(corrupt, empty, over the pixel or byte limit, not an image, not a regular file). One bad
picture never fails the job, and no picture is scored twice. In a local folder every entry is
accounted for (``scoring.batch_files.input_entries``): those Spark's listing leaves out (symlink
loops, dangling symlinks) get error rows in ``batch=-1`` (``UNLISTED_BATCH``).

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
# The partition of the error rows of a local folder's entries that Spark's listing leaves out
# (symlink loops, dangling symlinks, folders it may not list): no micro-batch has this number.
UNLISTED_BATCH = -1


def spark_hidden(name: str) -> bool:
    """Names Spark's file listing ignores (``InMemoryFileIndex``: Hadoop's hidden files)."""
    return (name.startswith(".") or (name.startswith("_") and "=" not in name)
            or name.endswith("._COPYING_"))


# The fixed schema of Spark's binaryFile source (a streaming source must be told it).
BINARY_FILE_SCHEMA = "path STRING, modificationTime TIMESTAMP, length BIGINT, content BINARY"


class SparkBatchError(MmdetMlflowError):
    """The job cannot start: no model, not one of ours, a runtime this code lacks, no input."""


@dataclass(frozen=True)
class ResolvedModel:
    uri: str  # as the user gave it, for the rows
    local_path: Path  # the MLflow model folder on the driver
    runtime: str


def resolve_model(model_uri: str) -> ResolvedModel:
    """Find the model and check, before any Spark work, that it is an mmdet-mlflow model whose
    runtime this code can run: a local folder or any MLflow URI (``runs:/``, ``models:/``)."""
    from scoring.model_dir import ModelDir
    from scoring.runtimes import runtime_of

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
    runtime = runtime_of(model.data.read_info())  # RuntimeNotAvailable (an MmdetMlflowError) for an unknown one
    return ResolvedModel(model_uri, local.resolve(), runtime)


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


def output_schema():
    """A row of the output: ``scored_schema`` and the model and params it was scored with.
    Reading the output with it spares Spark a job that infers it from the files."""
    from pyspark.sql.types import StringType, StructField, StructType

    return StructType([*scored_schema().fields, StructField("model", StringType()),
                       StructField("params", StringType())])


# --- in the Python workers ---------------------------------------------------------------------

def score_pictures(batches: Iterator, model_path: str, params: dict, max_file_bytes: int,
                   loads=None, answered=None) -> Iterator:
    """``mapInPandas`` function: Arrow batches of binaryFile rows (``content`` null for files
    over ``max_file_bytes``, which were not read) -> one row per picture (``scored_schema``).
    The model is loaded once per Python worker (``worker_predictor``). ``answered``, a Spark
    accumulator, is told each row's path and whether it is an error row."""
    import pandas as pd

    from scoring.runner import score_images

    predictor = worker_predictor(model_path, loads)
    predict_params = predictor.default_params.updated(params)
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
            scored_items = list(score_images(predictor, items, predict_params, on_error="yield"))
        except Exception:  # not an input problem (a bug, or a picture that trips a library):
            scored_items = _one_by_one(predictor, items, predict_params, errors)  # find which
        for scored in scored_items:
            if scored.ok:
                boxes[scored.key] = scored.response["boxes"]
            else:
                errors[scored.key] = f"{scored.key}: {scored.error.problem}"
        if answered is not None:
            answered.add({path: path in errors for path in frame["path"]})
        yield pd.DataFrame({
            "path": frame["path"],
            "modificationTime": frame["modificationTime"],
            "length": frame["length"],
            "boxes": [boxes.get(p) for p in frame["path"]],
            "error": [errors.get(p) for p in frame["path"]],
        })


def worker_predictor(model_path: str, loads=None):
    """The model's predictor in this Python worker, loaded once per worker (``scoring.pyfunc``
    keeps it) as the model's pyfunc loader loads it for ``mlflow.pyfunc.load_model`` (the driver
    checked the MLmodel), without importing MLflow: a second or more of each worker's start,
    for nothing the scoring uses. ``loads``, a Spark accumulator, is told which worker loaded it."""
    from scoring import pyfunc
    from scoring.model_dir import ModelDir

    before = pyfunc.pyfunc_load_count()
    predictor = pyfunc.kept_model(ModelDir(model_path).data.path).get_raw_model()
    if loads is not None and pyfunc.pyfunc_load_count() > before:
        loads.add({os.getpid(): 1})
    return predictor


def _one_by_one(predictor, items, params, errors: dict) -> list:
    """Score each picture alone, so that the one an unexpected error comes from is an error
    row (its traceback in the worker's log, as ``mmdet-mlflow batch`` does) and the others are
    scored: one picture never fails the job."""
    from scoring.batch_files import problem
    from scoring.runner import score_images

    scored_items = []
    for key, value in items:
        try:
            scored_items.extend(score_images(predictor, [(key, value)], params, on_error="yield"))
        except Exception as err:
            errors[key] = f"{key}: {problem(err)}"
    return scored_items


# --- on the driver -----------------------------------------------------------------------------

def spark_session(master: str | None = None, app_name: str = "mmdet-mlflow spark-batch",
                  records_per_arrow_batch: int = RECORDS_PER_ARROW_BATCH,
                  fast_start: bool | None = None, log=None):
    """A SparkSession for the job (the active one, when there is one: its settings stay as they
    are, as on Databricks or Synapse). A new local one runs its Python workers with this
    Python, and with ``fast_start`` (default: MMDET_MLFLOW_SPARK_FAST_START) its driver JVM
    starts fast (``spark_jvm``; end the session with ``spark_jvm.stop``, which writes the
    class-data archive on a first run). The MMDET_MLFLOW_ settings are passed on to executors."""
    from pyspark.sql import SparkSession

    from mmdet_mlflow import spark_jvm

    if master is None or master.startswith("local"):
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    builder = SparkSession.builder.appName(app_name)
    if master:
        builder = builder.master(master)
    java_options = spark_jvm.fast_start_options(master, fast_start, log)
    if java_options:
        builder = builder.config(spark_jvm.JAVA_OPTIONS_KEY, java_options)
    builder = (builder
               .config("spark.sql.execution.arrow.maxRecordsPerBatch", str(records_per_arrow_batch))
               .config("spark.ui.showConsoleProgress", "false"))
    for name, value in os.environ.items():
        if name.startswith("MMDET_MLFLOW_"):
            builder = builder.config(f"spark.executorEnv.{name}", value)
    return builder.getOrCreate()


class _Merged:
    """AccumulatorParam of a dict whose updates replace keys: applying one task's update twice
    (Spark may, for a task whose stage is run again) changes nothing."""

    def zero(self, value):
        return {}

    def addInPlace(self, a, b):
        a.update(b)
        return a


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
                    max_file_bytes: int | None = None, spark=None, log=None,
                    fast_start: bool | None = None) -> dict:
    """Score every picture under ``input_path`` into ``output`` (see the module docstring);
    rerun with the same ``output`` to resume. Returns counts over the whole output:
    ``pictures``, ``errors``, ``this_run`` (rows written by this run), ``model_loads`` ({worker
    pid: loads} in this run). ``fast_start``: see ``spark_session``."""
    from concurrent.futures import ThreadPoolExecutor

    import mlflow_model
    from scoring import settings

    log = log or (lambda message: print(message, file=sys.stderr, flush=True))
    resolved = resolve_model(model)
    # refused on the driver before any Spark work, as a request's are (not row by row on the executors)
    predict_params = mlflow_model.checked_predict_params(resolved.local_path, params)
    max_file_bytes = max_file_bytes or settings.MAX_REQUEST_BYTES.value()
    if _is_local(input_path) and not Path(input_path).is_dir():
        raise SparkBatchError(f"{input_path} is not a folder")
    # a local folder is listed here too: for the entries Spark's listing skips or misreads
    entries = local_entries(input_path, glob) if _is_local(input_path) else None
    if _is_local(output):
        if (Path(output) / PARQUET_DIR).exists() and not (Path(output) / CHECKPOINT_DIR).exists():
            raise FileExistsError(f"{output} has results but no {CHECKPOINT_DIR}/ to resume from: "
                                  f"write to a new folder")
        Path(output).mkdir(parents=True, exist_ok=True)

    # The output's Spark type comes from the model signature (MLflow's types: a second of
    # imports): made while the JVM starts.
    with ThreadPoolExecutor(1, thread_name_prefix="output-schema") as pool:
        written_schema = pool.submit(output_schema)
        spark = spark or spark_session(master, records_per_arrow_batch=records_per_arrow_batch,
                                       fast_start=fast_start, log=log)
        written_schema = written_schema.result()
    job = _Job(spark, resolved, json.dumps(predict_params.as_dict(), sort_keys=True),
               dict(params or {}), output, jsonl, max_file_bytes, written_schema, log)
    return job.run(input_path, glob, files_per_batch, records_per_arrow_batch, entries)


def local_entries(input_path: str, glob: str | None):
    """The entries of a local folder as Spark lists them (its hidden names, ``glob`` on file
    names), each with its problem (``scoring.batch_files.input_entries``). Refuses a folder
    holding a link to a folder above it: Spark's listing follows links to folders, and it would
    list every file under that one again at each level, some 40 deep (the system's limit on
    links in a path)."""
    from fnmatch import fnmatchcase

    from scoring.batch_files import Listing, input_entries

    listing = input_entries(input_path, hidden=spark_hidden)
    loops = [entry for entry in listing.entries if entry.problem and os.path.isdir(entry)]
    if loops:
        raise SparkBatchError(f"{loops[0]}: {loops[0].problem}; the listing would follow it again "
                              f"and again: remove the link, or give a folder without it")
    return Listing([entry for entry in listing.entries
                    if not glob or fnmatchcase(entry.path.name, glob)], listing.hidden)


class _Job:
    """One run of ``run_spark_batch`` on the driver: the streaming query and its batches."""

    def __init__(self, spark, resolved: ResolvedModel, params_json: str, params: dict, output: str,
                 jsonl: bool, max_file_bytes: int, written_schema, log):
        self.spark, self.resolved, self.params_json, self.params = spark, resolved, params_json, params
        self.output, self.jsonl, self.max_file_bytes, self.log = output, jsonl, max_file_bytes, log
        self.written_schema = written_schema
        self.scored_schema = scored_schema()
        self.parquet_out = _join(output, PARQUET_DIR)
        self.checkpoint = _join(output, CHECKPOINT_DIR)
        self.this_run = self.errors_this_run = 0
        context = spark.sparkContext
        self.model_path = str(resolved.local_path)
        if not context.master.startswith("local"):  # executors get their own copy of the folder
            context.addFile(self.model_path, recursive=True)
            self.model_path = None
        self.loads = context.accumulator({}, _PidCounts())

    def run(self, input_path: str, glob: str | None, files_per_batch: int,
            records_per_arrow_batch: int, entries=None) -> dict:
        """``entries``: ``local_entries`` of a local folder, for the error rows of those Spark's
        listing leaves out."""
        spark = self.spark
        # Also in a session that was already running (Databricks, Synapse): Spark's default of
        # 10000 rows per Arrow batch would put 10000 pictures in a worker's memory at once.
        spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", str(records_per_arrow_batch))
        if _is_local(input_path):
            # Spark lists a micro-batch's files again when it reads them, with a Spark job of one
            # task per file when there are more than this threshold: on a local disk a stat each
            # on the driver is quicker. (A lake's store keeps Spark's default.)
            spark.conf.set("spark.sql.sources.parallelPartitionDiscovery.threshold",
                           str(max(files_per_batch + 1, 32)))
        reader = (spark.readStream.format("binaryFile").schema(BINARY_FILE_SCHEMA)
                  .option("recursiveFileLookup", "true")
                  .option("maxFilesPerTrigger", str(files_per_batch))
                  # Spark skips files older than maxFileAge (default 7 days) before the newest
                  # one it has seen once it resumes: a folder of old photos must not be skipped.
                  .option("maxFileAge", "36500d"))
        if glob:
            reader = reader.option("pathGlobFilter", glob)
        # Nothing written yet: every row of the output will be this run's
        fresh = _is_local(self.output) and not Path(self.parquet_out).exists()
        query = (reader.load(input_path).writeStream
                 .foreachBatch(self.write_batch)
                 .option("checkpointLocation", self.checkpoint)
                 .trigger(availableNow=True)
                 .start())
        try:
            query.awaitTermination()
        finally:
            if query.isActive:
                query.stop()
        unlisted, hidden = (self.write_unlisted(entries)
                            if entries is not None and self.local_files() else (0, None))
        if fresh:  # every row of the output is this run's
            counts = {"pictures": self.this_run + unlisted,
                      "errors": self.errors_this_run + unlisted}
        else:
            counts = _output_counts(spark, self.parquet_out, self.written_schema)
        counts.update(this_run=self.this_run, unlisted=unlisted, hidden=hidden,
                      model_loads=dict(self.loads.value))
        return counts

    def local_files(self) -> bool:
        """Whether the output is on this machine's disk and Spark reads paths without a scheme
        from it too (the input's were listed here)."""
        hadoop = self.spark.sparkContext._jsc.hadoopConfiguration()
        return _is_local(self.output) and str(hadoop.get("fs.defaultFS", "file:///")).startswith("file:")

    def write_unlisted(self, listing) -> tuple[int, int]:
        """Error rows for the entries of a local folder that Spark's listing leaves out (a
        symlink loop, a dangling symlink, a folder it may not list), in the partition
        ``batch=UNLISTED_BATCH``, rewritten by every run from the folder as it is and what
        Spark has listed so far (every file it listed has a row in a micro-batch's partition,
        once the query is done): none is lost, none is written twice. Returns (rows, hidden
        entries not read)."""
        import shutil

        problems = {"file:" + os.path.abspath(entry.path): entry.problem
                    for entry in listing.entries if entry.problem}
        listed = self.listed_paths() if problems else set()
        rows = [(path, None, None, None, f"{path}: {problem}")
                for path, problem in problems.items() if path not in listed]
        target = _join(self.parquet_out, f"batch={UNLISTED_BATCH}")
        jsonl_target = _join(self.output, JSONL_DIR, f"batch={UNLISTED_BATCH}")
        if not rows:  # none now (a link mended since): no stale row beside the file's own
            shutil.rmtree(target, ignore_errors=True)
            shutil.rmtree(jsonl_target, ignore_errors=True)
            return 0, listing.hidden
        stamp = self.stamp()
        frame = self.spark.createDataFrame(rows, self.scored_schema).select("*", *stamp)
        frame.write.mode("overwrite").parquet(target)
        if self.jsonl:
            frame.write.mode("overwrite").option("ignoreNullFields", "false").json(jsonl_target)
        self.log(f"{len(rows)} entries Spark does not list (symlink loops, dangling symlinks, "
                 f"folders it may not list): error rows in batch={UNLISTED_BATCH}")
        return len(rows), listing.hidden

    def listed_paths(self) -> set[str]:
        """The paths of the rows of the micro-batches written so far (not ``UNLISTED_BATCH``'s)."""
        from pyspark.sql import functions as F

        if not Path(self.parquet_out).is_dir():
            return set()
        table = self.spark.read.schema(self.written_schema).parquet(self.parquet_out)
        return {row.path for row in
                table.where(F.col("batch") != UNLISTED_BATCH).select("path").distinct().collect()}

    def stamp(self) -> list:
        """The columns every row gets besides ``scored_schema``'s: the model and the params."""
        from pyspark.sql import functions as F

        return [F.lit(self.resolved.uri).alias("model"), F.lit(self.params_json).alias("params")]

    def write_batch(self, batch, batch_id: int) -> None:
        import functools

        from pyspark.sql import functions as F

        spark, started = self.spark, time.monotonic()
        small = batch.where(F.col("length") <= self.max_file_bytes)
        # Column pruning: the big files' content is never read (binaryFile reads it only when
        # the column is needed, and the length filter above is checked before reading).
        big = batch.where(F.col("length") > self.max_file_bytes).select(
            "path", "modificationTime", "length", F.lit(None).cast("binary").alias("content"))
        rows = small.select("path", "modificationTime", "length", "content").unionByName(big)
        # The paths of the rows written, and which are errors, come back with the tasks
        # (a job reading them back would cost more than this whole bookkeeping).
        answered = spark.sparkContext.accumulator({}, _Merged())
        score = functools.partial(_score_on_executor, model_path=self.model_path,
                                  model_name=self.resolved.local_path.name, params=self.params,
                                  max_file_bytes=self.max_file_bytes, loads=self.loads,
                                  answered=answered)
        rows = rows.mapInPandas(score, self.scored_schema)
        stamp = self.stamp()
        target = _join(self.parquet_out, f"batch={batch_id}")
        rows.select("*", *stamp).write.mode("overwrite").parquet(target)  # a redone batch
        scanned = answered.value  # replaces its rows
        empty = sorted(set(_batch_files(spark, self.checkpoint, batch_id)) - scanned.keys())
        if empty:  # Spark's file scans skip files of 0 bytes: they get their error row here
            (spark.createDataFrame([(path, None, 0, None, f"{path}: {_unscanned_problem(path)}")
                                    for path in empty], self.scored_schema)
             .select("*", *stamp).write.mode("append").parquet(target))
        if self.jsonl:
            (spark.read.schema(self.written_schema).parquet(target)
             .write.mode("overwrite").option("ignoreNullFields", "false")
             .json(_join(self.output, JSONL_DIR, f"batch={batch_id}")))
        count, errors = len(scanned) + len(empty), sum(scanned.values()) + len(empty)
        self.this_run += count
        self.errors_this_run += errors
        self.log(f"batch {batch_id}: {count} pictures ({errors} errors) in "
                 f"{time.monotonic() - started:.1f} s; {self.this_run} this run")


def _score_on_executor(batches, model_path, model_name, params, max_file_bytes, loads, answered):
    if model_path is None:  # on a cluster: the copy Spark shipped with addFile
        from pyspark import SparkFiles

        model_path = SparkFiles.get(model_name)
    return score_pictures(batches, model_path, params, max_file_bytes, loads, answered)


def _unscanned_problem(path: str) -> str:
    """Why a file of a batch has no row from its scan: Spark's scans skip files of 0 bytes,
    which its listing also makes of a FIFO, a socket or a device; on this machine's disk
    ``file_problem`` says which (what ``mmdet-mlflow batch`` says), never opening it."""
    from scoring.batch_files import file_problem

    if path.startswith("file:/"):
        return file_problem(path[len("file:"):]) or "empty file (0 bytes)"
    return "empty file (0 bytes)"


def _batch_files(spark, checkpoint: str, batch_id: int) -> list[str]:
    """The files of micro-batch ``batch_id``, named as its scan names them, read from the
    query's checkpoint: its scan returns no row for some of them (files of 0 bytes, which
    Spark's file scans drop: ``FileSourceScanExec`` keeps only files with a length), and Spark
    has no public way to name a micro-batch's files (``DataFrame.inputFiles`` of a
    ``foreachBatch`` batch is empty: the batch is a ``LogicalRDD``).

    This reads Spark's own file source log, the one place that depends on Spark's internals:
    ``sources/0/<N>`` (or ``<N>.compact``, which also holds earlier batches'), a version line
    ``v1`` then one JSON object per file (``path`` as a URI, ``batchId``). Checked against
    pyspark 4.3.0 (``FileStreamSourceLog``)."""
    from urllib.parse import unquote

    log_dir = _join(checkpoint, "sources", "0")
    lines = None
    for name in (str(batch_id), f"{batch_id}.compact"):
        if _is_local(log_dir):  # read here: a Spark job would cost more than the reading
            path = Path(log_dir, name)
            if path.is_file():
                lines = path.read_text().splitlines()
                break
            continue
        try:
            lines = [row.value for row in spark.read.text(_join(log_dir, name)).collect()]
            break
        except Exception:  # not this name (AnalysisException: path does not exist)
            continue
    entries = [json.loads(line) for line in lines or [] if line.startswith("{")]  # not "v1"
    return [_scan_path(unquote(entry["path"])) for entry in entries if entry.get("batchId") == batch_id]


def _scan_path(uri: str) -> str:
    """A file URI as Hadoop's Path prints it (what binaryFile's ``path`` holds): ``file:/x``
    for ``file:///x``."""
    return "file:/" + uri[len("file:///"):] if uri.startswith("file:///") else uri


def _output_counts(spark, parquet_out: str, schema) -> dict:
    from pyspark.sql import functions as F

    try:
        table = spark.read.schema(schema).parquet(parquet_out)
    except Exception:  # nothing written yet (an empty input)
        return {"pictures": 0, "errors": 0}
    pictures, errors = table.select(F.count("*"), F.count("error")).first()
    return {"pictures": pictures, "errors": errors}
