"""Fine-tuning for real on a small synthetic fridge set (tiny model, CPU, a few steps): every
data format, every way to start, a servable result with the new classes, MLflow tracking, resume
after a killed run, two processes under torchrun, and the Azure ML component spec."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import TINY, b64
from finetune_fixtures import fridge, one_torch_thread  # noqa: F401  (fixtures: one torch thread, the fridge set)

from mmdet_mlflow import cli
from mmdet_mlflow.synth import CLASSES
from mmdet_mlflow.training import (FinetuneError, FinetuneSettings, finetune, finetuned_classes,
                                   quick_cpu_recipe)
from mmdet_mlflow.training.start import adapt_weights
from scoring.model_dir import ModelDir

ROOT = Path(__file__).resolve().parent.parent
# Small and fast: 8 training images, 128-pixel input, 4 images a step.
FAST = dict(image_size=128, training_batch_size=4, validation_batch_size=4, warmup_steps=1)
FAST_ARGS = ["--image-size", "128", "--training-batch-size", "4", "--validation-batch-size", "4",
             "--warmup-steps", "1"]






@pytest.fixture
def tracking_uri(tmp_path, monkeypatch) -> str:
    """A tracking store of the test's own, for this process (even if other tests set one in
    code) and its subprocesses."""
    from mlflow.tracking._tracking_service import utils

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # A sqlite store keeps its artifacts in ./mlruns of the working directory: the test's, not
    # the repository (subprocesses inherit it).
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setattr(utils, "_tracking_uri", uri)
    return uri


def subprocess_env(tracking_uri: str) -> dict:
    """This environment with the test's tracking store, and no experiment or run that another
    test's MLflow calls may have exported (they belong to other stores)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID")}
    return {**env, "MLFLOW_TRACKING_URI": tracking_uri, "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


def predicted_boxes(model_dir: Path, image: Path, max_detections: int) -> list[dict]:
    """What the MLflow model at ``model_dir`` answers for ``image`` at score threshold 0."""
    import mlflow
    import pandas as pd

    predictions = mlflow.pyfunc.load_model(str(model_dir)).predict(
        pd.DataFrame({"image": [b64(image)]}),
        params={"score_threshold": 0.0, "max_detections": max_detections})
    boxes = predictions["boxes"].iloc[0]
    return json.loads(boxes) if isinstance(boxes, str) else boxes


def history(output: Path) -> tuple[list[dict], list[dict]]:
    entries = [json.loads(line) for line in (output / "history.jsonl").read_text().splitlines()]
    return ([e for e in entries if e["kind"] == "step"], [e for e in entries if e["kind"] == "epoch"])


def test_finetune_coco_checkpoint_on_jsonl_gives_servable_model_with_new_classes(
        fridge, tiny_checkpoint, tmp_path, tracking_uri):
    import mlflow

    out = tmp_path / "run"
    result = finetune(fridge / "train.jsonl", fridge / "validation.jsonl", out, config=TINY,
                      checkpoint=str(tiny_checkpoint), progress=False,
                      settings=FinetuneSettings(number_of_epochs=2, **FAST))

    assert result.classes == CLASSES
    assert any("re-initialised for 4 new classes" in note for note in result.notes), result.notes
    assert [e["epoch"] for e in result.epochs] == [1, 2] and result.steps == 4
    assert result.best["epoch"] in (1, 2)
    assert (out / "training_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "metrics.json").read_text())["best"] == result.best

    # pytorch_model_folder: plain tensors, the 4-class head, trained away from the start.
    weights = torch.load(out / "pytorch_model_folder" / "weights.pth", weights_only=True)
    start = torch.load(tiny_checkpoint, weights_only=True)["state_dict"]
    assert weights["bbox_head.rtm_cls.0.weight"].shape[0] == 4
    assert start["bbox_head.rtm_cls.0.weight"].shape[0] == 80
    assert not torch.equal(weights["backbone.stem.0.conv.weight"], start["backbone.stem.0.conv.weight"])
    assert json.loads((out / "pytorch_model_folder" / "model.json").read_text())["classes"] == CLASSES
    assert finetuned_classes(out) == CLASSES
    # published like any result: readable by others, directories listable (not mkstemp's 0600/0700)
    for path in [out / "pytorch_model_folder", *(out / "pytorch_model_folder").iterdir(),
                 out / "mlflow_model_folder", out / "mlflow_model_folder" / "MLmodel",
                 out / "metrics.json", out / "run.json", out / "training_curves.png"]:
        assert path.stat().st_mode & 0o777 == (0o755 if path.is_dir() else 0o644), path

    # validation metrics under docs/metrics.md's names: Azure's mean_average_precision is mask AP
    # at IoU 0.5 (COCO's segm_AP50), never COCO's mAP@[.5:.95] (segm_AP)
    for epoch in result.epochs:
        assert {"mean_average_precision", "precision", "recall", "segm_AP", "segm_AP50",
                "bbox_AP"} <= set(epoch)
        assert epoch["mean_average_precision"] == pytest.approx(epoch["segm_AP50"], abs=1e-9)
    log = (out / "evaluation.log").read_text()
    assert "Average Precision" in log and "mean_average_precision" in log

    # mlflow_model_folder: loads and predicts with the synthetic class names.
    boxes = predicted_boxes(out / "mlflow_model_folder", next((fridge / "images").glob("*.jpg")), 20)
    assert boxes and {b["label"] for b in boxes} <= set(CLASSES)

    # MLflow: params, a loss per step, metrics per epoch, the plot and the model.
    client = mlflow.MlflowClient(tracking_uri)
    run = client.get_run(result.mlflow_run_id)
    assert run.data.params["learning_rate"] == "0.001" and run.data.params["image_size"] == "128"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2, 3, 4]
    assert len(client.get_metric_history(run.info.run_id, "mean_average_precision")) == 2
    assert len(client.get_metric_history(run.info.run_id, "segm_AP")) == 2
    assert "training_curves.png" in {a.path for a in client.list_artifacts(run.info.run_id)}
    logged = mlflow.search_logged_models(experiment_ids=[run.info.experiment_id], output_format="list")
    assert any(m.source_run_id == run.info.run_id for m in logged)


def test_a_second_finetune_in_the_same_process_writes_only_into_its_own_folder(fridge, tmp_path, tracking_uri):
    """mmengine keeps its visualizer for the life of the process: the second run must not write
    into the first one's folder (here gone, as a user may delete it)."""
    import shutil

    def run(out: Path):
        return finetune(fridge / "train.jsonl", fridge / "validation.jsonl", out, config=TINY, checkpoint="none",
                        progress=False, settings=FinetuneSettings(number_of_epochs=1, max_steps=1, **FAST))

    run(tmp_path / "first")
    shutil.rmtree(tmp_path / "first")
    run(tmp_path / "second")
    assert not (tmp_path / "first").exists()
    assert list((tmp_path / "second").rglob("vis_data/config.py"))


def test_evaluation_frequency_validates_every_nth_epoch_and_always_the_last(fridge, tmp_path, tracking_uri):
    """Validation costs seconds an epoch, which a short CPU recipe would rather spend training:
    every 2nd epoch and the last are validated, and only those compete for the best model.
    (Exported for ONNX Runtime here: the torch export is every other test's.)"""
    out = tmp_path / "run"
    result = finetune(fridge / "train.jsonl", fridge / "validation.jsonl", out, config=TINY,
                      checkpoint="none", progress=False, runtime="onnx",
                      settings=FinetuneSettings(number_of_epochs=3, evaluation_frequency=2, **FAST))
    assert [e["epoch"] for e in result.epochs] == [2, 3] and result.steps == 6
    assert result.best["epoch"] in (2, 3)
    assert [e["epoch"] for e in history(out)[1]] == [2, 3]
    model = out / "mlflow_model_folder"
    assert (model / "MLmodel").is_file() and (model / "model" / "model.onnx").is_file()
    assert "torch" not in (model / "requirements.txt").read_text()
    assert (out / "pytorch_model_folder" / "weights.pth").is_file()  # to fine-tune again from
    # and an ONNX model is no starting point (no torch weights), said before any training
    with pytest.raises(FinetuneError, match="ONNX Runtime model.*pytorch_model_folder"):
        finetune(fridge / "train.jsonl", fridge / "validation.jsonl", tmp_path / "again", model=model,
                 progress=False, settings=FinetuneSettings(number_of_epochs=1, **FAST))
    with pytest.raises(FinetuneError, match="runtime must be one of torch, onnx"):
        finetune(fridge / "train.jsonl", fridge / "validation.jsonl", tmp_path / "again", config=TINY,
                 checkpoint="none", runtime="tensorrt")


def run_until_checkpoint(command, env, pointer: Path, pattern: str, log: Path) -> str:
    """Start ``command``, SIGKILL it as soon as mmengine's last_checkpoint names a checkpoint
    matching ``pattern``; return that name."""
    with open(log, "wb") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=env,
                                   start_new_session=True)
        deadline = time.monotonic() + 240
        while process.poll() is None and not (
                pointer.is_file() and re.search(pattern, pointer.read_text())):
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.05)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    assert process.returncode == -signal.SIGKILL, log.read_text()[-3000:]
    return Path(pointer.read_text().strip()).name


