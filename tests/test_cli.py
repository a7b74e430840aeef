"""The `mmdet-mlflow` command, run as a user runs it (a separate process)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from helpers import TINY


def cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "mmdet_mlflow.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=600, cwd=cwd)


def test_package_then_predict_a_folder_with_pictures(tmp_path, tiny_checkpoint, image_files):
    model = tmp_path / "model"
    done = cli("package", "--config", TINY, "--checkpoint", tiny_checkpoint, "--output", model)
    assert done.returncode == 0, done.stderr
    assert "packaged rtmdet-ins_tiny_8xb32-300e_coco (80 classes" in done.stdout
    assert (model / "MLmodel").is_file()

    folder = image_files[0].parent
    (folder / "broken.png").write_bytes(b"not really a png")
    try:
        out = tmp_path / "predictions.jsonl"
        done = cli("predict", "--model", model, "--input", folder, "--output", out,
                   "--visualize", tmp_path / "pictures", "--score-threshold", "0.5")
    finally:
        (folder / "broken.png").unlink()
    assert done.returncode == 1, "an unreadable file makes the run fail, after the rest is done"
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    by_file = {Path(line["file"]).name: line for line in lines}
    assert set(by_file) == {"broken.png", "scene0.png", "scene1.png"}
    assert "not an image" in by_file["broken.png"]["error"]
    for name in ("scene0.png", "scene1.png"):
        assert all(d["score"] > 0.5 for d in by_file[name]["boxes"])
        assert (tmp_path / "pictures" / name).is_file()
    assert "2 images" in done.stdout and "1 unreadable" in done.stdout


def test_package_errors_are_one_clear_line(tmp_path, tiny_checkpoint):
    done = cli("package", "--config", "rtmdet-ins_huge", "--checkpoint", tiny_checkpoint,
               "--output", tmp_path / "m")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "no config of that name ships with mmdet" in done.stderr
    done = cli("package", "--config", TINY, "--checkpoint", tmp_path / "nope.pth",
               "--output", tmp_path / "m")
    assert done.returncode == 2 and "is not a file, an http(s) URL or 'official'" in done.stderr
