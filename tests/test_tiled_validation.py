"""Validation of a fine-tune on tiles runs tiled inference (training.tiled_validation): real tiny
fine-tunes on large synthetic pictures, the network watched (a torch forward hook on its
backbone counts the pictures each pass carries), the predictions validation scored compared with
what the exported model answers tiled. An untiled fine-tune still validates with mmengine's own
loop, one whole picture each."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper

from helpers import TINY, TINY_OD, make_official_checkpoint
from finetune_fixtures import one_torch_thread  # noqa: F401  (fixtures: one torch thread)

ROOT = Path(__file__).resolve().parent.parent

from mmdet_mlflow.synth import CLASSES, generate
from mmdet_mlflow.training import FinetuneSettings, finetune

# 128-pixel input, 2 steps; validation 2 pictures (tiles) a pass.
# Validation runs the training network in mmdet's own form (it goes on training): the saved
# model loads in that form too where its answers are compared with validation's bit for bit.
EXACT = {"torch_exact": True}
FAST = dict(number_of_epochs=1, max_steps=2, image_size=128, training_batch_size=4,
            validation_batch_size=2, warmup_steps=1, learning_rate=1e-5)




@pytest.fixture(scope="module")
def large(tmp_path_factory) -> Path:
    """1280x960 pictures (2x2 scenes each): 2 for training, 1 for validation."""
    folder = tmp_path_factory.mktemp("large")
    generate(folder, num_images=3, seed=4, mosaic=2, progress=False)
    return folder


@pytest.fixture(scope="module")
def start(tmp_path_factory) -> Path:
    """A tiny RTMDet-Ins with the synthetic classes that finds things from its first step
    (random weights, lifted classifier biases): validation has predictions to compare."""
    return make_official_checkpoint(tmp_path_factory.mktemp("start") / "fridge.pth", classes=CLASSES)


class ValidationWatch(Hook):
    """What validation did, seen from outside the loop: the batch shape of every pass of the
    network's backbone, and the predictions handed to the metric."""

    def __init__(self):
        self.passes: list[tuple[int, ...]] = []
        self.predictions: list[dict] = []
        self.head_left_as_it_was: list[bool] = []
        self._handle = None

    @staticmethod
    def network(runner):
        return runner.model.module if is_model_wrapper(runner.model) else runner.model

    def before_val_epoch(self, runner) -> None:
        backbone = self.network(runner).backbone
        self._handle = backbone.register_forward_hook(
            lambda module, inputs, output: self.passes.append(tuple(inputs[0].shape)))

    def after_val_iter(self, runner, batch_idx, data_batch=None, outputs=None) -> None:
        for output in outputs:
            found = output["pred_instances"] if isinstance(output, dict) else output.pred_instances
            self.predictions.append(
                {key: found[key] for key in ("bboxes", "scores", "labels", "masks") if key in found})

    def after_val_epoch(self, runner, metrics=None) -> None:
        self._handle.remove()
        self.head_left_as_it_was.append("_bbox_mask_post_process" not in vars(self.network(runner).bbox_head))


