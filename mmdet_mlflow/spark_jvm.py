"""Spark's fast start, when asked for (``mmdet-mlflow spark-batch --fast-start``,
``MMDET_MLFLOW_SPARK_FAST_START=1``, or ``spark_session(fast_start=True)``): a local driver JVM
that starts in a second or two instead of several. Off by default, because its first run writes
a class-data archive of some 190 MB to the cache.

Before its first task, Spark's driver JVM loads and verifies some 15,000 classes and compiles
the busiest of them with both of HotSpot's compilers; on a small machine this is most of a
short job, and the compiler threads take cores from the Python workers that score. For a JVM
this package launches (a local master, no Spark JVM running in the process yet, and nobody
else's ``spark.driver.extraJavaOptions``), the fast start is three standard JVM options:

- ``-XX:TieredStopAtLevel=1``: the quick compiler only; a local driver moves bytes (files to
  Arrow batches to the Python workers, answers to Parquet), it runs no long hot loops of its own;
- ``-XX:+UseSerialGC``: one collector thread instead of one per core;
- a class-data archive (the JDK's dynamic AppCDS) in ``<cache>/spark-cds/``, mapped
  ready-parsed by later runs (``-XX:SharedArchiveFile``). The first run says where it will write
  it and about how large it is before its JVM starts, and writes it when the session is ended
  with ``stop`` or ``write_archive_if_asked`` (the command does), synchronously and within ``ARCHIVE_WRITE_TIMEOUT``: its JVM
  is asked to dump the classes it loaded (``jcmd <pid> VM.cds dynamic_dump``, JDK 17 and later,
  which needs ``-XX:+RecordDynamicDumpInfo`` at launch). There is no exit hook: a process that
  never calls ``stop`` writes nothing. The archive is written to a temporary name and renamed
  once complete, because a JVM that maps a half-written archive crashes; its name holds what it
  was made for (the ``java`` binary and Spark's version, jars and class path), a JVM given an
  archive of another build or class path ignores it, and so archives of other builds are
  removed when a new one is to be written: the cache holds one.

A cluster's JVMs, and a session that is already running (Databricks, Synapse), are never touched.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from scoring import settings

DRIVER_OPTIONS = ("-XX:TieredStopAtLevel=1", "-XX:+UseSerialGC",
                  # the archive's writing names every class it cannot keep, as warnings
                  "-Xlog:cds=off", "-Xlog:cds+dynamic=off")
ARCHIVE_DIR = "spark-cds"
# What the archive of a spark-batch run's driver takes on disk, as said before it is written:
# 190 MB measured with Spark 4.3.0 on Java 17 (the classes depend on Spark's version, not on
# the pictures).
ARCHIVE_SIZE_ESTIMATE_MB = 190
JAVA_OPTIONS_KEY = "spark.driver.extraJavaOptions"
CLASS_PATH_VARIABLES = ("SPARK_CONF_DIR", "HADOOP_CONF_DIR", "YARN_CONF_DIR", "SPARK_DIST_CLASSPATH")
# The most a run waits for its JVM to write the archive (seconds); it takes some 10 on 2 cores.
ARCHIVE_WRITE_TIMEOUT = 120
# A JVM option that names the driver JVM of this run, so that jcmd finds it by its command line
MARKER_PROPERTY = "mmdet_mlflow.spark_driver"


@dataclass(frozen=True)
class ArchiveToWrite:
    """The class-data archive the JVM launched by this process is to write when its session
    ends (``stop``)."""
    archive: Path
    jcmd: Path
    marker: str  # the -D option the JVM was launched with


# The archive this process's JVM is to write, if it is (at most one: one JVM per process).
_to_write: list[ArchiveToWrite] = []


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def fast_start_options(master: str | None, fast_start: bool | None = None, log=None) -> str | None:
    """The ``spark.driver.extraJavaOptions`` of the fast start for a local driver JVM this
    process is about to launch, or None where it is not asked for (``fast_start``, else the
    setting) or does not apply (see the module docstring). When the JVM is to write the
    archive, ``log`` (stderr by default) is told where and about how large, now."""
    log = log or _stderr
    if not (settings.SPARK_FAST_START.value() if fast_start is None else fast_start):
        return None
    if not (master or "").startswith("local") or _jvm_running():
        return None  # a cluster's driver, or a JVM already running in this process
    if _options_set_elsewhere():
        log(f"Spark fast start not used: {JAVA_OPTIONS_KEY} is set in spark-defaults.conf or "
            f"PYSPARK_SUBMIT_ARGS (the fast start's options would replace them)")
        return None
    java = _java()
    if java is None:
        return None  # Spark will say what is missing
    options = list(DRIVER_OPTIONS)
    _to_write.clear()
    archive = archive_path(java)
    if archive.is_file():
        return " ".join([*options, f"-XX:SharedArchiveFile={archive}"])
    jcmd = java.parent / "jcmd"
    if not jcmd.is_file():
        log(f"Spark fast start without its class-data archive: {java} has no jcmd beside it "
            f"(a JDK's java has)")
        return " ".join(options)
    archive.parent.mkdir(parents=True, exist_ok=True)
    removed = remove_other_archives(archive)
    if removed:
        log(f"removed {len(removed)} class-data archives of other Java or Spark builds from "
            f"{archive.parent} ({sum(size for _, size in removed) / 1e6:.0f} MB)")
    marker = f"-D{MARKER_PROPERTY}={os.getpid()}-{uuid.uuid4().hex[:12]}"
    _to_write.append(ArchiveToWrite(archive, jcmd, marker))
    log(f"Spark fast start: when this run's Spark session ends, its JVM writes a class-data "
        f"archive of about {ARCHIVE_SIZE_ESTIMATE_MB} MB to {archive} (some 10 s, once); later "
        f"local runs start from it")
    return " ".join([*options, "-XX:+RecordDynamicDumpInfo", marker])


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


def remove_other_archives(archive: Path) -> list[tuple[Path, int]]:
    """Remove the archives beside ``archive`` made for other Java or Spark builds (no JVM of
    this build can use them), and those left half-written by runs that were killed (a day
    old: none is still being written). Returns (path, bytes) of each removed."""
    removed = []
    for path in [*archive.parent.glob("*.jsa"), *archive.parent.glob("*.writing")]:
        try:
            stat = path.stat()
            if path == archive or (path.suffix == ".writing" and time.time() - stat.st_mtime < 86400):
                continue
            path.unlink()
            removed.append((path, stat.st_size))
        except OSError:  # removed meanwhile by another run
            pass
    return removed


def stop(spark, log=None) -> None:
    """End a session made by ``spark_batch.spark_session``: where its JVM was launched to write
    the class-data archive, it writes it first (``write_archive_if_asked``)."""
    write_archive_if_asked(log)
    spark.stop()


def write_archive_if_asked(log=None) -> None:
    """Where the JVM this process launched is to write the class-data archive
    (``fast_start_options``), have it write it now and put it in place once complete. A command
    calls this at its end and then simply exits: its JVM exits when this process does (its
    stdin closes) and stops Spark in its shutdown hook, as when any driver program ends."""
    if _to_write:
        write_archive(_to_write.pop(), log or _stderr)


def write_archive(pending: ArchiveToWrite, log) -> None:
    """Have the running JVM launched with ``pending.marker`` dump the classes it has loaded to
    a temporary file (waiting at most ARCHIVE_WRITE_TIMEOUT), then rename it into place."""
    started = time.monotonic()
    writing = pending.archive.with_name(f"{pending.archive.stem}.{os.getpid()}.writing")
    try:
        listed = subprocess.run([str(pending.jcmd), "-l"], capture_output=True, text=True, timeout=60)
        pid = next((line.split()[0] for line in listed.stdout.splitlines() if pending.marker in line), None)
        if pid is None:
            log("Spark's class-data archive not written: jcmd does not list this run's JVM")
            return
        dumped = subprocess.run([str(pending.jcmd), pid, "VM.cds", "dynamic_dump", str(writing)],
                                capture_output=True, text=True, timeout=ARCHIVE_WRITE_TIMEOUT)
    except subprocess.TimeoutExpired:
        writing.unlink(missing_ok=True)
        log(f"Spark's class-data archive not written: not done in {ARCHIVE_WRITE_TIMEOUT} s")
        return
    if dumped.returncode == 0 and writing.is_file() and writing.stat().st_size > 0:
        size = writing.stat().st_size
        os.replace(writing, pending.archive)
        log(f"wrote Spark's class-data archive {pending.archive} ({size / 1e6:.0f} MB) in "
            f"{time.monotonic() - started:.1f} s: later local runs start sooner")
    else:
        writing.unlink(missing_ok=True)
        reason = (dumped.stdout + dumped.stderr).strip().splitlines()
        log(f"Spark's class-data archive not written: {reason[-1] if reason else 'jcmd failed'}")


def _jvm_running() -> bool:
    """Whether this process has launched a Spark JVM already: a new session would run in it,
    with the options it was launched with. pyspark has no public way to ask (a stopped
    session's JVM stays up, and getActiveSession says None for it), so this reads the gateway
    that SparkContext keeps (``SparkContext._gateway``, pyspark 3.x and 4.x)."""
    from pyspark import SparkContext

    return SparkContext._gateway is not None


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
