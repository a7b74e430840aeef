"""Our models on Spark (pyspark, local[2], Java 17): MLflow's own ``spark_udf`` answers what
``predict`` answers, typed (the signature's structs), as JSON strings, from base64, URLs and
binaryFile content, with request params, for the torch and the ONNX model, loading the model
once per Python worker; ``mmdet-mlflow spark-batch`` writes one row per picture (error rows for
unreadable files), killed once and rerun, and refuses a missing model before Spark starts."""
from __future__ import annotations

import base64
import http.server
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest

from helpers import odd_entries, scene_image, write_png
from hostile_cases import encoded, png_bomb

ROOT = Path(__file__).resolve().parent.parent
PARAMS = {"score_threshold": 0.2, "max_detections": 3}


@pytest.fixture(scope="module")
def spark():
    """One local[2] session for the module; small Arrow batches, so a column of pictures
    reaches the model in several batches (and tasks), as a large table would."""
    from mmdet_mlflow.spark_batch import spark_session

    from mmdet_mlflow import spark_jvm

    session = spark_session("local[2]", app_name="mmdet-mlflow tests", records_per_arrow_batch=2)
    session.sparkContext.setLogLevel("ERROR")
    yield session
    spark_jvm.stop(session)


@pytest.fixture(scope="module")
def pictures(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("spark-pictures")
    sizes = [(160, 120), (96, 128), (200, 80), (64, 64), (120, 160)]
    return [write_png(folder / f"pic{i}.png", scene_image(w, h, 10 + i)) for i, (w, h) in enumerate(sizes)]


@pytest.fixture(params=["torch", "onnx"])
def model_dir(request, tiny_model_dir, tiny_onnx_model_dir) -> Path:
    return {"torch": tiny_model_dir, "onnx": tiny_onnx_model_dir}[request.param]


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def _predicted(model_dir: Path, values: list, params: dict | None = None) -> list[list[dict]]:
    """predict in this process, with torch on one thread as in Spark's Python workers
    (OMP_NUM_THREADS=1 there): the same sums in the same order."""
    import mlflow.pyfunc
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        frame = mlflow.pyfunc.load_model(str(model_dir)).predict(pd.DataFrame({"image": values}), params=params)
    finally:
        torch.set_num_threads(threads)
    return [list(boxes) for boxes in frame["boxes"]]


def _plain(value):
    """Spark Rows (recursively) as the dicts and lists that predict returns."""
    from pyspark.sql import Row

    if isinstance(value, Row):
        # the struct's fields a detection does not carry (mask_format: rle's when polygons were
        # asked for) come back empty: what predict leaves out
        return {k: _plain(v) for k, v in value.asDict().items()
                if not (k == "rle" and (v is None or all(f is None for f in v)))
                and not (k == "polygon" and v == [] and "rle" in value.asDict()
                         and value["rle"] is not None and value["rle"]["counts"] is not None)}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _close(a, b, tol: float = 1e-5) -> bool:
    """Equal, numbers within ``tol`` (float32 sums may come out in another order in another
    process)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k], tol) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_close(x, y, tol) for x, y in zip(a, b))
    if isinstance(a, float) or isinstance(b, float):
        return abs(a - b) <= tol
    return a == b


def _assert_same(got: list, expected: list) -> None:
    assert len(got) == len(expected)
    assert any(expected), "the pictures should have detections to compare"
    for row, (g, e) in enumerate(zip(got, expected)):
        assert _close(g, e), f"row {row}: spark {g!r:.300} != predict {e!r:.300}"


def test_signature_result_type_gives_typed_boxes_equal_to_predict(spark, model_dir, pictures):
    """result_type from the signature: a struct {boxes: array<struct<box, label, polygon,
    score>>}, the model card's response record per picture; with spark_udf's params."""
    import mlflow.pyfunc
    from pyspark.sql.types import ArrayType, StructType

    values = [_b64(p) for p in pictures]
    frame = spark.createDataFrame(pd.DataFrame({"image": values}))
    expected = _predicted(model_dir, values)
    udf = mlflow.pyfunc.spark_udf(spark, str(model_dir), env_manager="local")
    assert isinstance(udf.returnType, StructType) and udf.returnType.names == ["boxes"]
    assert isinstance(udf.returnType["boxes"].dataType, ArrayType)
    rows = frame.select(udf("image").alias("prediction")).collect()
    _assert_same([_plain(r.prediction)["boxes"] for r in rows], expected)

    with_params = mlflow.pyfunc.spark_udf(spark, str(model_dir), env_manager="local", params=PARAMS)
    rows = frame.select(with_params("image").alias("prediction")).collect()
    got = [_plain(r.prediction)["boxes"] for r in rows]
    _assert_same(got, _predicted(model_dir, values, PARAMS))
    assert max(len(b) for b in got) <= 3 and got != [_plain(b) for b in expected]


def test_string_result_is_the_json_of_predict(spark, model_dir, pictures):
    import mlflow.pyfunc

    values = [_b64(p) for p in pictures]
    udf = mlflow.pyfunc.spark_udf(spark, str(model_dir), env_manager="local", result_type="string")
    rows = spark.createDataFrame(pd.DataFrame({"image": values})).select(udf("image").alias("p")).collect()
    _assert_same([json.loads(r.p) for r in rows], _predicted(model_dir, values))


def test_binary_file_content_gives_what_base64_gives(spark, model_dir, pictures):
    """spark.read.format("binaryFile"): the `content` column (bytes) goes in as it is."""
    import mlflow.pyfunc
    from pyspark.sql import functions as F

    udf = mlflow.pyfunc.spark_udf(spark, str(model_dir), env_manager="local")
    files = spark.read.format("binaryFile").load(str(pictures[0].parent))
    rows = files.select("path", udf(F.col("content")).alias("prediction")).collect()
    by_name = {r.path.rsplit("/", 1)[-1]: _plain(r.prediction)["boxes"] for r in rows}
    assert sorted(by_name) == sorted(p.name for p in pictures)
    _assert_same([by_name[p.name] for p in pictures], _predicted(model_dir, [_b64(p) for p in pictures]))


@pytest.fixture()
def picture_server(pictures):
    handler = lambda *a, **k: http.server.SimpleHTTPRequestHandler(*a, directory=str(pictures[0].parent), **k)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_urls_are_fetched_within_the_ssrf_rules(spark, tiny_onnx_model_dir, pictures, picture_server,
                                                monkeypatch):
    """A URL of a loopback server is fetched only when MMDET_MLFLOW_URL_ALLOWLIST lets it
    through (spark_udf's extra_env reaches the workers); without it the batch is refused."""
    import mlflow.pyfunc

    urls = [f"{picture_server}/{p.name}" for p in pictures[:3]]
    frame = spark.createDataFrame(pd.DataFrame({"image": urls}))
    allow = {"MMDET_MLFLOW_URL_ALLOWLIST": "127.0.0.0/8"}
    udf = mlflow.pyfunc.spark_udf(spark, str(tiny_onnx_model_dir), env_manager="local",
                                  result_type="string", extra_env=allow)
    got = [json.loads(r.p) for r in frame.select(udf("image").alias("p")).collect()]
    _assert_same(got, _predicted(tiny_onnx_model_dir, [_b64(p) for p in pictures[:3]]))

    refused = mlflow.pyfunc.spark_udf(spark, str(tiny_onnx_model_dir), env_manager="local",
                                      result_type="string")
    with pytest.raises(Exception, match="not a public address|MMDET_MLFLOW_URL_ALLOWLIST"):
        frame.select(refused("image")).collect()


def test_spark_udf_model_config_reaches_the_workers(spark, tiny_onnx_model_dir, pictures, picture_server):
    """spark_udf's model_config is the model's on every worker: the URL allowlist given there
    lets a loopback URL through as the variable does, and a small image limit refuses the
    picture, naming the model_config key."""
    import mlflow.pyfunc

    frame = spark.createDataFrame(pd.DataFrame({"image": [f"{picture_server}/{pictures[0].name}"]}))
    udf = mlflow.pyfunc.spark_udf(spark, str(tiny_onnx_model_dir), env_manager="local",
                                  result_type="string", model_config={"url_allowlist": "127.0.0.0/8"})
    got = [json.loads(r.p) for r in frame.select(udf("image").alias("p")).collect()]
    _assert_same(got, _predicted(tiny_onnx_model_dir, [_b64(pictures[0])]))

    limited = mlflow.pyfunc.spark_udf(spark, str(tiny_onnx_model_dir), env_manager="local",
                                      result_type="string",
                                      model_config={"url_allowlist": "127.0.0.0/8", "max_image_pixels": 10})
    with pytest.raises(Exception, match="model_config max_image_pixels"):
        frame.select(limited("image")).collect()


def test_an_arrow_batch_is_not_held_to_a_served_requests_limits(spark, tiny_onnx_model_dir):
    """A served request may carry 64 images and work 60 s; an Arrow batch of a Spark job is not
    a request: 70 rows in one batch, under a 1 ms request deadline, are all scored."""
    import mlflow.pyfunc

    small = _b64_png(scene_image(64, 48, 5))
    udf = mlflow.pyfunc.spark_udf(spark, str(tiny_onnx_model_dir), env_manager="local", result_type="string",
                                  extra_env={"MMDET_MLFLOW_REQUEST_TIMEOUT": "0.001"})
    frame = spark.createDataFrame(pd.DataFrame({"image": [small] * 70})).coalesce(1)
    spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", "100")
    try:
        rows = frame.select(udf("image").alias("p")).collect()
    finally:
        spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", "2")
    assert len(rows) == 70 and len({r.p for r in rows}) == 1
    assert json.loads(rows[0].p) == _predicted(tiny_onnx_model_dir, [small])[0]


def _b64_png(image) -> str:
    return base64.b64encode(encoded("PNG", image)).decode()


def _worker_loads(spark) -> dict[int, int]:
    """{Python worker pid: models loaded by our pyfunc loader}, from a job of many small tasks
    (Spark reuses its Python workers, so they land on the workers that scored)."""
    def probe(batches):
        from scoring import pyfunc

        for _ in batches:
            yield pd.DataFrame({"pid": [os.getpid()], "loads": [pyfunc.pyfunc_load_count()]})

    rows = spark.range(0, 16, 1, 16).mapInPandas(probe, "pid long, loads long").collect()
    return {r.pid: r.loads for r in rows}


def test_the_model_loads_once_per_python_worker(spark, tiny_model_dir, pictures, tmp_path):
    """MLflow's UDF calls load_model in every task; 8 tasks on 2 workers load it twice at
    most, not 8 times (a fresh copy of the model, so no worker has it yet)."""
    import mlflow.pyfunc

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    before = _worker_loads(spark)
    udf = mlflow.pyfunc.spark_udf(spark, str(model), env_manager="local", result_type="string")
    frame = spark.createDataFrame(pd.DataFrame({"image": [_b64(p) for p in pictures] * 4})).repartition(8)
    assert frame.select(udf("image")).rdd.getNumPartitions() == 8
    assert len(frame.select(udf("image")).collect()) == 20  # count() would skip the UDF
    after = _worker_loads(spark)
    new_loads = {pid: after[pid] - before.get(pid, 0) for pid in after}
    assert max(new_loads.values()) == 1, new_loads
    assert sum(new_loads.values()) <= 2, new_loads


# --- mmdet-mlflow spark-batch --------------------------------------------------------------------

# In this module's session first, then as processes of their own: Spark stops a Python worker
# that has been idle for a minute, and a new one imports torch and loads the model again.


def test_spark_batch_boxes_equal_predict(tmp_path, tiny_model_dir, pictures):
    """The job's typed boxes are what predict answers for the same pictures (the torch model
    here; the killed-job test runs the ONNX model), and a rerun with nothing new adds nothing."""
    from mmdet_mlflow.spark_batch import run_spark_batch

    output = tmp_path / "out"
    counts = run_spark_batch(str(tiny_model_dir), str(pictures[0].parent), str(output),
                             master="local[2]", glob="pic[0-3].png", log=lambda message: None)
    assert counts["pictures"] == counts["this_run"] == 4 and counts["errors"] == 0
    assert counts["model_loads"] and max(counts["model_loads"].values()) == 1
    rows = _job_rows(output)
    by_name = {p.rsplit("/", 1)[-1]: b for p, b in zip(rows["path"], rows["boxes"])}
    expected = _predicted(tiny_model_dir, [_b64(p) for p in pictures[:4]])
    got = [[_arrow_plain(d) for d in by_name[p.name]] for p in pictures[:4]]
    _assert_same(got, expected)

    again = run_spark_batch(str(tiny_model_dir), str(pictures[0].parent), str(output),
                            master="local[2]", glob="pic[0-3].png", log=lambda message: None)
    assert again["this_run"] == 0 and again["pictures"] == 4


def _arrow_plain(value):
    """A parquet cell (numpy arrays for lists) as plain lists and dicts."""
    import numpy as np

    if isinstance(value, dict):  # the typed struct's rle is null where polygons were answered
        return {k: _arrow_plain(v) for k, v in value.items() if not (k == "rle" and v is None)}
    if isinstance(value, (list, np.ndarray)):
        return [_arrow_plain(v) for v in value]
    return value


def test_an_object_detection_model_gives_typed_boxes_without_polygons(spark, tiny_od_model_dir, pictures,
                                                                      tmp_path):
    """spark_udf with the object-detection model's signature: a struct per detection of box,
    label and score, no mask field, equal to predict; spark-batch's typed rows (one schema for
    every model) carry no polygon and no RLE for it, and the same boxes."""
    import mlflow.pyfunc

    from mmdet_mlflow.spark_batch import run_spark_batch

    values = [_b64(p) for p in pictures]
    expected = _predicted(tiny_od_model_dir, values)
    udf = mlflow.pyfunc.spark_udf(spark, str(tiny_od_model_dir), env_manager="local")
    assert udf.returnType["boxes"].dataType.elementType.names == ["box", "label", "score"]
    rows = spark.createDataFrame(pd.DataFrame({"image": values})).select(udf("image").alias("p")).collect()
    _assert_same([_plain(r.p)["boxes"] for r in rows], expected)

    output = tmp_path / "out"
    counts = run_spark_batch(str(tiny_od_model_dir), str(pictures[0].parent), str(output),
                             master="local[2]", log=lambda message: None)
    assert counts["pictures"] == len(pictures) and counts["errors"] == 0
    job = _job_rows(output)
    by_name = {p.rsplit("/", 1)[-1]: b for p, b in zip(job["path"], job["boxes"])}
    for picture, boxes in zip(pictures, expected):
        typed = by_name[picture.name]
        assert all(d["polygon"] is None and d["rle"] is None for d in typed)
        got = [{k: v for k, v in _arrow_plain(d).items() if k != "polygon"} for d in typed]
        assert _close(got, boxes)


ODD_NAMES = ["with space.png", "ünïcode é.png", "hash#1.png", "percent%20.png", "comma,semi;.png",
             "brackets[1].png", "quote'.png"]


def _job_input(folder: Path) -> dict[str, str | None]:
    """Pictures and bad files; returns file name -> the problem its row must name (None: boxes)."""
    folder.mkdir()
    (folder / "nested" / "deeper").mkdir(parents=True)
    expected: dict[str, str | None] = {}
    for i in range(5):
        name = f"nested/good{i}.png" if i % 2 else f"good{i}.png"
        write_png(folder / name, scene_image(96 + 8 * i, 72, i))
        expected[name] = None
    for i, name in enumerate(ODD_NAMES):
        write_png(folder / "nested" / "deeper" / name, scene_image(64, 48 + 8 * i, 20 + i))
        expected[f"nested/deeper/{name}"] = None
    good = (folder / "good0.png").read_bytes()
    (folder / "corrupt.png").write_bytes(good[: len(good) // 2])
    expected["corrupt.png"] = "the image data ends early"
    (folder / "empty.jpg").write_bytes(b"")
    expected["empty.jpg"] = "empty file (0 bytes)"
    (folder / "nested" / "notes.txt").write_text("not a picture")
    expected["nested/notes.txt"] = "not an image"
    (folder / "bomb.png").write_bytes(png_bomb(100_000, 100_000))
    expected["bomb.png"] = "over the limit of"
    (folder / "too-many-bytes.png").write_bytes(encoded("PNG", scene_image(600, 400, 3)) + b"\0" * 300_000)
    expected["too-many-bytes.png"] = "bytes, over the limit of 300000 (--max-file-bytes)"
    # a FIFO, a socket, links that loop or lead nowhere: error rows with batch's words (a file
    # we may not read would fail Spark's scan, and a link to a folder above is refused: not here)
    expected.update(odd_entries(folder, good, unreadable=False, folder_loop=False))
    return expected


def _job_rows(output: Path) -> pd.DataFrame:
    return pd.read_parquet(output / "parquet")  # pyarrow: the partitioned folder, _checkpoint skipped


def _name(path: str, root: Path) -> str:
    prefix = "file:" + str(root) + "/"
    assert path.startswith(prefix), path
    return path[len(prefix):]


def test_spark_batch_killed_once_and_rerun_has_one_row_per_picture(tmp_path, tiny_onnx_model_dir):
    """The job is killed (SIGKILL, the driver and its JVM) once the first micro-batch is
    committed and while later ones run; the rerun skips the committed pictures and completes:
    exactly one row per file, the bad ones as error rows naming the file and the problem.
    Neither run writes anything to the cache (the fast start is off by default). (The ONNX model
    here: its workers start without torch; the torch model's job is checked against predict.)"""
    root = tmp_path / "input"
    expected = _job_input(root)
    output = tmp_path / "out"
    cmd = _spark_batch_command(tiny_onnx_model_dir, root, output)
    cache = tmp_path / "cache"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MMDET_MLFLOW_CACHE": str(cache)}
    env.pop("MMDET_MLFLOW_SPARK_FAST_START", None)
    log = tmp_path / "first.log"
    with open(log, "wb") as out:
        first = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    committed = output / "_checkpoint" / "commits"
    deadline = time.monotonic() + 300
    while first.poll() is None and time.monotonic() < deadline and not (committed / "0").exists():
        time.sleep(0.05)
    assert first.poll() is None, f"the first run ended before it was killed:\n{log.read_text()[-3000:]}"
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    done_before = len(_job_rows(output)) if (output / "parquet").exists() else 0
    assert done_before >= 3

    final = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert final.returncode == 0, final.stdout[-2000:] + final.stderr[-4000:]
    assert "pictures scored this run" in final.stdout and "1 hidden, not read" in final.stdout
    assert not cache.exists(), "a run without the fast start writes nothing to the cache"
    assert "class-data archive" not in final.stderr

    rows = _job_rows(output)
    names = [_name(p, root) for p in rows["path"]]
    assert sorted(names) == sorted(expected), "exactly one row per file"
    rerun = [line for line in final.stderr.splitlines() if line.startswith("batch ")]
    assert sum(int(line.split()[2]) for line in rerun) <= len(expected) - 3, "committed batches are not redone"
    for name, row in zip(names, rows.itertuples()):
        problem = expected[name]
        if problem is None:
            assert row.error is None and row.boxes is not None and len(row.boxes) <= 5, name
        else:
            assert row.boxes is None and problem in row.error and row.error.startswith(row.path), (name, row.error)
    assert set(rows["model"]) == {str(tiny_onnx_model_dir)}
    assert {json.loads(p)["max_detections"] for p in rows["params"]} == {5}
    boxes = [b for b in rows["boxes"] if b is not None and len(b)]
    # the signature's struct: polygon answered, the optional rle null (mask_format "polygon")
    assert boxes and set(boxes[0][0]) == {"box", "label", "polygon", "rle", "score"}
    assert boxes[0][0]["rle"] is None

    jsonl = [json.loads(line) for f in sorted((output / "jsonl").rglob("*.json"))
             for line in f.read_text().splitlines()]
    assert sorted(_name(r["path"], root) for r in jsonl) == sorted(expected)
    assert all(("error" in r) and ("boxes" in r) for r in jsonl)


def _spark_batch_command(model: Path, root: Path, output: Path, *more: str) -> list[str]:
    return [sys.executable, "-m", "mmdet_mlflow.cli", "spark-batch", "--model", str(model),
            "--input", str(root), "--output", str(output), "--master", "local[2]",
            "--files-per-batch", "3", "--max-file-bytes", "300000", "--jsonl",
            "--max-detections", "5", *more]


def test_spark_batch_fast_start_says_what_it_writes_before_and_keeps_one_archive(tmp_path, tiny_onnx_model_dir):
    """With --fast-start, the first run says where its class-data archive goes and about how
    large it is before Spark starts, removes the archive of another Java or Spark build, and
    writes its own at its end; the next run starts from it and leaves it as it is."""
    from mmdet_mlflow import spark_jvm

    root = tmp_path / "input"
    root.mkdir()
    write_png(root / "one.png", scene_image(96, 72, 1))
    cache = tmp_path / "cache"
    stale = cache / spark_jvm.ARCHIVE_DIR / "spark-3.5.1-0123456789abcdef.jsa"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"an archive of another build")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MMDET_MLFLOW_CACHE": str(cache)}
    cmd = _spark_batch_command(tiny_onnx_model_dir, root, tmp_path / "out", "--fast-start")

    first = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-4000:]
    archives = list(cache.rglob("*.jsa"))
    assert len(archives) == 1 and archives[0] != stale and archives[0].stat().st_size > 1_000_000
    said = first.stderr.index(f"archive of about {spark_jvm.ARCHIVE_SIZE_ESTIMATE_MB} MB to {archives[0]}")
    assert said < first.stderr.index("batch 0:") < first.stderr.index("wrote Spark's class-data archive")
    assert "removed 1 class-data archives of other Java or Spark builds" in first.stderr
    assert not list(cache.rglob("*.writing"))
    written = archives[0].stat().st_mtime_ns

    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-4000:]
    assert "0 pictures scored this run; 1 in the output" in again.stdout
    assert "class-data archive" not in again.stderr
    assert list(cache.rglob("*.jsa")) == archives and archives[0].stat().st_mtime_ns == written


def test_a_fast_started_session_never_stopped_exits_and_writes_nothing(tmp_path):
    """No exit hook: a program that starts a fast-start session and ends without stopping it
    exits as any driver program does, and its JVM, never asked, writes no archive."""
    cache = tmp_path / "cache"
    code = ("from mmdet_mlflow.spark_batch import spark_session; "
            "spark = spark_session('local[1]', fast_start=True); "
            "assert spark.range(5).count() == 5; print('counted')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "MMDET_MLFLOW_CACHE": str(cache)})
    assert done.returncode == 0 and "counted" in done.stdout, done.stderr[-3000:]
    assert "class-data archive of about" in done.stderr
    assert not list(cache.rglob("*.jsa")) and not list(cache.rglob("*.writing"))


def test_a_local_driver_jvm_gets_the_fast_start_options_only_where_asked_and_they_apply(tmp_path, monkeypatch):
    """None by default. Asked for (the argument, else the setting): the class archive when one
    is in place, else the options to write one when the session ends, said beforehand, with
    the archives of other builds and the day-old half-written ones removed; none for a
    cluster's driver, or when the user gives the driver JVM options of their own (ours would
    replace them)."""
    from pyspark import SparkContext

    from mmdet_mlflow import spark_jvm

    monkeypatch.setenv("MMDET_MLFLOW_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(spark_jvm, "_to_write", [])
    monkeypatch.delenv("PYSPARK_SUBMIT_ARGS", raising=False)
    monkeypatch.delenv("MMDET_MLFLOW_SPARK_FAST_START", raising=False)
    monkeypatch.setenv("SPARK_CONF_DIR", str(tmp_path / "conf"))
    # as before this process launches its JVM (the module's session may be running)
    monkeypatch.setattr(SparkContext, "_gateway", None)
    archive = spark_jvm.archive_path(spark_jvm._java())
    archive.parent.mkdir(parents=True)
    other_build = archive.with_name("spark-3.5.1-0123456789abcdef.jsa")
    other_build.write_bytes(b"an archive of another build")
    killed, writing = archive.with_name("spark-x.1.writing"), archive.with_name("spark-x.2.writing")
    killed.write_bytes(b"not all of it")
    os.utime(killed, (time.time() - 2 * 86400,) * 2)
    writing.write_bytes(b"being written")
    said = []

    assert spark_jvm.fast_start_options("local[2]", log=said.append) is None
    assert not said and other_build.exists()
    options = spark_jvm.fast_start_options("local[2]", fast_start=True, log=said.append)
    assert "-XX:TieredStopAtLevel=1" in options and "-XX:+UseSerialGC" in options
    assert "-XX:+RecordDynamicDumpInfo" in options and "SharedArchiveFile" not in options
    assert spark_jvm._to_write and spark_jvm._to_write[0].archive == archive
    assert spark_jvm._to_write[0].marker in options
    assert sorted(archive.parent.iterdir()) == [writing], "other builds' and killed runs' are removed"
    assert f"about {spark_jvm.ARCHIVE_SIZE_ESTIMATE_MB} MB to {archive}" in said[-1]

    archive.write_bytes(b"an archive")
    monkeypatch.setenv("MMDET_MLFLOW_SPARK_FAST_START", "1")
    options = spark_jvm.fast_start_options("local[*]", log=said.append)
    assert f"-XX:SharedArchiveFile={archive}" in options and "RecordDynamicDumpInfo" not in options
    assert spark_jvm.fast_start_options("local[2]", fast_start=False) is None
    assert spark_jvm.fast_start_options("spark://cluster:7077") is None
    assert spark_jvm.fast_start_options(None) is None
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "spark-defaults.conf").write_text("spark.driver.extraJavaOptions -Xss4m\n")
    assert spark_jvm.fast_start_options("local[2]", log=said.append) is None
    assert "Spark fast start not used" in said[-1]


@pytest.mark.parametrize("broken", ["missing", "unknown-runtime", "not-ours", "looping-input"])
def test_spark_batch_refuses_a_bad_model_or_input_before_spark_starts(tmp_path, tiny_model_dir, broken):
    """A link to a folder above, which Spark's listing would follow some 40 levels deep (every
    file under it listed at each level), is refused as a bad model is."""
    model = tmp_path / "model"
    if broken != "missing":
        shutil.copytree(tiny_model_dir, model)
    if broken == "unknown-runtime":
        info = json.loads((model / "model" / "model.json").read_text())
        (model / "model" / "model.json").write_text(json.dumps({**info, "runtime": "tensorrt"}))
    if broken == "not-ours":
        (model / "model" / "model.json").unlink()
    (tmp_path / "in" / "sub").mkdir(parents=True)
    if broken == "looping-input":
        (tmp_path / "in" / "sub" / "up").symlink_to("..")
    result = subprocess.run([sys.executable, "-m", "mmdet_mlflow.cli", "spark-batch", "--model", str(model),
                             "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"),
                             "--master", "local[1]"],
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2, result.stderr[-3000:]
    message = {"missing": "no model at", "unknown-runtime": "runtime 'tensorrt' is not one of",
               "not-ours": "is not an mmdet-mlflow model",
               "looping-input": f"in/sub/up: a symlink loop: a link to the folder {tmp_path.resolve()}/in, "
                                f"which holds it"}[broken]
    assert message in result.stderr
    assert "Spark" not in result.stderr and not (tmp_path / "out").exists(), "Spark never started"


@pytest.mark.parametrize("params, named", [
    ({"mask_format": "polygon"}, "this model does object-detection"),
    ({"mask_threshold": 0.4}, "mask_threshold is for instance-segmentation models"),
    ({"classes": "cat,unicorn"}, "param 'classes' names a class this model does not have: 'unicorn'"),
])
def test_spark_batch_refuses_params_the_model_does_not_take_before_spark_starts(
        tmp_path, tiny_od_model_dir, params, named):
    """Mask params of an object-detection model (its task named), an unknown class: refused
    on the driver at the job's start, as a request is, not on each row."""
    (tmp_path / "in").mkdir()
    args = [arg for name, value in params.items() for arg in (f"--{name.replace('_', '-')}", str(value))]
    result = subprocess.run([sys.executable, "-m", "mmdet_mlflow.cli", "spark-batch", "--model",
                             str(tiny_od_model_dir), "--input", str(tmp_path / "in"),
                             "--output", str(tmp_path / "out"), "--master", "local[1]", *args],
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2, result.stderr[-3000:]
    assert named in result.stderr and "Traceback" not in result.stderr
    assert "Spark" not in result.stderr and not (tmp_path / "out").exists(), "Spark never started"


def test_the_spark_component_loads_and_its_args_parse_with_the_cli():
    from azure.ai.ml import load_component

    from mmdet_mlflow.cli import build_parser

    component = load_component(ROOT / "components/spark_batch/spark-component.yaml")
    assert component.type == "spark" and component.entry.entry == "components/spark_batch/entry.py"
    assert (ROOT / component.entry.entry).is_file()
    args = component.args
    for name in component.inputs:
        args = args.replace(f"${{{{inputs.{name}}}}}", f"/mnt/{name}" if name != "files_per_batch" else "7")
    args = args.replace("${{outputs.predictions}}", "/mnt/out")
    parsed = build_parser().parse_args(["spark-batch", *args.split()])
    assert (parsed.model, parsed.input, parsed.output, parsed.files_per_batch, parsed.jsonl) == \
        ("/mnt/model", "/mnt/images", "/mnt/out", 7, True)
