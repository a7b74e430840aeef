"""Batch records (scoring.batch_files, mmdet_mlflow.batch): one line per record whatever the file names, resume after a cut or a link, one record for every entry of a folder (predict too)."""
from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from helpers import NETWORK_LIBRARIES, cli_without, odd_entries
from hostile_cases import encoded, picture


# Batch records and resume

def test_batch_records_with_line_breaks_stay_one_line_and_round_trip():
    from scoring.batch_files import COLUMNS, format_record, parse_record

    records = [{"row": 0, "prediction": {"boxes": []}, "file": "two\nlines.png", "error": None},
               {"row": 3, "prediction": None, "file": "a.csv",
                "error": "row 3: not valid base64: 'ab\\r\\ncd'\nsecond line\\n\u2028"},
               {"row": None, "prediction": None, "file": "back\\slash.png", "error": "x"}]
    lines = [format_record(r) for r in records]
    assert all(len(line.splitlines()) == 1 for line in lines)
    assert [parse_record(line) for line in lines] == records
    table = pd.read_csv(io.StringIO("\n".join(lines) + "\n"), names=list(COLUMNS),
                        keep_default_na=False, dtype=str)
    assert len(table) == 3 and list(table["row"]) == ["0", "3", ""]


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def batch_inputs(tmp_path_factory):
    """A folder with an image, a symlink to an image outside it and a 3-row table."""
    import base64

    base = tmp_path_factory.mktemp("resume")
    outside = base / "elsewhere.png"
    outside.write_bytes(encoded("PNG", picture(40, 30)))
    folder = base / "input"
    folder.mkdir()
    (folder / "a.png").write_bytes(encoded("PNG", picture(32, 24)))
    (folder / "linked.png").symlink_to(outside)
    good = base64.b64encode(encoded("PNG", picture(24, 16))).decode()
    pd.DataFrame({"image": [good, "%%%", good]}).to_csv(folder / "table.csv", index=False)
    return folder


FEW = {"max_detections": 2}  # resume is the point, not the masks


def test_a_symlinked_input_is_recognised_as_done(batch_inputs, tiny_model_dir, tmp_path):
    from mmdet_mlflow.batch import run_batch

    output = tmp_path / "out.jsonl"
    first = run_batch(tiny_model_dir, batch_inputs, output, mini_batch_size=2, params=FEW)
    assert first["images"] == 4 and first["errors"] == 1
    again = run_batch(tiny_model_dir, batch_inputs, output, mini_batch_size=2, params=FEW)
    assert again == {"files": 3, "skipped": 3, "images": 0, "errors": 0, "hidden": 0}
    assert sorted(r["file"] for r in _jsonl(output)) == ["a.png", "linked.png"] + ["table.csv"] * 3


def test_an_output_cut_at_a_line_end_resumes_to_one_complete_set(batch_inputs, tiny_model_dir, tmp_path):
    """Killed after the output's write and before the progress entry, with the output ending
    exactly at a line end in the middle of table.csv's records: the rerun drops what the
    progress file does not vouch for and scores the table again, once."""
    from mmdet_mlflow.batch import progress_file, run_batch

    output = tmp_path / "out.jsonl"
    run_batch(tiny_model_dir, batch_inputs, output, mini_batch_size=1, params=FEW)
    whole = _jsonl(output)
    lines = output.read_text().splitlines(keepends=True)
    assert [r["file"] for r in whole][-3:] == ["table.csv"] * 3
    output.write_text("".join(lines[:-2]))  # two of table.csv's three records gone, cut at a line end
    progress = progress_file(output)
    entries = progress.read_text().splitlines(keepends=True)
    progress.write_text("".join(entries[:-1]))  # the kill came before table.csv's progress entry
    rerun = run_batch(tiny_model_dir, batch_inputs, output, mini_batch_size=1, params=FEW)
    assert rerun["skipped"] == 2 and rerun["images"] == 2 and rerun["errors"] == 1
    after = _jsonl(output)
    assert [(r["file"], r["row"]) for r in after] == [(r["file"], r["row"]) for r in whole]
    assert [r["error"] for r in after] == [r["error"] for r in whole]


def test_batch_records_of_a_file_named_with_a_line_break(tiny_model_dir, tmp_path):
    """Azure's batch script: a record of a file whose name holds a line break is one CSV line."""
    from scoring.azureml import batch_score
    from scoring.batch_files import parse_record

    odd = tmp_path / "two\nlines.png"
    odd.write_bytes(b"not an image\nat all")
    batch_score.init(model_dir=str(tiny_model_dir), params=FEW)
    lines = batch_score.run([str(odd)])
    assert len(lines) == 1 and len(lines[0].splitlines()) == 1
    assert parse_record(lines[0])["file"] == "two\nlines.png"
    shutil.rmtree(tmp_path, ignore_errors=True)


# Every entry of a folder is accounted for

