"""scoring/azureml/batch_score.py as Azure's batch driver calls it, and `mmdet-mlflow batch` (the same
run() driven locally): images and tables in, one CSV record per image out, bad files and rows
as error records, resume after a kill."""
from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from helpers import assert_object_detection_answers, b64, assert_same_detections

ROOT = Path(__file__).resolve().parent.parent
IMAGES = 6  # in the resume test


@pytest.fixture(scope="module")
def batch_folder(tmp_path_factory, image_files) -> Path:
    """Images, tables in every supported format (good and bad rows) and files that are not
    images at all."""
    folder = tmp_path_factory.mktemp("batch-input")
    shutil.copy(image_files[0], folder / "a.png")
    (folder / "sub").mkdir()
    shutil.copy(image_files[1], folder / "sub" / "b.png")
    (folder / "notes.txt").write_text("not an image")
    good = [b64(p) for p in image_files]
    pd.DataFrame({"id": [1, 2, 3], "image": [good[0], "!!not base64!!", good[1]]}).to_csv(
        folder / "table.csv", index=False)
    pd.DataFrame({"image": [good[1], 42]}).to_json(folder / "table.jsonl", orient="records", lines=True)
    pd.DataFrame({"image": [Path(image_files[0]).read_bytes()]}).to_parquet(folder / "table.parquet")
    pd.DataFrame({"picture": [good[0]]}).to_csv(folder / "wrong_column.csv", index=False)
    (folder / "empty.csv").write_text("image\n")
    (folder / ".hidden.png").write_bytes(b"skipped by the CLI")
    return folder


@pytest.fixture(scope="module")
def scored(batch_folder, tiny_model_dir):
    from scoring.azureml import batch_score

    batch_score.init(model_dir=str(tiny_model_dir), input_root=str(batch_folder))
    files = sorted(p for p in batch_folder.rglob("*") if p.is_file() and not p.name.startswith("."))
    lines = batch_score.run([str(p) for p in files])
    return lines


@pytest.fixture(scope="module")
def expected(tiny_model_dir, image_files):
    """What the model's pyfunc (the online path) answers for each test image."""
    import mlflow

    model = mlflow.pyfunc.load_model(str(tiny_model_dir))
    frame = pd.DataFrame({"image": [b64(p) for p in image_files]})
    return model.predict(frame).to_dict(orient="records")


def test_run_returns_one_csv_record_per_image(scored, expected):
    from scoring.batch_files import COLUMNS, parse_record

    assert all(isinstance(line, str) and "\n" not in line for line in scored)
    # predictions.csv is these lines, one per line: it reads back as CSV with COLUMNS
    table = pd.read_csv(io.StringIO("\n".join(scored) + "\n"), names=list(COLUMNS),
                        keep_default_na=False, dtype=str)
    assert len(table) == len(scored)
    records = [parse_record(line) for line in scored]
    by_key = {(r["file"], r["row"]): r for r in records}
    assert [(r["file"], r["row"]) for r in records] == [
        ("a.png", 0), ("empty.csv", None), ("notes.txt", 0), ("sub/b.png", 0),
        ("table.csv", 0), ("table.csv", 1), ("table.csv", 2), ("table.jsonl", 0), ("table.jsonl", 1),
        ("table.parquet", 0), ("wrong_column.csv", None)]
    good = {("a.png", 0): 0, ("sub/b.png", 0): 1, ("table.csv", 0): 0, ("table.csv", 2): 1,
            ("table.jsonl", 0): 1, ("table.parquet", 0): 0}
    for key, image in good.items():
        assert by_key[key]["error"] is None, by_key[key]
        assert_same_detections(by_key[key]["prediction"], expected[image])
    errors = {key: r["error"] for key, r in by_key.items() if key not in good}
    assert errors[("notes.txt", 0)].startswith("row 0: not an image")
    assert errors[("table.csv", 1)].startswith("row 1: not valid base64")
    assert errors[("table.jsonl", 1)] == ("row 1: the 'image' value must be a base64 string or an "
                                          "http(s) URL, got 42")
    assert errors[("wrong_column.csv", None)] == "the table has no 'image' column (columns: picture)"
    assert errors[("empty.csv", None)] == "the table has no rows"
    assert all(r["prediction"] is None for key, r in by_key.items() if key not in good)


def test_params_from_the_deployment_environment(tiny_model_dir, image_files, monkeypatch):
    from scoring import settings
    from scoring.azureml import batch_score
    from scoring.batch_files import parse_record
    from scoring.errors import InputError

    monkeypatch.setenv(settings.BATCH_PARAMS.env, json.dumps({"score_threshold": 0.7, "max_detections": 2}))
    batch_score.init(model_dir=str(tiny_model_dir))
    records = [parse_record(line) for line in batch_score.run([str(image_files[0])])]
    assert records[0]["file"] == image_files[0].name  # no input root: the base name, as in Azure
    boxes = records[0]["prediction"]["boxes"]
    assert len(boxes) <= 2 and all(d["score"] >= 0.7 for d in boxes)
    monkeypatch.setenv(settings.BATCH_PARAMS.env, json.dumps({"score_threshold": 2}))
    with pytest.raises(InputError, match="score_threshold"):
        batch_score.init(model_dir=str(tiny_model_dir))


