"""Fine-tune RTMDet-Ins on an instance-segmentation dataset with mmengine's Runner.

    starting point  ->  training config  ->  FinetuneRunner.train()  ->  export
    (our MLflow model,   (the model's own       (checkpoint each epoch,     (output/mlflow_model_folder,
     config+checkpoint,   recipe: AdamW, flat-   resume from the last one,   output/pytorch_model_folder,
     or from scratch)     cosine, RTMDet aug)    COCO segm mAP each epoch)   written atomically)

Hyperparameters carry the names of Azure ML's fine-tune component (``number_of_epochs``,
``training_batch_size``, ...). The output folder is also the resume state: run the same command
again after a crash and training continues from the last checkpoint (``output/checkpoints``).
Under ``torchrun --nproc_per_node N`` it trains with DDP (gloo on CPU, nccl on GPU); only rank 0
writes outputs and talks to MLflow.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

MLFLOW_MODEL_DIR = "mlflow_model_folder"
PYTORCH_MODEL_DIR = "pytorch_model_folder"
CHECKPOINT_DIR = "checkpoints"
DATA_DIR = "data"
RUN_INFO_FILE = "run.json"          # start point, classes, settings, MLflow run id (for resume)
METRICS_FILE = "metrics.json"       # per-epoch validation metrics, for people and the demo
CURVES_FILE = "training_curves.png"
HISTORY_FILE = "history.jsonl"      # per-step losses and per-epoch metrics (survives restarts)
EVALUATION_LOG_FILE = "evaluation.log"  # pycocotools' tables, per validation

# Validation metric (mmdet CocoMetric key) behind each metric_for_best_model name.
BEST_MODEL_METRICS = {
    "mean_average_precision": "coco/segm_mAP",        # mask mAP@[.5:.95], COCO's headline
    "mean_average_precision_50": "coco/segm_mAP_50",
    "mean_average_precision_75": "coco/segm_mAP_75",
    "recall": "coco/segm_AR@100",                     # mask AR, 100 detections per image
    "bbox_mean_average_precision": "coco/bbox_mAP",
}
_COCO_METRIC_ITEMS = ("mAP", "mAP_50", "mAP_75", "mAP_s", "mAP_m", "mAP_l", "AR@100")


class FinetuneError(ValueError):
    """Bad fine-tune settings or starting point (the CLI prints it without a traceback)."""


@dataclass
class FinetuneSettings:
    """Hyperparameters, named as Azure ML's fine-tune component names them."""

    number_of_epochs: int = 15
    max_steps: int | None = None             # stop after this many steps (overrides epochs)
    training_batch_size: int = 8             # per process
    validation_batch_size: int = 8
    learning_rate: float = 0.001             # AdamW, after warm-up; flat, then cosine
    weight_decay: float = 0.05
    warmup_steps: int | None = None          # default: a tenth of training, at most 1000
    gradient_accumulation_step: int = 1
    image_size: int = 640                    # square training/inference size (RTMDet: 640)
    image_min_size: int | None = None        # with image_max_size: a (max x min) input instead
    image_max_size: int | None = None
    metric_for_best_model: str = "mean_average_precision"
    precision: str = "32"                    # "16": mixed precision (AMP) on GPU
    checkpoint_interval_steps: int | None = None  # also checkpoint every N steps
    num_workers: int | None = None           # data-loading processes (default: 0 on CPU, 2 on GPU)
    strong_augmentation: bool = True         # RTMDet's mosaic + mixup (off: its stage-2 pipeline throughout)
    seed: int = 0

    def check(self) -> None:
        problems = []
        for name in ("number_of_epochs", "training_batch_size", "validation_batch_size",
                     "image_size", "gradient_accumulation_step"):
            if int(getattr(self, name)) < 1:
                problems.append(f"{name} must be at least 1 (got {getattr(self, name)})")
        for name in ("max_steps", "checkpoint_interval_steps", "image_min_size", "image_max_size"):
            value = getattr(self, name)
            if value is not None and int(value) < 1:
                problems.append(f"{name} must be at least 1 (got {value})")
        if not self.learning_rate > 0:
            problems.append(f"learning_rate must be positive (got {self.learning_rate})")
        if self.weight_decay < 0:
            problems.append(f"weight_decay must not be negative (got {self.weight_decay})")
        for name in ("image_size", "image_min_size", "image_max_size"):
            value = getattr(self, name)
            if value is not None and int(value) % 32:
                problems.append(f"{name} must be a multiple of 32, RTMDet's largest stride (got {value})")
        if (self.image_min_size is None) != (self.image_max_size is None):
            problems.append("image_min_size and image_max_size go together")
        elif self.image_min_size and self.image_min_size > self.image_max_size:
            problems.append("image_min_size is larger than image_max_size")
        if str(self.precision) not in ("32", "16"):
            problems.append(f"precision must be 32 or 16 (got {self.precision})")
        if self.metric_for_best_model not in BEST_MODEL_METRICS:
            hint = (" (validation reports COCO average precision and recall; precision at a "
                    "score threshold is the evaluation step's job)"
                    if self.metric_for_best_model == "precision" else "")
            problems.append(f"metric_for_best_model must be one of "
                            f"{', '.join(BEST_MODEL_METRICS)}{hint} (got {self.metric_for_best_model!r})")
        if problems:
            raise FinetuneError("; ".join(problems))

    def input_size(self) -> tuple[int, int]:
        """(width, height) of the network input, mmdet's (w, h) scale convention."""
        if self.image_max_size:
            return int(self.image_max_size), int(self.image_min_size)
        return int(self.image_size), int(self.image_size)

    def as_params(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


# The recipe the offline demo uses: the tiny model trained from scratch on a few hundred
# synthetic images on 2 CPU cores within 10 minutes (bench/finetune.py part b measures it: 240
# training images, 360 steps, mask mAP@[.5:.95] about 0.5 on the 60 validation images). From
# scratch there is no pretrained feature to protect, so a high learning rate and a short warm-up;
# 256 px (the synthetic objects are large) and RTMDet's stage-2 augmentation (no mosaic) keep a
# step near a second on 2 cores and let the model see every object whole.
QUICK_CPU_CONFIG = "rtmdet-ins_tiny_8xb32-300e_coco"


def quick_cpu_recipe(**overrides) -> FinetuneSettings:
    """Settings for the tiny model from scratch on CPU within ~10 minutes (the demo recipe)."""
    recipe = dict(number_of_epochs=12, training_batch_size=8, validation_batch_size=8,
                  learning_rate=0.004, weight_decay=0.05, warmup_steps=30, image_size=256,
                  strong_augmentation=False, num_workers=0)
    recipe.update(overrides)
    return FinetuneSettings(**recipe)


# ------------------------------------------------------------------------------------------
# Where training starts


@dataclass
class StartingPoint:
    """A config and (unless training from scratch) weights with the classes they were trained
    for (None when the checkpoint does not say)."""

    config_source: str                   # config name or path, or the MLflow model folder
    config_path: Path
    weights: dict | None
    weight_classes: list[str] | None
    description: str

    @classmethod
    def from_model_folder(cls, folder) -> "StartingPoint":
        """An MLflow model we saved (``model/config.py`` + ``model/weights.pth``) or a
        ``pytorch_model_folder`` from an earlier fine-tune (``config.py`` + ``weights.pth``)."""
        from mlflow_model import CONFIG_FILE, MODEL_DATA_DIR, MODEL_INFO_FILE, WEIGHTS_FILE
        from mlflow_model.checkpoints import read_state_dict

        folder = Path(folder).expanduser()
        for data_dir, kind in ((folder / MODEL_DATA_DIR, "MLflow model"), (folder, "PyTorch model folder")):
            if (data_dir / CONFIG_FILE).is_file() and (data_dir / WEIGHTS_FILE).is_file():
                break
        else:
            raise FinetuneError(f"{folder} is neither an MLflow model saved by mmdet-mlflow "
                                f"({MODEL_DATA_DIR}/{CONFIG_FILE} + {MODEL_DATA_DIR}/{WEIGHTS_FILE}) "
                                f"nor a pytorch_model_folder ({CONFIG_FILE} + {WEIGHTS_FILE})")
        info_path = data_dir / MODEL_INFO_FILE
        classes = json.loads(info_path.read_text()).get("classes") if info_path.is_file() else None
        weights, _ = read_state_dict(data_dir / WEIGHTS_FILE)
        return cls(str(folder), (data_dir / CONFIG_FILE).resolve(), weights,
                   list(classes) if classes else None, f"the {kind} {folder}")

    @classmethod
    def from_config(cls, config, checkpoint: str | None) -> "StartingPoint":
        from mlflow_model.checkpoints import classes_from_meta, read_state_dict, resolve_checkpoint
        from mlflow_model.configs import config_name, resolve_config_path

        config_path = resolve_config_path(config)
        if checkpoint is None or str(checkpoint).lower() == "none":
            return cls(str(config), config_path, None, None,
                       f"{config_name(config)} from scratch (random initialisation)")
        path, source = resolve_checkpoint(checkpoint, config_name(config))
        weights, meta = read_state_dict(path)
        return cls(str(config), config_path, weights, classes_from_meta(meta),
                   f"{config_name(config)} with checkpoint {checkpoint} (sha256 {source.sha256[:12]})")


def adapt_weights(model, weights: dict, weight_classes: Sequence[str] | None,
                  classes: Sequence[str]) -> tuple[dict, list[str]]:
    """The starting weights for ``model`` (already initialised) set up for ``classes``: the
    classifier (``rtm_cls``) rows of classes the checkpoint knows by name are kept, the others
    keep the model's fresh initialisation; every other tensor must fit exactly. Returns the
    state dict to load strictly and what was re-initialised, in words."""
    from mlflow_model.checkpoints import check_state_dict

    own = model.state_dict()
    classifier = [k for k in own if ".rtm_cls." in f".{k}"]
    check_state_dict(_Keys({k: v for k, v in own.items() if k not in classifier}),
                     {k: v for k, v in weights.items() if ".rtm_cls." not in f".{k}"},
                     "(everything but the classifier)")
    adapted = {k: weights[k] for k in own if k not in classifier}
    fits = all(k in weights and weights[k].shape == own[k].shape for k in classifier)
    if fits and (weight_classes is None or list(weight_classes) == list(classes)):
        adapted.update({k: weights[k] for k in classifier})
        return adapted, [] if weight_classes else [
            "the checkpoint names no classes: its classifier is used as is, in the data's class order"]

    row_of = {name: i for i, name in enumerate(weight_classes or [])}
    kept = []
    for key in classifier:
        old, new = weights.get(key), own[key].clone()
        if old is not None and old.shape[1:] == new.shape[1:] and old.shape[0] == len(row_of):
            kept = [name for name in classes if name in row_of]
            for name in kept:
                new[classes.index(name)] = old[row_of[name]]
        adapted[key] = new
    fresh = [name for name in classes if name not in kept]
    note = f"classifier re-initialised for {len(fresh)} new classes ({', '.join(fresh) or 'none'})"
    if kept:
        note += f", kept for {', '.join(kept)}"
    if len(row_of) > len(kept):
        note += f"; the checkpoint's other {len(row_of) - len(kept)} classes are dropped"
    return adapted, [note]


class _Keys:
    """Just enough of a module for check_state_dict (a state dict to compare against)."""

    def __init__(self, state_dict):
        self._state_dict = state_dict

    def state_dict(self):
        return self._state_dict


# ------------------------------------------------------------------------------------------
# The training config


@dataclass
class PreparedData:
    """Training/validation sets converted once to COCO JSON (what mmdet's CocoDataset and
    CocoMetric read), with the class order the model is trained for."""

    train_coco: Path
    val_coco: Path
    classes: list[str]
    train_images: int                     # images with at least one object (mmdet keeps only those)
    val_images: int
    has_rle: bool                         # COCO RLE masks: decoded to bitmaps, not polygons


def prepare_data(training_data, validation_data, folder: Path | None, validate: bool = True) -> PreparedData:
    """Read and validate both sets (AutoML JSONL, MLTable or COCO), write them as COCO JSON into
    ``folder`` (None: they are COCO files already, use them as they are). The validation set
    must use the training set's labels."""
    from mmdet_mlflow.data import load_dataset

    train = load_dataset(training_data, validate=validate)
    val = load_dataset(validation_data, classes=train.classes, validate=validate)
    if not any(record.instances for record in train.images):
        raise FinetuneError(f"{training_data} has no labelled objects to train on")
    has_rle = any(inst.rle is not None for ds in (train, val) for r in ds.images for inst in r.instances)
    if folder is None:
        train_coco, val_coco = Path(training_data).absolute(), Path(validation_data).absolute()
    else:
        train_coco = _write_coco_for_mmdet(train, Path(folder) / "train.coco.json")
        val_coco = _write_coco_for_mmdet(val, Path(folder) / "validation.coco.json")
    return PreparedData(train_coco, val_coco, list(train.classes),
                        sum(1 for r in train.images if any(not i.iscrowd for i in r.instances)),
                        len(val.images), has_rle)


def _write_coco_for_mmdet(dataset, path: Path) -> Path:
    """data.to_coco's dict, with absolute image paths, for mmdet's CocoDataset and CocoMetric."""
    from mmdet_mlflow.data import to_coco

    _write_json(path, to_coco(dataset))
    return path


def _scaled_pipeline(pipeline, size: tuple[int, int], poly2mask: bool) -> list:
    """RTMDet's pipeline at another input size: 640 -> size, 1280 -> 2 x size (mmdet's (w, h))."""
    w, h = size
    steps = []
    for step in pipeline:
        step = dict(step)
        kind = step["type"]
        if kind == "LoadAnnotations" and "with_mask" in step:
            step["poly2mask"] = poly2mask
        for key in ("img_scale", "scale", "crop_size", "size"):
            value = step.get(key)
            if isinstance(value, (tuple, list)) and len(value) == 2:
                step[key] = (w, h) if tuple(value) == (640, 640) else \
                    (2 * w, 2 * h) if tuple(value) == (1280, 1280) else tuple(value)
        steps.append(step)
    return steps


def schedule(total_steps: int, learning_rate: float, warmup_steps: int | None) -> list[dict]:
    """RTMDet's schedule in steps: linear warm-up, flat, then cosine down to 5 % over the
    second half (the card's "flat cosine")."""
    warmup = warmup_steps if warmup_steps is not None else min(1000, max(1, total_steps // 10))
    warmup = max(1, min(warmup, total_steps))
    half = max(warmup, total_steps // 2)
    stages = [dict(type="LinearLR", start_factor=1.0e-5 if warmup > 1 else 1.0,
                   by_epoch=False, begin=0, end=warmup)]
    if total_steps > half:
        stages.append(dict(type="CosineAnnealingLR", eta_min=learning_rate * 0.05, by_epoch=False,
                           begin=half, end=total_steps, T_max=total_steps - half))
    return stages


def steps_per_epoch(images: int, batch_size: int, world_size: int) -> int:
    """What mmengine's DefaultSampler + DataLoader give each process (drop_last off)."""
    return max(1, math.ceil(math.ceil(images / world_size) / batch_size))


def build_config(start: StartingPoint, data: PreparedData, settings: FinetuneSettings,
                 work_dir: Path, device: str, world_size: int = 1):
    """The mmengine Config that trains ``start`` on ``data`` with ``settings``: the model's
    own recipe (AdamW, flat-cosine, EMA, RTMDet augmentation, pipeline switch for the last
    epochs) scaled to the dataset, the input size and the step budget."""
    from mlflow_model.configs import load_config

    settings.check()
    cfg = load_config(start.config_path, num_classes=len(data.classes))
    size = settings.input_size()
    per_epoch = steps_per_epoch(data.train_images, settings.training_batch_size, world_size)
    epochs = int(settings.number_of_epochs)
    if settings.max_steps:
        epochs = min(epochs, math.ceil(settings.max_steps / per_epoch))
    total_steps = min(epochs * per_epoch, settings.max_steps or epochs * per_epoch)
    workers = settings.num_workers if settings.num_workers is not None else (2 if device == "cuda" else 0)
    metainfo = dict(classes=tuple(data.classes))
    poly2mask = data.has_rle

    # RTMDet trains with mosaic + mixup, then switches to a milder stage-2 pipeline (no mosaic,
    # a balanced zoom) for its last epochs; without strong augmentation, stage 2 throughout.
    stage2 = cfg.get("train_pipeline_stage2")
    stage2_pipeline = _scaled_pipeline(stage2, size, poly2mask) if stage2 else None
    train_pipeline = _scaled_pipeline(cfg.train_pipeline, size, poly2mask)
    if not settings.strong_augmentation and stage2_pipeline is not None:
        train_pipeline, stage2_pipeline = stage2_pipeline, None
    test_pipeline = _scaled_pipeline(cfg.test_pipeline, size, poly2mask)
    if size[0] != size[1]:
        # Resizing to fit max x min keeps portrait images portrait: pad each to a multiple of
        # the stride instead of to a landscape canvas it may not fit.
        for step in test_pipeline:
            if step["type"] == "Pad":
                step.pop("size", None)
                step["size_divisor"] = 32

    def loader(coco: Path, pipeline, batch, shuffle, test_mode):
        dataset = dict(type="CocoDataset", metainfo=metainfo, data_root="",
                       ann_file=str(coco), data_prefix=dict(img=str(coco.parent) + os.sep),
                       pipeline=pipeline, test_mode=test_mode, backend_args=None)
        if not test_mode:
            dataset["filter_cfg"] = dict(filter_empty_gt=True, min_size=1)
        return dict(batch_size=batch, num_workers=workers, persistent_workers=False,
                    pin_memory=device == "cuda", drop_last=False,
                    sampler=dict(type="DefaultSampler", shuffle=shuffle), batch_sampler=None,
                    dataset=dataset)

    cfg.train_pipeline = train_pipeline
    cfg.test_pipeline = test_pipeline
    cfg.train_dataloader = loader(data.train_coco, train_pipeline, settings.training_batch_size, True, False)
    cfg.val_dataloader = loader(data.val_coco, test_pipeline, settings.validation_batch_size, False, True)
    cfg.test_dataloader = cfg.val_dataloader
    cfg.val_evaluator = dict(type="CocoMetric", ann_file=str(data.val_coco), metric=["bbox", "segm"],
                             proposal_nums=(100, 1, 10), metric_items=list(_COCO_METRIC_ITEMS),
                             format_only=False, backend_args=None)
    cfg.test_evaluator = cfg.val_evaluator

    cfg.train_cfg = dict(type="StepLimitedEpochTrainLoop", max_epochs=epochs,
                         max_steps=settings.max_steps, val_interval=1)
    cfg.val_cfg = dict(type="ValLoop")
    cfg.test_cfg = dict(type="TestLoop")
    amp = str(settings.precision) == "16" and device == "cuda"
    cfg.optim_wrapper = dict(
        type="AmpOptimWrapper" if amp else "OptimWrapper",
        optimizer=dict(type="AdamW", lr=settings.learning_rate, weight_decay=settings.weight_decay),
        paramwise_cfg=dict(norm_decay_mult=0, bias_decay_mult=0, bypass_duplicate=True),
        accumulative_counts=int(settings.gradient_accumulation_step))
    if amp:
        cfg.optim_wrapper["loss_scale"] = "dynamic"
    cfg.param_scheduler = schedule(total_steps, settings.learning_rate, settings.warmup_steps)
    cfg.auto_scale_lr = dict(enable=False, base_batch_size=settings.training_batch_size)

    best_key = BEST_MODEL_METRICS[settings.metric_for_best_model]
    cfg.default_hooks = dict(
        timer=dict(type="IterTimerHook"),
        logger=dict(type="LoggerHook", interval=max(1, min(50, per_epoch))),
        param_scheduler=dict(type="ParamSchedulerHook"),
        # max_keep_ckpts=2: mmengine deletes the oldest before writing the next, so a crash
        # while writing still leaves a complete one to resume from.
        checkpoint=dict(type="CheckpointHook", interval=1, by_epoch=True, max_keep_ckpts=2,
                        save_last=True, save_best=best_key, rule="greater"),
        sampler_seed=dict(type="DistSamplerSeedHook"),
        visualization=dict(type="DetVisualizationHook", draw=False))
    hooks = [dict(type="EMAHook", ema_type="ExpMomentumEMA", momentum=0.0002,
                  update_buffers=True, priority=49)]
    if stage2_pipeline is not None:
        # The config switches to the stage-2 pipeline for its last 20 of 300 epochs.
        hooks.append(dict(type="PipelineSwitchHook", switch_pipeline=stage2_pipeline,
                          switch_epoch=max(0, epochs - max(1, round(epochs * 20 / 300)))))
    if settings.checkpoint_interval_steps:
        hooks.append(dict(type="CheckpointHook", interval=int(settings.checkpoint_interval_steps),
                          by_epoch=False, max_keep_ckpts=2, save_last=False))
    cfg.custom_hooks = hooks

    if device == "cpu":
        # SyncBN needs CUDA: plain BatchNorm per process (DDP on CPU: gloo, no SyncBN), and
        # mmdet's RTMDet would convert every BatchNorm to SyncBN when distributed.
        _replace_type(cfg.model, "SyncBN", "BN")
        cfg.model.use_syncbn = False
    cfg.env_cfg = dict(cudnn_benchmark=False,
                       mp_cfg=dict(mp_start_method="fork", opencv_num_threads=0),
                       dist_cfg=dict(backend="nccl" if device == "cuda" else "gloo"))
    cfg.randomness = dict(seed=settings.seed)
    cfg.work_dir = str(work_dir)
    cfg.launcher = "pytorch" if world_size > 1 else "none"
    if world_size > 1 and device == "cpu":
        # mmengine passes device_ids=[LOCAL_RANK], which DDP refuses for CPU modules.
        cfg.model_wrapper_cfg = dict(type="MMDistributedDataParallel", device_ids=None,
                                     broadcast_buffers=False, find_unused_parameters=False)
    cfg.log_level = "WARNING"
    cfg.load_from = None
    cfg.resume = False
    cfg.visualizer = dict(type="DetLocalVisualizer", vis_backends=[dict(type="LocalVisBackend")],
                          name="visualizer")
    cfg.log_processor = dict(type="LogProcessor", window_size=50, by_epoch=True)
    for unused in ("tta_model", "tta_pipeline", "img_scales", "data_root", "dataset_type",
                   "train_pipeline_stage2", "checkpoint"):
        cfg.pop(unused, None)
    return cfg


def _replace_type(node, old: str, new: str) -> None:
    if isinstance(node, dict):
        if node.get("type") == old:
            node["type"] = new
        for value in node.values():
            _replace_type(value, old, new)
    elif isinstance(node, (list, tuple)):
        for value in node:
            _replace_type(value, old, new)


# ------------------------------------------------------------------------------------------
# Training


def load_training_checkpoint(path: Path) -> dict:
    """One of our training checkpoints: plain tensors and containers only (see
    finetune_runtime.PlainResumeStateHook), so weights_only=True reads it as it is."""
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)


def latest_checkpoint(work_dir: Path) -> Path | None:
    """The checkpoint to resume from: the one mmengine's ``last_checkpoint`` names, unless that
    is missing or truncated (killed while writing), then the newest complete one."""
    if not work_dir.is_dir():
        return None
    named = None
    pointer = work_dir / "last_checkpoint"
    if pointer.is_file():
        text = pointer.read_text().strip()
        named = Path(text) if text else None
    candidates = sorted((p for p in work_dir.glob("*.pth") if not p.name.startswith("best_")),
                        key=lambda p: p.stat().st_mtime, reverse=True)
    if named is not None and named.is_file():
        candidates.insert(0, named)
    for path in candidates:
        if zipfile.is_zipfile(path):  # torch.save's zip: truncated files lack the central directory
            return path
    return None


@dataclass
class FinetuneResult:
    output_dir: Path
    mlflow_model_dir: Path | None
    pytorch_model_dir: Path | None
    classes: list[str]
    epochs: list[dict] = field(default_factory=list)  # per-epoch validation metrics
    best: dict | None = None                          # the epoch whose weights were exported
    resumed_from: str | None = None
    steps: int = 0
    seconds_per_step: float | None = None             # mean step time (mmengine's timer), first 2 left out
    mlflow_run_id: str | None = None
    notes: list[str] = field(default_factory=list)


@dataclass
class _Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _distributed(device: str) -> _Dist:
    """torchrun's environment; the process group is set up here (mmengine's own setup calls
    torch.cuda.set_device, which a CPU-only torch does not have)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist()
    import torch
    import torch.distributed as dist

    dist_info = _Dist(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        if device == "cuda":
            torch.cuda.set_device(dist_info.local_rank)
        dist.init_process_group(backend="nccl" if device == "cuda" else "gloo")
    return dist_info


def finetune(training_data, validation_data, output_dir, *, model=None, config=None,
             checkpoint=None, settings: FinetuneSettings | None = None,
             mlflow_model_dir=None, pytorch_model_dir=None, device: str | None = None,
             track: bool = True, progress: bool = True, validate_data: bool = True,
             extra_hooks: Sequence = ()) -> FinetuneResult:
    """Fine-tune and export. Start from ``model`` (an MLflow model folder we saved, or a
    pytorch_model_folder) or ``config`` + ``checkpoint`` (path, URL, ``official``, or
    None/``"none"``: from scratch).
    ``output_dir`` holds checkpoints and, by default, the two model folders; running again with
    the same ``output_dir`` resumes. ``mlflow_model_dir``/``pytorch_model_dir`` put the model
    folders elsewhere (Azure ML outputs). ``extra_hooks``: mmengine Hook objects to add (every
    rank)."""
    import torch

    from mmdet_mlflow import finetune_tracking as tracking
    from mmdet_mlflow.finetune_runtime import FinetuneRunner

    settings = settings or FinetuneSettings()
    settings.check()
    if (model is None) == (config is None):
        raise FinetuneError("start from --model (an MLflow model folder) or --config with "
                            "--checkpoint (a path, URL, 'official' or 'none'), not both or neither")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    notes = []
    if str(settings.precision) == "16" and device != "cuda":
        notes.append("precision 16 (AMP) needs a GPU: training in 32-bit on CPU")
    output_dir = Path(output_dir).expanduser().absolute()
    work_dir = output_dir / CHECKPOINT_DIR
    dist = _distributed(device)

    def load_inputs(main: bool):
        start = StartingPoint.from_model_folder(model) if model is not None else \
            StartingPoint.from_config(config, checkpoint)
        if main:
            return start, prepare_data(training_data, validation_data, output_dir / DATA_DIR, validate_data)
        # Other ranks read the COCO files rank 0 wrote (validated there) and write nothing.
        return start, prepare_data(output_dir / DATA_DIR / "train.coco.json",
                                   output_dir / DATA_DIR / "validation.coco.json", None, validate=False)

    start, data = _main_first(dist, load_inputs)
    cfg = build_config(start, data, settings, work_dir, device, dist.world_size)
    resume_from = latest_checkpoint(work_dir)
    run_info = _run_info(output_dir)
    if resume_from is not None:
        if run_info.get("classes") and run_info["classes"] != data.classes:
            raise FinetuneError(f"{output_dir} holds a training run for classes {run_info['classes']}, "
                                f"but the data has {data.classes}: use another --output")
        cfg.resume, cfg.load_from = True, str(resume_from)

    runner = FinetuneRunner.from_cfg(cfg)
    for hook in extra_hooks:
        runner.register_hook(hook)
    runner.classes = data.classes
    if resume_from is None:
        runner.start = start
    else:  # mmengine checkpoints an epoch before validating it: validate it now
        runner.validate_resumed_epoch = resume_from.name.startswith("epoch_")

    result = FinetuneResult(output_dir, None, None, data.classes, notes=notes,
                            resumed_from=str(resume_from) if resume_from else None)
    if not dist.is_main:
        _train(runner)
        return result

    for note in notes:
        print(f"finetune: {note}", file=sys.stderr)
    run_info.update(start=start.description, classes=data.classes, settings=settings.as_params(),
                    world_size=dist.world_size, device=device)
    with tracking.TrainingRun(output_dir, run_info, enabled=track) as run:
        run_info["mlflow_run_id"] = run.run_id
        _write_json(output_dir / RUN_INFO_FILE, run_info)
        if resume_from is None:
            run.log_params(settings, start, data, dist.world_size, device)
        hook = tracking.TrainingMonitorHook(run, output_dir, settings.metric_for_best_model,
                                            BEST_MODEL_METRICS, progress=progress,
                                            resumed=resume_from is not None)
        runner.register_hook(hook, priority="VERY_LOW")
        try:
            _train(runner)
        finally:
            hook.close()
        result.notes += runner.start_notes
        result.epochs, result.steps = hook.epochs, runner.iter
        result.seconds_per_step = hook.mean_step_seconds()
        result.mlflow_run_id = run.run_id
        best_path, result.best = _best_checkpoint(runner, hook.epochs, settings)
        weights = load_training_checkpoint(best_path)["state_dict"]
        result.pytorch_model_dir, result.mlflow_model_dir = export_models(
            cfg, weights, data.classes, Path(pytorch_model_dir or output_dir / PYTORCH_MODEL_DIR),
            Path(mlflow_model_dir or output_dir / MLFLOW_MODEL_DIR),
            info=dict(start=start.description, best=result.best, settings=settings.as_params()))
        _write_json(output_dir / METRICS_FILE, dict(epochs=result.epochs, best=result.best,
                                                    metric_for_best_model=settings.metric_for_best_model))
        with _without_known_warnings():
            run.finish(result)
    return result


@contextlib.contextmanager
def _without_known_warnings():
    """Without the deprecation warnings mmdet 3.3's own code raises on every run (nothing a
    user can act on)."""
    import warnings

    with warnings.catch_warnings():
        for message in (r".*torch\.cuda\.amp\.autocast", r"torch\.meshgrid"):
            warnings.filterwarnings("ignore", message=message)
        yield


def _train(runner) -> None:
    with _without_known_warnings():
        runner.train()


def _best_checkpoint(runner, epochs: list[dict], settings: FinetuneSettings) -> tuple[Path, dict | None]:
    """The checkpoint with the best validation score (mmengine's save_best), else the last."""
    best = runner.message_hub.get_info("best_ckpt")
    key = settings.metric_for_best_model
    scored = [e for e in epochs if e.get(key) is not None]
    best_epoch = max(scored, key=lambda e: e[key]) if scored else None
    if best and Path(best).is_file():
        return Path(best), best_epoch
    last = latest_checkpoint(Path(runner.work_dir))
    if last is None:
        raise FinetuneError(f"training wrote no checkpoint under {runner.work_dir}")
    return last, epochs[-1] if epochs else None


def export_models(cfg, weights: dict, classes: list[str], pytorch_dir: Path, mlflow_dir: Path,
                  info: dict | None = None) -> tuple[Path, Path]:
    """Write ``pytorch_dir`` (config.py, weights.pth as plain tensors, model.json) and
    ``mlflow_dir`` (our MLflow flavor), each atomically: built aside, then moved in place."""
    import mlflow_model
    from mlflow_model.checkpoints import write_weights

    weights = {k.removeprefix("module."): v for k, v in weights.items()}
    with publishing(pytorch_dir) as tmp:
        cfg.dump(str(tmp / "config.py"))
        write_weights(weights, tmp / "weights.pth")
        _write_json(tmp / "model.json", dict(classes=classes, **(info or {})))
    with publishing(mlflow_dir) as tmp:
        tmp.rmdir()  # save_model creates the folder itself
        mlflow_model.save_model(tmp, str(pytorch_dir / "config.py"), str(pytorch_dir / "weights.pth"),
                                classes=classes)
    return pytorch_dir, mlflow_dir


@contextlib.contextmanager
def publishing(target: Path):
    """Build a folder aside and move it to ``target`` only when complete: never half-written.
    An existing ``target`` is replaced; an existing empty one (an Azure ML output mount) is
    filled entry by entry from a staging folder inside it."""
    target = Path(target)
    in_place = target.is_dir() and not any(target.iterdir())
    parent = target if in_place else target.parent
    parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=parent, prefix=f".{target.name}.partial-"))
    try:
        yield staging
        if in_place:
            for entry in staging.iterdir():
                os.replace(entry, target / entry.name)
            staging.rmdir()
        else:
            old = None
            if target.exists():
                old = target.with_name(f".{target.name}.old-{os.getpid()}")
                os.replace(target, old)
            os.replace(staging, target)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _main_first(dist: _Dist, work):
    """``work(main=True)`` on rank 0 (downloads, validation, files), then ``work(main=False)``
    on the others; a failure on rank 0 stops them all with its message instead of a hang."""
    if dist.world_size == 1:
        return work(True)
    import torch.distributed

    failure, value = [None], None
    if dist.is_main:
        try:
            value = work(True)
        except Exception as err:
            failure = [f"{type(err).__name__}: {err}"]
            torch.distributed.broadcast_object_list(failure, src=0)
            raise
    torch.distributed.broadcast_object_list(failure, src=0)
    if failure[0] is not None:
        raise FinetuneError(f"rank 0 failed: {failure[0]}")
    return value if dist.is_main else work(False)


def _run_info(output_dir: Path) -> dict:
    path = output_dir / RUN_INFO_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def _write_json(path: Path, value) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(value, f, indent=2, default=str)
    os.replace(tmp, path)