@pytest.fixture(scope="module")
def odd_folder(tmp_path_factory) -> tuple[Path, dict[str, str | None]]:
    """Two pictures beside entries that are none (``helpers.odd_entries``) and a hidden one."""
    folder = tmp_path_factory.mktemp("odd") / "input"
    expected = odd_entries(folder, encoded("PNG", picture(40, 30)))
    for name, fmt in (("a.png", "PNG"), ("sub/b.jpg", "JPEG")):
        (folder / name).parent.mkdir(exist_ok=True)
        (folder / name).write_bytes(encoded(fmt, picture(32, 24)))
        expected[name] = None
    return folder, expected


def _cli(*args) -> subprocess.CompletedProcess:
    """The command in a process of its own, with a time limit: a FIFO opened would hang it."""
    return subprocess.run([sys.executable, "-m", "mmdet_mlflow.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=300)


def _assert_one_record_each(lines: list[dict], expected: dict[str, str | None], root: Path) -> None:
    by_name: dict[str, list[dict]] = {}
    for line in lines:
        by_name.setdefault(Path(line["file"]).relative_to(root).as_posix()
                           if Path(line["file"]).is_absolute() else line["file"], []).append(line)
    assert sorted(by_name) == sorted(expected), "exactly the entries, the hidden one left out"
    for name, problem in expected.items():
        [line] = by_name[name]
        if problem is None:
            scored = line.get("prediction", line.get("boxes"))  # batch's record, predict's line
            assert line.get("error") is None and scored is not None, name
        else:
            assert problem in line["error"], (name, line["error"])


def test_batch_gives_every_entry_of_a_folder_one_record_and_a_rerun_none(odd_folder, tiny_model_dir, tmp_path):
    from mmdet_mlflow.batch import run_batch

    folder, expected = odd_folder
    output = tmp_path / "out.jsonl"
    done = _cli("batch", "--model", tiny_model_dir, "--input", folder, "--output", output,
                "--mini-batch-size", 3, "--max-detections", 2)
    errors = sum(problem is not None for problem in expected.values())
    assert done.returncode == 1, done.stderr[-3000:]
    assert (f"{len(expected)} files (0 already done; 1 hidden, not read): "
            f"{len(expected) - errors} images scored, {errors} errors") in done.stdout
    _assert_one_record_each(_jsonl(output), expected, folder)
    again = run_batch(tiny_model_dir, folder, output, mini_batch_size=3, params=FEW)
    assert again == {"files": len(expected), "skipped": len(expected), "images": 0, "errors": 0,
                     "hidden": 1}
    assert len(_jsonl(output)) == len(expected)


def test_predict_gives_every_picture_named_entry_one_line(odd_folder, tiny_model_dir, tmp_path):
    folder, expected = odd_folder
    (folder / "notes.txt").write_text("not named as a picture: predict leaves it out")
    output = tmp_path / "predictions.jsonl"
    try:
        done = _cli("predict", "--model", tiny_model_dir, "--input", folder, "--output", output,
                    "--max-detections", 2)
    finally:
        (folder / "notes.txt").unlink()
    errors = sum(problem is not None for problem in expected.values())
    assert done.returncode == 1, done.stderr[-3000:]
    assert (f"{len(expected) - errors} images, " in done.stdout
            and f"{errors} unreadable (1 hidden, not read)" in done.stdout), done.stdout
    _assert_one_record_each([json.loads(line) for line in output.read_text().splitlines()],
                            expected, folder)


@pytest.mark.parametrize("command", ["batch", "predict"])
def test_mask_params_of_an_object_detection_model_are_refused_naming_its_task_before_any_file(
        command, tiny_od_model_dir, tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.png").write_bytes(encoded("PNG", picture(32, 24)))
    output = tmp_path / "out" / "answers.jsonl"
    # refused from the model's files, before its network loads: where it could not even be imported
    done = cli_without(NETWORK_LIBRARIES, command, "--model", tiny_od_model_dir, "--input", tmp_path / "in",
                       "--output", output, "--mask-format", "polygon", timeout=300)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "this model does object-detection" in done.stderr and "mask_format 'polygon'" in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "out").exists()


def test_azure_batch_script_never_opens_a_fifo_it_is_given(odd_folder, tiny_model_dir):
    """Azure's driver passes file paths: one that is a FIFO is an error record, not a hang."""
    from scoring.azureml import batch_score
    from scoring.batch_files import parse_record

    folder, _ = odd_folder
    batch_score.init(model_dir=str(tiny_model_dir), params=FEW, input_root=str(folder))
    records = [parse_record(line) for line in batch_score.run([str(folder / "pipe.jpg"),
                                                               str(folder / "a.png")])]
    assert [(r["file"], r["error"]) for r in records] == [
        ("pipe.jpg", "not a regular file: a FIFO (named pipe)"), ("a.png", None)]