def test_a_finetune_on_tiles_validates_with_tiled_inference(large, start, tmp_path, capfd, monkeypatch):
    import mlflow
    from mlflow.tracking._tracking_service import utils

    import mlflow_model
    from mmdet_mlflow.data import load_dataset
    from mmdet_mlflow.evaluate import mask_rle
    from scoring.decode import decode_image
    from scoring.tiling import segment_tiled, tiles_for

    watch = ValidationWatch()
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"  # a store of the test's own; artifacts in its cwd
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setattr(utils, "_tracking_uri", uri)
    result = finetune(large / "train.jsonl", large / "validation.jsonl", tmp_path / "run", config=TINY,
                      checkpoint=str(start), track=True, progress=True, extra_hooks=[watch],
                      settings=FinetuneSettings(tile_grid_size="2x2", tile_overlap_ratio=0.25, **FAST))
    # the model logged to the run predicts tiled as the written one does
    run = mlflow.get_run(result.mlflow_run_id)
    [model] = [m for m in mlflow.search_logged_models(experiment_ids=[run.info.experiment_id],
                                                      output_format="list")
               if m.source_run_id == run.info.run_id]
    logged = mlflow_model.ModelDir(mlflow.artifacts.download_artifacts(
        artifact_uri=model.model_uri, dst_path=str(tmp_path / "logged")))
    assert logged.data.read_info()["default_params"]["tile_grid_size"] == "2x2"
    assert [e["epoch"] for e in result.epochs] == [1] and result.best["epoch"] == 1
    assert {"mean_average_precision", "segm_AP", "bbox_AP", "recall"} <= set(result.epochs[0])
    assert watch.head_left_as_it_was == [True]
    assert re.search(r"validation: +100%.*\| 1/1 ", capfd.readouterr().err)  # its progress bar

    # The network saw the validation picture whole and as its 4 tiles, 2 a pass (batch 2):
    # 3 passes of (2, 2, 1) pictures at the 128-pixel input.
    validation = load_dataset(large / "validation.jsonl").images
    assert len(validation) == 1 and (validation[0].width, validation[0].height) == (1280, 960)
    predictor = mlflow_model.load_predictor(result.mlflow_model_dir / mlflow_model.MODEL_DATA_DIR,
                                            batch_size=2, model_config=EXACT)
    params = predictor.default_params.updated({"score_threshold": 0.05})  # the config's score_thr
    assert params.tile_grid_size == "2x2" and len(tiles_for((960, 1280), params)) == 4
    assert [shape[0] for shape in watch.passes] == [2, 2, 1]
    assert all(shape[2:] == (128, 128) for shape in watch.passes)

    # What validation scored is what the exported model (the validated weights) answers tiled.
    picture = decode_image(validation[0].path.read_bytes())
    tiled = segment_tiled(predictor, picture, params)
    [scored] = watch.predictions
    assert len(tiled) > 0 and len(scored["scores"]) == len(tiled)
    np.testing.assert_allclose(scored["bboxes"].numpy(), tiled.boxes, atol=1e-3)
    np.testing.assert_allclose(scored["scores"].numpy(), tiled.scores, atol=1e-5)
    assert scored["labels"].tolist() == tiled.labels.tolist()
    assert scored["masks"] == [mask_rle(mask) for mask in tiled.iter_masks(params.mask_threshold)]
    # and not what it answers untiled
    whole = predictor([picture], params.updated({"tile_grid_size": ""}))[0]
    assert len(whole) != len(tiled) or not np.allclose(whole.boxes, tiled.boxes, atol=1e-3)

    log = (tmp_path / "run" / "evaluation.log").read_text()
    assert f"segm ({len(tiled)} predictions)" in log


def test_an_object_detection_finetune_on_tiles_validates_its_boxes_with_tiled_inference(tmp_path):
    """Any family validates tiled through its own torch runtime (its family's, lent the network):
    an RTMDet box-only fine-tune, its validation predictions boxes alone, equal to what the
    exported object-detection model answers tiled, measured on boxes."""
    import mlflow_model
    from mmdet_mlflow.data import load_dataset
    from scoring.decode import decode_image
    from scoring.schema import OBJECT_DETECTION
    from scoring.tiling import segment_tiled

    data = tmp_path / "large"
    generate(data, num_images=3, seed=4, mosaic=2, progress=False, task=OBJECT_DETECTION)
    start = make_official_checkpoint(tmp_path / "start.pth", TINY_OD, classes=CLASSES, seed=1)
    watch = ValidationWatch()
    result = finetune(data / "train.jsonl", data / "validation.jsonl", tmp_path / "run", config=TINY_OD,
                      checkpoint=str(start), track=False, progress=False, extra_hooks=[watch],
                      settings=FinetuneSettings(tile_grid_size="2x2", tile_overlap_ratio=0.25, **FAST))
    assert [e["epoch"] for e in result.epochs] == [1]
    assert "bbox_AP" in result.epochs[0] and "segm_AP" not in result.epochs[0]
    assert [shape[0] for shape in watch.passes] == [2, 2, 1]  # the picture whole and its 4 tiles

    predictor = mlflow_model.load_predictor(result.mlflow_model_dir / mlflow_model.MODEL_DATA_DIR,
                                            batch_size=2, model_config=EXACT)
    assert predictor.task == OBJECT_DETECTION
    # at the config's score_thr (RTMDet's: 0.001), as validation scores
    params = predictor.default_params.updated({"score_threshold": predictor.configured_score_threshold})
    [validation] = load_dataset(data / "validation.jsonl").images
    tiled = segment_tiled(predictor, decode_image(validation.path.read_bytes()), params)
    [scored] = watch.predictions
    assert "masks" not in scored and len(tiled) > 0 and len(scored["scores"]) == len(tiled)
    np.testing.assert_allclose(scored["bboxes"].numpy(), tiled.boxes, atol=1e-3)
    np.testing.assert_allclose(scored["scores"].numpy(), tiled.scores, atol=1e-5)
    assert scored["labels"].tolist() == tiled.labels.tolist()
    log = (tmp_path / "run" / "evaluation.log").read_text()
    assert f"bbox ({len(tiled)} predictions)" in log and "segm (" not in log


