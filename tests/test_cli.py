"""The `mmdet-mlflow` command, run as a user runs it (a separate process)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import (NETWORK_LIBRARIES, OD_CLASSES, TINY, TINY_OD, assert_object_detection_answers,
                     cli_without)


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


def test_an_object_detection_config_packages_predicts_draws_boxes_and_batches(
        tmp_path, tiny_od_checkpoint, image_files):
    """The commands take an object-detection config as they take RTMDet-Ins's: `package` by
    config name, `predict` on a folder (its pictures with boxes alone drawn: the detections
    drawn on the input, nothing filled) and `batch`, all in AutoML's object-detection schema."""
    import cv2

    from mmdet_mlflow.visualize import draw_detections

    model = tmp_path / "model"
    done = cli("package", "--config", TINY_OD, "--checkpoint", tiny_od_checkpoint, "--output", model)
    assert done.returncode == 0, done.stderr
    assert f"packaged {TINY_OD} ({len(OD_CLASSES)} classes" in done.stdout
    info = json.loads((model / "model" / "model.json").read_text())
    assert info["family"] == "rtmdet" and info["task"] == "object-detection"

    folder = image_files[0].parent
    out = tmp_path / "predictions.jsonl"
    done = cli("predict", "--model", model, "--input", folder, "--output", out,
               "--visualize", tmp_path / "pictures")
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(Path(line["file"]).name for line in lines) == ["scene0.png", "scene1.png"]
    assert_object_detection_answers([{"boxes": line["boxes"]} for line in lines])
    for line in lines:
        name = Path(line["file"]).name
        drawn = cv2.imread(str(tmp_path / "pictures" / name))
        assert np.array_equal(drawn, draw_detections(cv2.imread(line["file"]), line["boxes"]))

    batch_out = tmp_path / "batch.jsonl"
    done = cli("batch", "--model", model, "--input", folder, "--output", batch_out)
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in batch_out.read_text().splitlines()]
    assert sorted(r["file"] for r in records) == ["scene0.png", "scene1.png"]
    assert all(r["error"] is None for r in records)
    assert_object_detection_answers([r["prediction"] for r in records])
    by_name = {Path(line["file"]).name: line["boxes"] for line in lines}
    assert all(r["prediction"]["boxes"] == by_name[r["file"]] for r in records)


def test_package_errors_are_one_clear_line(tmp_path, tiny_checkpoint):
    done = cli("package", "--config", "rtmdet-ins_huge", "--checkpoint", tiny_checkpoint,
               "--output", tmp_path / "m")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "no config of that name ships with mmdet" in done.stderr
    done = cli("package", "--config", TINY, "--checkpoint", tmp_path / "nope.pth",
               "--output", tmp_path / "m")
    assert done.returncode == 2 and "is not a file, an http(s) URL or 'official'" in done.stderr


# --- the Azure commands (register, deploy): dry runs contact nothing ---------------------------

# The register and deploy components run in a small environment (components/environment/
# deploy-conda.yaml: the Azure ML SDK and azure-identity only): the CLI must not need the
# serving stack for them.
NOT_IN_THE_DEPLOY_ENVIRONMENT = ("torch", "torchvision", "mmdet", "mmcv", "mmengine", "mlflow",
                                 "numpy", "pandas", "cv2", "PIL", "pycocotools")


def light_cli(*args):
    return cli_without(NOT_IN_THE_DEPLOY_ENVIRONMENT, *args)


def test_register_then_deploy_dry_run_without_the_serving_stack(tmp_path, tiny_model_dir):
    from mlflow_model.model_dir import REGISTRATION_FILE

    details = tmp_path / "registration_details"
    done = light_cli("register", "--model", tiny_model_dir, "--name", "seg", "--output", details,
                     "--dry-run", "true")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["azureml:seg@latest"]
    registration = json.loads((details / REGISTRATION_FILE).read_text())
    assert registration == {"name": "seg", "version": None, "id": "azureml:seg@latest", "dry_run": True}

    out = tmp_path / "deployment_yaml"
    done = light_cli("deploy", "batch", "--registration-details", details, "--endpoint-name", "seg-batch",
                     "--compute", "cpu-cluster", "--dry-run", "--output-dir", out)
    assert done.returncode == 0, done.stderr
    import yaml

    deployment = yaml.safe_load((out / "batch-deployment.yml").read_text())
    assert deployment["model"] == "azureml:seg@latest"
    assert deployment["endpoint_name"] == "seg-batch"


@pytest.mark.parametrize("model, task, azure_task", [
    ("tiny_model_dir", "instance-segmentation", "image-instance-segmentation"),
    ("tiny_od_model_dir", "object-detection", "image-object-detection"),
])
def test_the_registered_model_is_tagged_with_the_task_it_serves(request, model, task, azure_task):
    from mmdet_mlflow.azure.register import model_entity

    entity = model_entity(request.getfixturevalue(model), "m")
    assert entity.tags["task"] == task and entity.tags["base_model_task"] == azure_task
    assert task in entity.description