def test_an_object_detection_model_scores_boxes_and_refuses_mask_params_at_init(
        tiny_od_model_dir, image_files, monkeypatch):
    """Records in AutoML's object-detection schema, what the online path answers; a mask param
    in the deployment's params fails init, naming the model's task, before any file is read."""
    import mlflow

    from scoring import settings
    from scoring.azureml import batch_score
    from scoring.batch_files import parse_record
    from scoring.errors import InputError

    monkeypatch.delenv(settings.BATCH_PARAMS.env, raising=False)
    batch_score.init(model_dir=str(tiny_od_model_dir))
    records = [parse_record(line) for line in batch_score.run([str(p) for p in image_files])]
    assert [r["file"] for r in records] == [p.name for p in image_files]
    assert all(r["error"] is None for r in records)
    predictions = [r["prediction"] for r in records]
    assert_object_detection_answers(predictions)
    online = mlflow.pyfunc.load_model(str(tiny_od_model_dir)).predict(
        pd.DataFrame({"image": [b64(p) for p in image_files]})).to_dict(orient="records")
    assert predictions == online
    for params in ({"mask_format": "polygon"}, {"mask_threshold": 0.4}):
        monkeypatch.setenv(settings.BATCH_PARAMS.env, json.dumps(params))
        with pytest.raises(InputError, match="this model does object-detection"):
            batch_score.init(model_dir=str(tiny_od_model_dir))


def _cli(*args) -> list[str]:
    return [sys.executable, "-m", "mmdet_mlflow.cli", "batch", *map(str, args)]


def _read_jsonl(path: Path) -> list[dict]:
    """The complete lines of ``path`` (a kill may have cut the last one short)."""
    data = path.read_text()
    return [json.loads(line) for line in data[:data.rfind("\n") + 1].splitlines()]


def test_cli_resumes_after_a_kill(tmp_path, tiny_model_dir, image_files, expected):
    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(IMAGES):
        shutil.copy(image_files[i % 2], folder / f"img{i:02d}.png")
    (folder / "zz_bad.txt").write_text("nope")
    output = tmp_path / "out" / "predictions.jsonl"
    cmd = _cli("--model", tiny_model_dir, "--input", folder, "--output", output, "--mini-batch-size", 1)
    env = {**os.environ, "TQDM_DISABLE": "1"}
    process = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if output.exists() and output.read_bytes().count(b"\n") >= 2:
            break
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, process.stdout.read().decode()[-2000:]
    before = _read_jsonl(output)
    assert 2 <= len(before) < IMAGES + 1
    # a line cut short by the kill, in the middle of the next file's records
    with open(output, "ab") as out:
        out.write(b'{"row": 0, "prediction": {"boxes": [{"box": {"topX": 0.')

    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 1, rerun.stderr[-3000:]  # zz_bad.txt (scored after the kill) is an error record
    done = len({r["file"] for r in before})
    # The progress file vouches for every file whose records were fsynced before it: all of
    # `before`, or all but the last when the kill fell between the two writes. The cut line goes.
    vouched = int(re.search(r"files \((\d+) already done\)", rerun.stdout).group(1))
    assert f"{IMAGES + 1} files ({vouched} already done)" in rerun.stdout and vouched in (done - 1, done)
    after = _read_jsonl(output)  # every line parses: the partial one is gone
    assert after[:len(before) - 1] == before[:-1]
    assert len(after) == len({r["file"] for r in after}) == IMAGES + 1, "one record per file"
    assert sorted(r["file"] for r in after) == sorted(["zz_bad.txt"] + [f"img{i:02d}.png" for i in range(IMAGES)])
    assert [r["error"] for r in after if r["file"] == "zz_bad.txt"] == [
        "row 0: not an image (4 bytes in no format we can read; we accept JPEG, PNG, WEBP, BMP, TIFF, GIF)"]
    # and the results are those of the model's pyfunc, whichever run wrote them
    for record in after[:-1]:
        assert_same_detections(record["prediction"], expected[int(record["file"][3:5]) % 2])

    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert f"{IMAGES + 1} files ({IMAGES + 1} already done): 0 images scored" in again.stdout
    assert _read_jsonl(output) == after


def test_cli_rejects_an_output_that_is_not_batch_records(tmp_path, tiny_model_dir, image_files):
    output = tmp_path / "other.jsonl"
    output.write_text("hello\n")
    result = subprocess.run(_cli("--model", tiny_model_dir, "--input", image_files[0], "--output", output),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "not batch records" in result.stderr
    assert output.read_text() == "hello\n"