def checkpointing_finetune(model: Path, fridge: Path, out: Path, epochs: int) -> list[str]:
    """A fine-tune of 4 steps an epoch that checkpoints every 3 steps and every epoch."""
    return [sys.executable, "-m", "mmdet_mlflow.cli", "finetune", "--model", str(model),
            "--training-data", str(fridge / "train"),
            "--validation-data", str(fridge / "validation.coco.json"),
            "--output", str(out), "--number-of-epochs", str(epochs), *FAST_ARGS,
            "--training-batch-size", "2", "--checkpoint-interval-steps", "3"]


def test_killed_runs_resume_mid_epoch_and_after_an_epoch(fridge, tiny_model_dir, tmp_path, tracking_uri):
    """Start from our packaged COCO model, train on the MLTable folder, validate on COCO JSON.
    Kill it after its first step checkpoint (mid-epoch), run it again and kill it after its
    next epoch checkpoint, run it a third time to the end: nothing lost, nothing repeated."""
    out = tmp_path / "run"
    command = checkpointing_finetune(tiny_model_dir, fridge, out, epochs=3)
    env = subprocess_env(tracking_uri)
    pointer = out / "checkpoints" / "last_checkpoint"

    assert run_until_checkpoint(command, env, pointer, r"iter_3\.pth", tmp_path / "1.log") == "iter_3.pth"
    assert not (out / "mlflow_model_folder").exists() and not (out / "pytorch_model_folder").exists()
    run_id = json.loads((out / "run.json").read_text())["mlflow_run_id"]
    name = run_until_checkpoint(command, env, pointer, r"epoch_\d\.pth", tmp_path / "2.log")
    assert "resumed after epoch 0, step 3" in (tmp_path / "2.log").read_text()
    completed = int(name[len("epoch_"):-len(".pth")])
    assert completed < 3

    third = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert third.returncode == 0, third.stderr[-3000:]
    assert f"resumed after epoch {completed}, step {4 * completed}" in third.stderr
    steps, epochs = history(out)
    assert [s["step"] for s in steps] == list(range(1, 13))
    assert [e["epoch"] for e in epochs] == [1, 2, 3]
    assert json.loads((out / "run.json").read_text())["mlflow_run_id"] == run_id
    checkpoint = torch.load(out / "checkpoints" / "epoch_3.pth", weights_only=True)
    assert checkpoint["meta"]["epoch"] == 3 and checkpoint["meta"]["iter"] == 12
    assert (out / "mlflow_model_folder" / "MLmodel").is_file()

    import mlflow

    # Every epoch validated, the one checkpointed just before a kill included (mmengine saves an
    # epoch before validating it; a validation cut short is redone, and then logged twice).
    history_steps = mlflow.MlflowClient(tracking_uri).get_metric_history(run_id, "mean_average_precision")
    assert {m.step for m in history_steps} == {4, 8, 12}


