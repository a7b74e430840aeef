"""A local Spark driver that starts in a second or two instead of several: the JVM that
``mmdet-mlflow spark-batch --master local[N]`` starts itself.

Before its first task, Spark's driver JVM loads and verifies some 15,000 classes and compiles
the busiest of them with both of HotSpot's compilers; on a small machine this is most of a
short job, and the compiler threads take cores from the Python workers that score. For a JVM
this package launches (a local master, no Spark running in the process yet, and nobody else's
``spark.driver.extraJavaOptions``), three standard JVM options:

- ``-XX:TieredStopAtLevel=1``: the quick compiler only; a local driver moves bytes (files to
  Arrow batches to the Python workers, answers to Parquet), it runs no long hot loops of its own;
- ``-XX:+UseSerialGC``: one collector thread instead of one per core;
- a class-data archive (the JDK's dynamic AppCDS): the first run writes the classes it loaded
  to ``<cache>/spark-cds/`` when its JVM exits (``-XX:ArchiveClassesAtExit``), and later runs
  map them ready-parsed (``-XX:SharedArchiveFile``). The archive is written to a temporary name
  and renamed once the JVM has exited, because a JVM that maps a half-written archive crashes;
  its name holds what it was made for (the ``java`` binary and Spark's version and jars), and a
  JVM given an archive of another build or class path ignores it.

``MMDET_MLFLOW_SPARK_FAST_START=0`` starts Spark as it comes. A cluster's JVMs, and a session
that is already running (Databricks, Synapse), are never touched.
"""
from __future__ import annotations

import atexit
import hashlib
import os
import shutil
import subprocess
import time
from pathlib import Path

from scoring import settings

DRIVER_OPTIONS = ("-XX:TieredStopAtLevel=1", "-XX:+UseSerialGC",
                  # the archive's writing names every class it cannot keep, as warnings
                  "-Xlog:cds=off", "-Xlog:cds+dynamic=off")
ARCHIVE_DIR = "spark-cds"
JAVA_OPTIONS_KEY = "spark.driver.extraJavaOptions"
CLASS_PATH_VARIABLES = ("SPARK_CONF_DIR", "HADOOP_CONF_DIR", "YARN_CONF_DIR", "SPARK_DIST_CLASSPATH")
# How long a first run waits at its end for its JVM to write the archive (seconds).
ARCHIVE_WRITE_TIMEOUT = 120

# The archive the JVM started by this process writes when it exits: (temporary, final) paths.
_pending_archive: list[tuple[Path, Path]] = []
# The py4j gateway of the JVM this process launched, if it did.
_launched: list = []


def fast_start_options(master: str | None) -> str | None:
    """The ``spark.driver.extraJavaOptions`` for a local driver JVM this process is about to
    launch, or None where they do not apply (see the module docstring)."""
    from pyspark import SparkContext

    if not settings.SPARK_FAST_START.value():
        return None
    if not (master or "").startswith("local") or SparkContext._gateway is not None:
        return None  # a cluster's driver, or a JVM already running in this process
    if _options_set_elsewhere():
        return None
    java = _java()
    if java is None:
        return None  # Spark will say what is missing
    archive = archive_path(java)
    options = list(DRIVER_OPTIONS)
    if archive.is_file():
        options.append(f"-XX:SharedArchiveFile={archive}")
    else:
        archive.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale(archive.parent)
        writing = archive.with_name(f"{archive.stem}.{os.getpid()}.writing")
        options.append(f"-XX:ArchiveClassesAtExit={writing}")
        _pending_archive[:] = [(writing, archive)]
        atexit.register(before_exit)  # a library user's process: the archive is put in place
    return " ".join(options)


def archive_path(java: Path) -> Path:
    """Where the class-data archive for this ``java`` and this Spark is kept."""
    import pyspark

    spark_home = Path(os.environ.get("SPARK_HOME") or Path(pyspark.__file__).parent)
    jars = sorted(p.name for p in (spark_home / "jars").glob("*.jar"))
    stat = java.stat()
    # What Spark's launcher puts on the class path besides the jars: an archive made for another
    # class path is ignored by the JVM, so each gets its own.
    class_path = [f"{name}={os.environ.get(name, '')}" for name in CLASS_PATH_VARIABLES]
    key = "\n".join([str(java), str(stat.st_size), str(stat.st_mtime_ns), pyspark.__version__,
                     str(spark_home), str((spark_home / "conf").is_dir()), *class_path, *jars])
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return settings.cache_root() / ARCHIVE_DIR / f"spark-{pyspark.__version__}-{digest}.jsa"