def test_an_untiled_finetune_validates_whole_pictures_as_before(large, start, tmp_path):
    from mmdet_mlflow.training.config import build_config
    from mmdet_mlflow.training.data_prep import PreparedData

    watch = ValidationWatch()
    result = finetune(large / "train.jsonl", large / "validation.jsonl", tmp_path / "run", config=TINY,
                      checkpoint=str(start), track=False, progress=False, extra_hooks=[watch],
                      settings=FinetuneSettings(**FAST))
    assert [e["epoch"] for e in result.epochs] == [1]
    # mmengine's loop: one pass with the one validation picture, whole
    assert [shape[0] for shape in watch.passes] == [1]
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert "tile_grid_size" not in run["settings"]
    model_json = json.loads((result.pytorch_model_dir / "model.json").read_text())
    assert "tile_grid_size" not in json.dumps(model_json.get("settings", {}))
    # the config asks for mmengine's ValLoop untiled, ours with the tiling otherwise
    from mmdet_mlflow.training.start import StartingPoint

    data = PreparedData(tmp_path / "t.json", tmp_path / "v.json", list(CLASSES), 2, 1, False,
                        "instance-segmentation")
    starting = StartingPoint.from_config(TINY, "none")
    plain = build_config(starting, data, FinetuneSettings(**FAST), tmp_path / "w", "cpu")
    tiled = build_config(starting, data, FinetuneSettings(tile_grid_size="3x2", **FAST), tmp_path / "w", "cpu")
    assert plain.val_cfg == dict(type="ValLoop")
    assert tiled.val_cfg == dict(type="TiledValLoop",
                                 tiling={"tile_grid_size": "3x2", "tile_overlap_ratio": 0.25})


def test_under_torchrun_each_process_validates_its_share_tiled(start, tmp_path):
    """Two processes (DDP, gloo): each scores its half of the validation pictures with tiled
    inference (rank 0's bar counts its 1 of 2), the metric gathers both."""
    data = tmp_path / "fridge"
    generate(data, num_images=10, seed=3, progress=False)  # 8 training, 2 validation pictures
    out = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "mmdet_mlflow.cli", "finetune", "--config", TINY, "--checkpoint", str(start),
               "--training-data", str(data / "train.jsonl"),
               "--validation-data", str(data / "validation.jsonl"), "--output", str(out),
               "--max-steps", "2", "--training-batch-size", "2", "--validation-batch-size", "2",
               "--image-size", "128", "--warmup-steps", "1", "--learning-rate", "0.00001",
               "--tile-grid-size", "2x2", "--no-tracking"]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    assert re.search(r"validation: +100%.*\| 1/1 ", done.stderr), done.stderr[-4000:]
    epochs = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()
              if json.loads(line)["kind"] == "epoch"]
    assert len(epochs) == 1 and {"mean_average_precision", "segm_AP", "recall"} <= set(epochs[0])
    found = re.findall(r"segm \((\d+) predictions\)", (out / "evaluation.log").read_text())
    assert len(found) == 1 and int(found[0]) > 0
    assert json.loads((out / "pytorch_model_folder" / "model.json").read_text())["classes"] == CLASSES