def test_killed_while_writing_a_checkpoint_resumes_from_the_last_complete_one(fridge, tiny_model_dir,
                                                                           tmp_path, tracking_uri):
    """A kill during a checkpoint write leaves a truncated file, which mmengine may already name
    in last_checkpoint. The run resumes from the newest complete checkpoint instead, losing only
    the steps after it, and ends with every step done exactly once."""
    out = tmp_path / "run"
    command = checkpointing_finetune(tiny_model_dir, fridge, out, epochs=2)
    env = subprocess_env(tracking_uri)
    checkpoints = out / "checkpoints"
    pointer = checkpoints / "last_checkpoint"
    assert run_until_checkpoint(command, env, pointer, r"iter_3\.pth", tmp_path / "1.log") == "iter_3.pth"
    # what a kill half-way through writing the next checkpoint leaves: half a file, named
    complete = (checkpoints / "iter_3.pth").read_bytes()
    cut = checkpoints / "epoch_1.pth"
    cut.write_bytes(complete[: len(complete) // 2])
    pointer.write_text(str(cut))

    resumed = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed after epoch 0, step 3" in resumed.stderr
    steps, epochs = history(out)
    assert [s["step"] for s in steps] == list(range(1, 9)), "every step once: step 4 redone, none repeated"
    assert [e["epoch"] for e in epochs] == [1, 2]
    assert torch.load(checkpoints / "epoch_2.pth", weights_only=True)["meta"]["iter"] == 8
    assert (out / "mlflow_model_folder" / "MLmodel").is_file()


def test_two_processes_under_torchrun(fridge, tmp_path, tracking_uri):
    out = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "mmdet_mlflow.cli", "finetune", "--config", TINY, "--checkpoint", "none",
               "--training-data", str(fridge / "train.coco.json"),
               "--validation-data", str(fridge / "validation.jsonl"),
               "--output", str(out), "--max-steps", "2", "--training-batch-size", "2",
               *FAST_ARGS[:2], "--warmup-steps", "1"]
    done = subprocess.run(command, capture_output=True, text=True, env=subprocess_env(tracking_uri),
                          timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    run_info = json.loads((out / "run.json").read_text())
    assert run_info["world_size"] == 2 and run_info["device"] == "cpu"
    steps, epochs = history(out)
    assert [s["step"] for s in steps] == [1, 2] and len(epochs) == 1
    assert (out / "mlflow_model_folder" / "MLmodel").is_file()
    assert torch.load(out / "pytorch_model_folder" / "weights.pth", weights_only=True)

    import mlflow

    runs = mlflow.MlflowClient(tracking_uri).search_runs(
        [e.experiment_id for e in mlflow.MlflowClient(tracking_uri).search_experiments()])
    assert len(runs) == 1  # only rank 0 tracks


@pytest.fixture(scope="module")
def boxes_only(tmp_path_factory) -> Path:
    """The fridge pictures annotated with boxes alone (object-detection data)."""
    from mmdet_mlflow.synth import generate

    folder = tmp_path_factory.mktemp("fridge-boxes")
    generate(folder, num_images=6, seed=3, progress=False, task="object-detection")
    return folder


def test_an_object_detection_model_finetunes_on_boxes_and_writes_an_object_detection_model(
        boxes_only, tmp_path, tracking_uri):
    import mlflow
    from mlflow.models import Model

    out = tmp_path / "run"
    result = finetune(boxes_only / "train.jsonl", boxes_only / "validation.jsonl", out,
                      config="rtmdet_tiny_8xb32-300e_coco", checkpoint="none", progress=False,
                      settings=FinetuneSettings(number_of_epochs=1, max_steps=2, **FAST))
    assert result.steps == 2
    # validated on boxes: COCO's box stats and Azure's metrics of the boxes, no mask stats
    epoch = result.epochs[-1]
    assert {"mean_average_precision", "precision", "recall", "bbox_AP", "bbox_AP50"} <= set(epoch)
    assert not any(name.startswith("segm_") for name in epoch)
    assert epoch["mean_average_precision"] == pytest.approx(epoch["bbox_AP50"], abs=1e-9)
    # the family's recipe: RTMDet's AdamW at its fine-tune rate, recorded where the run is
    assert json.loads((out / "run.json").read_text())["settings"]["learning_rate"] == 0.001
    for folder in (out / "pytorch_model_folder", out / "mlflow_model_folder" / "model"):
        info = json.loads((folder / "model.json").read_text())
        assert (info["family"], info["task"]) == ("rtmdet", "object-detection")
    mlmodel = Model.load(str(out / "mlflow_model_folder"))
    assert mlmodel.metadata["base_model_task"] == "image-object-detection"

    boxes = predicted_boxes(out / "mlflow_model_folder", next((boxes_only / "images").glob("*.jpg")), 5)
    assert boxes and all(set(b) == {"box", "label", "score"} for b in boxes)
    assert {b["label"] for b in boxes} <= set(CLASSES)
    # the MLflow run's logged model is of the same task
    run = mlflow.MlflowClient(tracking_uri).get_run(result.mlflow_run_id)
    logged = [m for m in mlflow.search_logged_models(experiment_ids=[run.info.experiment_id],
                                                     output_format="list")
              if m.source_run_id == run.info.run_id]
    assert logged
    logged_model = Model.load(f"models:/{logged[0].model_id}")
    assert logged_model.metadata["base_model_task"] == "image-object-detection"


def test_box_data_cannot_train_masks_and_the_sets_must_share_a_task(fridge, boxes_only, tmp_path):
    with pytest.raises(FinetuneError, match="RTMDet-Ins is an instance-segmentation model.*"
                                            "object-detection data.*train an object-detection model"):
        finetune(boxes_only / "train.jsonl", boxes_only / "validation.jsonl", tmp_path / "a",
                 config=TINY, checkpoint="none", progress=False, track=False,
                 settings=FinetuneSettings(number_of_epochs=1, **FAST))
    with pytest.raises(FinetuneError, match=r"training data \(.*train.jsonl\) are instance-segmentation "
                                            r"data but the validation data \(.*validation.jsonl\) are "
                                            r"object-detection data"):
        finetune(fridge / "train.jsonl", boxes_only / "validation.jsonl", tmp_path / "b",
                 config="rtmdet_tiny_8xb32-300e_coco", checkpoint="none", progress=False, track=False,
                 settings=FinetuneSettings(number_of_epochs=1, **FAST))
    assert not (tmp_path / "a" / "checkpoints").exists() and not (tmp_path / "b" / "checkpoints").exists()


def test_yolof_finetunes_on_instance_data_from_a_checkpoint_of_other_classes(fridge, tmp_path):
    """An object-detection family trains on instance-segmentation data (its boxes), starting
    from a checkpoint whose classes differ: its class-shaped head (anchors x classes) is
    re-initialised but for the classes it knows by name."""
    from helpers import make_official_checkpoint

    config = "yolof_r50-c5_8xb8-1x_coco"
    checkpoint = make_official_checkpoint(tmp_path / "yolof.pth", config,
                                          classes=["bird", "milk_bottle", "cat", "can"])
    out = tmp_path / "run"
    result = finetune(fridge / "train.jsonl", fridge / "validation.jsonl", out, config=config,
                      checkpoint=str(checkpoint), progress=False, track=False,
                      settings=FinetuneSettings(number_of_epochs=1, max_steps=2, image_size=128,
                                                training_batch_size=2, validation_batch_size=2,
                                                warmup_steps=1))
    assert result.steps == 2
    assert any("re-initialised for 2 new classes (carton, water_bottle), kept for can, milk_bottle; "
               "the checkpoint's other 2 classes are dropped" in note for note in result.notes), result.notes
    assert "bbox_AP" in result.epochs[-1] and "segm_AP" not in result.epochs[-1]
    weights = torch.load(out / "pytorch_model_folder" / "weights.pth", weights_only=True)
    assert weights["bbox_head.cls_score.weight"].shape[0] == 5 * len(CLASSES)
    info = json.loads((out / "pytorch_model_folder" / "model.json").read_text())
    assert (info["family"], info["task"], info["classes"]) == ("yolof", "object-detection", CLASSES)
    # SGD, the family's fine-tune rate
    assert json.loads((out / "run.json").read_text())["settings"]["learning_rate"] == 0.015


def test_deformable_detr_finetunes_at_its_smallest_input_and_refuses_a_smaller_one(boxes_only, tmp_path):
    """Deformable DETR (two-stage) takes its 300 queries as the top encoder tokens: below its
    recipe's smallest input its training pictures have fewer, refused before training with the
    reason; at that input it trains and writes an object-detection model that answers."""
    from mlflow.models import Model

    config = "deformable-detr-refine-twostage_r50_16xb2-50e_coco"
    small = dict(training_batch_size=1, validation_batch_size=1, warmup_steps=1, number_of_epochs=1)
    with pytest.raises(FinetuneError, match=r"Deformable DETR trains at an input of at least 320 px "
                                            r"\(its two-stage queries .*\), not 160 px"):
        finetune(boxes_only / "train.jsonl", boxes_only / "validation.jsonl", tmp_path / "small",
                 config=config, checkpoint="none", progress=False, track=False,
                 settings=FinetuneSettings(image_size=160, **small))
    assert not (tmp_path / "small" / "checkpoints").exists()

    out = tmp_path / "run"
    result = finetune(boxes_only / "train.jsonl", boxes_only / "validation.jsonl", out, config=config,
                      checkpoint="none", progress=False, track=False,
                      settings=FinetuneSettings(image_size=320, max_steps=2, **small))
    assert result.steps == 2 and "bbox_AP" in result.epochs[-1]
    info = json.loads((out / "pytorch_model_folder" / "model.json").read_text())
    assert (info["family"], info["task"], info["classes"]) == ("deformable-detr", "object-detection", CLASSES)
    assert ModelDir(out / "mlflow_model_folder").read_info()["task"] == "object-detection"
    assert Model.load(str(out / "mlflow_model_folder")).metadata["base_model_task"] == "image-object-detection"
    boxes = predicted_boxes(out / "mlflow_model_folder", next((boxes_only / "images").glob("*.jpg")), 5)
    assert len(boxes) == 5 and {b["label"] for b in boxes} <= set(CLASSES)


def test_yolof_class_rows_lie_anchor_major():
    """YOLOF's cls_score has a block of every class per anchor: a kept class's 5 rows come from
    the checkpoint's 5 rows of that class."""
    from mmdet.registry import MODELS
    from mmengine.registry import init_default_scope

    from mlflow_model.configs import load_config
    from scoring.families import family_named

    init_default_scope("mmdet")
    config = "yolof_r50-c5_8xb8-1x_coco"
    old = {}
    for count, seed in ((3, 0), (2, 1)):
        torch.manual_seed(seed)
        old[count] = MODELS.build(load_config(config, num_classes=count).model)
        old[count].init_weights()
    weights = old[3].state_dict()
    adapted, _ = adapt_weights(old[2], weights, ["a", "b", "c"], ["c", "new"],
                               load_config(config).model, family_named("yolof"))
    key = "bbox_head.cls_score.weight"
    for anchor in range(5):
        assert torch.equal(adapted[key][anchor * 2], weights[key][anchor * 3 + 2])
        assert torch.equal(adapted[key][anchor * 2 + 1], old[2].state_dict()[key][anchor * 2 + 1])


def test_weights_adapt_to_new_classes_by_name(tmp_path):
    from mmdet.registry import MODELS
    from mmengine.registry import init_default_scope

    from mlflow_model.checkpoints import CheckpointError
    from mlflow_model.configs import load_config

    init_default_scope("mmdet")

    model_cfg = load_config(TINY).model

    def model(num_classes, seed):
        torch.manual_seed(seed)
        m = MODELS.build(load_config(TINY, num_classes=num_classes).model)
        m.init_weights()
        return m

    old = model(4, 0).state_dict()
    fresh = model(3, 1)
    adapted, notes = adapt_weights(fresh, old, ["cat", "x", "dog", "y"], ["dog", "bird", "cat"], model_cfg)
    key = "bbox_head.rtm_cls.1.weight"
    assert torch.equal(adapted[key][0], old[key][2]) and torch.equal(adapted[key][2], old[key][0])
    assert torch.equal(adapted[key][1], fresh.state_dict()[key][1])        # bird: new
    assert torch.equal(adapted["neck.out_convs.0.conv.weight"], old["neck.out_convs.0.conv.weight"])
    assert "1 new classes (bird), kept for dog, cat" in notes[0]
    fresh.load_state_dict(adapted, strict=True)

    same, notes = adapt_weights(model(4, 2), old, ["a", "b", "c", "d"], ["a", "b", "c", "d"], model_cfg)
    assert notes == [] and all(torch.equal(same[k], old[k]) for k in old)

    broken = dict(old, **{"backbone.stem.0.conv.weight": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="backbone.stem.0.conv.weight"):
        adapt_weights(model(4, 3), broken, None, ["a", "b", "c", "d"], model_cfg)


def test_mask_rcnn_weights_adapt_every_class_shaped_layer_by_name():
    """Mask R-CNN's class-shaped layers have their own layouts: fc_cls a row per class and a
    background row (kept from the checkpoint), fc_reg 4 rows per class, conv_logits a mask per
    class; each known class's rows move to its new place, a new class's keep the fresh ones."""
    from mmdet.registry import MODELS
    from mmengine.registry import init_default_scope

    from mlflow_model.configs import load_config
    from scoring.families import family_named

    init_default_scope("mmdet")
    config = "mask-rcnn_r50_fpn_1x_coco"

    def model(num_classes, seed):
        torch.manual_seed(seed)
        m = MODELS.build(load_config(config, num_classes=num_classes).model)
        m.init_weights()
        return m

    old = model(3, 0).state_dict()
    fresh = model(2, 1)
    adapted, notes = adapt_weights(fresh, old, ["cat", "x", "dog"], ["dog", "bird"],
                                   load_config(config).model, family_named("mask-rcnn"))
    assert "1 new classes (bird), kept for dog" in notes[0]
    cls, reg, logits = ("roi_head.bbox_head.fc_cls.weight", "roi_head.bbox_head.fc_reg.weight",
                        "roi_head.mask_head.conv_logits.weight")
    assert torch.equal(adapted[cls][0], old[cls][2])                  # dog
    assert torch.equal(adapted[cls][1], fresh.state_dict()[cls][1])   # bird: new
    assert torch.equal(adapted[cls][2], old[cls][3])                  # background
    assert torch.equal(adapted[reg][0:4], old[reg][8:12])
    assert torch.equal(adapted[reg][4:8], fresh.state_dict()[reg][4:8])
    assert torch.equal(adapted[logits][0], old[logits][2])
    assert torch.equal(adapted["roi_head.bbox_head.fc_cls.bias"][2], old["roi_head.bbox_head.fc_cls.bias"][3])
    fresh.load_state_dict(adapted, strict=True)


@pytest.mark.parametrize("change, message", [
    (dict(precision="8"), r"precision must be 32, 16 .*bf16.*auto .*got .8."),
    (dict(precision="bfloat16"), r"precision must be .*bf16 \(CPU autocast\) or auto"),
    (dict(metric_for_best_model="precision"), "evaluation step"),
    (dict(image_min_size=320), "go together"),
    (dict(training_batch_size=0), "training_batch_size must be at least 1"),
    (dict(evaluation_frequency=0), "evaluation_frequency must be at least 1"),
])
def test_bad_settings_are_refused_with_the_reason(change, message):
    with pytest.raises(FinetuneError, match=message):
        FinetuneSettings(**change).check()


def test_metric_for_best_model_takes_azure_and_coco_names_and_names_renamed_ones():
    for name in ("mean_average_precision", "recall", "segm_AP", "segm_AP50", "bbox_AP", "segm_AR100"):
        FinetuneSettings(metric_for_best_model=name).check()
    with pytest.raises(FinetuneError, match="mean_average_precision_50 is now called segm_AP50"):
        FinetuneSettings(metric_for_best_model="mean_average_precision_50").check()
    with pytest.raises(FinetuneError, match="got 'segm_mAP'"):
        FinetuneSettings(metric_for_best_model="segm_mAP").check()


def test_bad_data_stops_before_training_naming_the_file(fridge, tmp_path, capsys):
    bad = tmp_path / "validation.jsonl"
    text = (fridge / "validation.jsonl").read_text().replace("images/", str(fridge / "images") + "/")
    bad.write_text(re.sub(r'"label": "\w+"', '"label": "kan"', text))
    code = cli.main(["finetune", "--config", TINY, "--checkpoint", "none", "--output", str(tmp_path / "o"),
                     "--training-data", str(fridge / "train.jsonl"), "--validation-data", str(bad),
                     "--no-tracking"])
    assert code == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "kan" in err
    assert not (tmp_path / "o" / "checkpoints").exists()


def test_the_finetune_command_loads_no_training_library_until_it_trains():
    """The CLI imports the package to build its options: torch, mmengine and mlflow load only
    when finetune() runs (they take seconds)."""
    code = ("import sys; import mmdet_mlflow.training, mmdet_mlflow.commands.finetune; "
            "print([m for m in ('torch', 'mmengine', 'mmdet', 'mlflow') if m in sys.modules])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env=subprocess_env("sqlite://"))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_quick_cpu_recipe_is_a_valid_setting():
    recipe = quick_cpu_recipe(number_of_epochs=3)
    recipe.check()
    assert recipe.number_of_epochs == 3 and recipe.image_size == 256


def component_argv(component, values: dict) -> list[str]:
    """The component's command line as Azure ML builds it: ``$[[...]]`` parts only for the
    inputs given in ``values``, every ``${{inputs.x}}``/``${{outputs.x}}`` replaced by its value."""
    command = " ".join(component.command.split())

    def optional(match):
        names = re.findall(r"\$\{\{(?:inputs|outputs)\.(\w+)\}\}", match.group(1))
        return match.group(1) if all(n in values for n in names) else ""

    command = re.sub(r"\$\[\[(.*?)\]\]", optional, command)
    command = re.sub(r"\$\{\{(?:inputs|outputs)\.(\w+)\}\}", lambda m: str(values[m.group(1)]), command)
    argv = command.split()
    assert argv[:4] == ["python", "-m", "mmdet_mlflow.cli", "finetune"], argv
    return argv[3:]


def test_component_spec_loads_and_runs_the_cli_with_its_options():
    from azure.ai.ml import load_component

    component = load_component(str(ROOT / "components" / "finetune" / "spec.yaml"))
    assert component._validate().passed
    assert component.distribution.type == "pytorch"
    assert set(component.outputs) >= {"mlflow_model_folder", "pytorch_model_folder"}
    for name in ("training_data", "validation_data", "number_of_epochs", "max_steps",
                 "training_batch_size", "validation_batch_size", "learning_rate", "weight_decay",
                 "image_min_size", "image_max_size", "metric_for_best_model", "precision",
                 "accept_accuracy_drop"):
        assert name in component.inputs, name

    # Every input given, each with a value of its type: the CLI's own parser takes them all.
    values = {name: {"integer": "3", "number": "0.5"}.get(spec.type, "x")
              for name, spec in component.inputs.items()}
    values.update(precision="bf16", metric_for_best_model="segm_AP", checkpoint="official",
                  mlflow_model="m", pytorch_model="p", model_name="cfg", runtime="openvino",
                  accept_accuracy_drop="True")  # Azure passes a boolean as True/False
    values.update({name: "x" for name in component.outputs})
    argv = component_argv(component, values)
    args = cli.build_parser().parse_args(argv)
    from mmdet_mlflow.commands.finetune import settings_from_args, start_point

    settings = settings_from_args(args)
    assert settings.number_of_epochs == 3 and settings.learning_rate == 0.5
    assert settings.metric_for_best_model == "segm_AP"
    assert args.mlflow_model_folder == "x" and args.output == "x" and args.confine_images
    assert args.runtime == "openvino" and args.accept_accuracy_drop is True
    assert settings.precision == "bf16"
    assert start_point(args) == ("m", None, None)      # mlflow_model wins, as the pipeline says
    # the input's default (false) reaches the CLI as False, and the gate stays on
    values.update(accept_accuracy_drop="False")
    assert cli.build_parser().parse_args(component_argv(component, values)).accept_accuracy_drop is False


def test_component_reports_bad_data_in_one_line(fridge, tmp_path, capsys):
    """What Azure runs, with data whose image_url leaves the data folder: exit code 2 and one
    line naming the file, no traceback."""
    from azure.ai.ml import load_component

    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text((fridge / "train.jsonl").read_text().replace(
        '"images/', '"' + str(fridge / "images") + "/"))
    component = load_component(str(ROOT / "components" / "finetune" / "spec.yaml"))
    argv = component_argv(component, dict(
        model_name=TINY, checkpoint="none", training_data=data / "train.jsonl",
        validation_data=fridge / "validation.jsonl", mlflow_model_folder=tmp_path / "m",
        pytorch_model_folder=tmp_path / "p", training_state=tmp_path / "state"))
    assert cli.main(argv + ["--no-tracking"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mmdet-mlflow finetune: error: ") and "Traceback" not in err
    assert str(data / "train.jsonl") in err and "outside the data folder" in err
    assert not (tmp_path / "state" / "checkpoints").exists()