def launched(gateway) -> None:
    """Record that this process launched ``gateway``'s JVM (``spark_batch.spark_session``)."""
    _launched[:] = [gateway]


def stop(spark, log=None) -> None:
    """Stop a session made by ``spark_batch.spark_session`` and, when that call launched the
    JVM, the JVM too, waiting for it to exit; a first run's JVM writes the class archive on its
    way out, which is then put in place."""
    spark.stop()
    gateway = _take_launched_gateway()
    if gateway is not None:
        _end_jvm(gateway, wait=True, log=log)


def before_exit(log=None) -> None:
    """For a process about to exit after its Spark work (a command; and at exit, a library
    user whose JVM writes the archive): let the JVM this process launched go. It stops Spark in
    its shutdown hook, as when any driver program ends, while this process exits (a
    ``SparkSession.stop`` here takes most of a second, and Python's exit waits on the gateway's
    threads); a JVM writing the class archive is waited for, and the archive put in place."""
    gateway = _take_launched_gateway()
    if gateway is not None:
        _end_jvm(gateway, wait=bool(_pending_archive), log=log)


def _take_launched_gateway():
    """The py4j gateway of the JVM this process launched, if it is still the running one
    (and forget it: it is about to end); else None."""
    from pyspark import SparkContext

    gateway = SparkContext._gateway
    if not _launched or _launched[0] is not gateway or getattr(gateway, "proc", None) is None:
        return None
    _launched.clear()
    return gateway


def _end_jvm(gateway, wait: bool, log=None) -> None:
    from pyspark import SparkContext

    proc, started = gateway.proc, time.monotonic()
    # The driver's accumulator server first, as SparkContext.stop does: the JVM's exit closes
    # its connection, which it would report as an error
    context = SparkContext._active_spark_context
    if getattr(context, "_accumulatorServer", None) is not None:
        context._accumulatorServer.shutdown()
        context._accumulatorServer = None
    try:
        gateway.shutdown()
    finally:
        SparkContext._gateway = None
        SparkContext._jvm = None
        proc.stdin.close()  # the gateway JVM exits when its stdin closes
    if not wait:
        return
    try:
        proc.wait(timeout=ARCHIVE_WRITE_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    if not _pending_archive:
        return
    writing, archive = _pending_archive.pop()
    if proc.returncode == 0 and writing.is_file() and writing.stat().st_size > 0:
        os.replace(writing, archive)
        if log:
            log(f"wrote Spark's class-data archive {archive} in {time.monotonic() - started:.1f} s: "
                f"later local runs start sooner")
    else:
        writing.unlink(missing_ok=True)


def _java() -> Path | None:
    """The ``java`` that Spark's launch scripts run: $JAVA_HOME's, else the one on PATH."""
    home = os.environ.get("JAVA_HOME")
    found = Path(home, "bin", "java") if home else shutil.which("java")
    return Path(found).resolve() if found and Path(found).is_file() else None


def _options_set_elsewhere() -> bool:
    """Whether the user gives the driver JVM options another way (ours would replace them)."""
    if JAVA_OPTIONS_KEY in os.environ.get("PYSPARK_SUBMIT_ARGS", ""):
        return True
    import pyspark

    conf_dirs = [os.environ.get("SPARK_CONF_DIR"),
                 os.path.join(os.environ.get("SPARK_HOME") or os.path.dirname(pyspark.__file__), "conf")]
    for folder in filter(None, conf_dirs):
        defaults = Path(folder, "spark-defaults.conf")
        if defaults.is_file() and JAVA_OPTIONS_KEY in defaults.read_text(errors="replace"):
            return True
    return False


def _remove_stale(folder: Path) -> None:
    """Archives left half-written by runs that were killed (a day old: none is still writing)."""
    for path in folder.glob("*.writing"):
        try:
            if time.time() - path.stat().st_mtime > 86400:
                path.unlink()
        except OSError:
            pass