def test_a_mistyped_boolean_is_refused_not_read_as_false(tmp_path):
    """`ture` must never turn a dry run into a real registration or deployment."""
    for args in (("register", "--model", tmp_path, "--name", "m", "--output", tmp_path / "out",
                  "--dry-run", "ture"),
                 ("deploy", "online", "--endpoint-name", "e", "--model", "azureml:m:1",
                  "--output-dir", tmp_path / "out", "--dry-run", "ture"),
                 ("deploy", "batch", "--endpoint-name", "e", "--model", "azureml:m:1", "--compute", "c",
                  "--output-dir", tmp_path / "out", "--dry-run", "true", "--enabled", "flase")):
        done = cli(*args)
        assert done.returncode == 2, (args, done.stderr)
        assert "not a boolean" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists()


def test_deploy_errors_are_one_clear_line(tmp_path):
    common = ("--endpoint-name", "e", "--compute", "c", "--dry-run", "--output-dir", tmp_path / "yaml")
    for args, message in (
            (("--model", "azureml:m:1", "--params", '{"score": 1}'), "unknown param 'score'"),
            ((), "give --model azureml:<name>:<version> or --registration-details DIR"),
            (("--registration-details", tmp_path / "no-such-step"), "registration.json")):
        done = cli("deploy", "batch", *common, *args)
        assert done.returncode == 2, done.stderr
        assert "Traceback" not in done.stderr and message in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_predict_answers_rle_or_boxes_alone_for_the_classes_asked(tmp_path, tiny_model_dir, image_files):
    """--mask-format and --classes reach the answers and the pictures."""
    from pycocotools import mask as mask_util

    folder = image_files[0].parent
    found = {}
    for mask_format in ("rle", "none"):
        out = tmp_path / f"{mask_format}.jsonl"
        done = cli("predict", "--model", tiny_model_dir, "--input", folder, "--output", out,
                   "--visualize", tmp_path / mask_format, "--score-threshold", "0.05",
                   "--mask-format", mask_format, "--classes", "person, car,dog")
        assert done.returncode == 0, done.stderr
        found[mask_format] = [json.loads(line) for line in out.read_text().splitlines()]
        assert all((tmp_path / mask_format / p.name).is_file() for p in image_files)
    boxes = [box for line in found["rle"] for box in line["boxes"]]
    assert boxes and {box["label"] for box in boxes} <= {"person", "car", "dog"}
    for box in boxes:
        assert "polygon" not in box
        mask_util.decode({"size": box["rle"]["size"], "counts": box["rle"]["counts"].encode()})
    assert [[{k: v for k, v in b.items() if k != "rle"} for b in line["boxes"]] for line in found["rle"]] \
        == [line["boxes"] for line in found["none"]]

    # refused from the model's files, before its network loads: where it could not even be imported
    done = cli_without(NETWORK_LIBRARIES, "predict", "--model", tiny_model_dir, "--input", folder,
                       "--output", tmp_path / "x.jsonl", "--classes", "person,unicorn")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "does not have: 'unicorn'" in done.stderr + done.stdout


def test_predict_keeps_sub_folders_in_pictures_and_reports_unreadable_files_as_batch_does(
        tmp_path, tiny_model_dir, image_files):
    """a/1.png and b/1.png get a picture each (they overwrote each other); a file that cannot
    be read (here: gone between listing and reading) is an error line, as in batch, not the end
    of the run."""
    import shutil

    from mmdet_mlflow.predict import image_files as listed
    from mmdet_mlflow.predict import predict_files

    folder = tmp_path / "in"
    for sub in ("a", "b"):
        (folder / sub).mkdir(parents=True)
        shutil.copy(image_files[0], folder / sub / "1.png")
    (folder / "b" / "1.jpg").write_bytes(image_files[1].read_bytes())  # would share 1.png's picture
    out, pictures = tmp_path / "p.jsonl", tmp_path / "pictures"
    files = listed(folder).entries + [folder / "gone.png"]
    counts = predict_files(tiny_model_dir, files, out, {"max_detections": 2}, pictures, root=folder)
    assert counts["images"] == 3 and counts["errors"] == 1
    lines = {Path(line["file"]).relative_to(folder).as_posix(): line
             for line in map(json.loads, out.read_text().splitlines())}
    assert set(lines) == {"a/1.png", "b/1.png", "b/1.jpg", "gone.png"}
    assert "cannot read the file" in lines["gone.png"]["error"]
    assert sorted(p.relative_to(pictures).as_posix() for p in pictures.rglob("*.png")) == \
        ["a/1.png", "b/1.png", "b/1.png.png"]  # b/1.jpg comes first, b/1.png keeps its whole name


def test_save_model_refuses_with_our_error_before_writing(tmp_path, tiny_checkpoint):
    import mlflow_model
    from scoring.errors import MmdetMlflowError

    for kwargs in ({"runtime": "tensorrt"}, {"runtime": "onnx", "quantize": "int4"},
                   {"runtime": "torch", "quantize": "int8", "calibration_images": [1]},
                   {"runtime": "onnx", "quantize": "int8"}):
        with pytest.raises(MmdetMlflowError):
            mlflow_model.save_model(tmp_path / "m", TINY, str(tiny_checkpoint), **kwargs)
        assert not (tmp_path / "m").exists()
