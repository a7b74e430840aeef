"""The mmengine config that trains a starting point on prepared data: the model's own recipe
(AdamW, flat-cosine, EMA, RTMDet augmentation, pipeline switch for the last epochs) scaled to the
dataset, the input size and the step budget, validated each epoch by ``ValidationMetric``."""
from __future__ import annotations

import math
import os
from pathlib import Path

from mlflow_model.configs import load_config
from mmdet_mlflow.metrics import AZURE_BOX_SCORE_THRESHOLD, AZURE_IOU_THRESHOLD
from mmdet_mlflow.training.data_prep import PreparedData
from mmdet_mlflow.training.precision import register_optim_wrapper, training_precision
from mmdet_mlflow.training.settings import FinetuneSettings
from mmdet_mlflow.training.start import StartingPoint
from scoring.families import family_of_config

# mmengine prefixes the validation metric's names with this (training.validation).
VALIDATION_PREFIX = "validation"


def validation_key(metric: str) -> str:
    """mmengine's key for one of our validation metric names (docs/metrics.md)."""
    return f"{VALIDATION_PREFIX}/{metric}"


def _scaled_pipeline(pipeline, size: tuple[int, int], poly2mask: bool, pipeline_size: int) -> list:
    """A config's pipeline at another input size: every (pipeline_size, pipeline_size) -> size,
    every 2 x pipeline_size square (RTMDet's mosaic canvas) -> 2 x size (mmdet's (w, h))."""
    w, h = size
    native, double = (pipeline_size, pipeline_size), (2 * pipeline_size, 2 * pipeline_size)
    steps = []
    for step in pipeline:
        step = dict(step)
        kind = step["type"]
        if kind == "LoadAnnotations" and "with_mask" in step:
            step["poly2mask"] = poly2mask
        for key in ("img_scale", "scale", "crop_size", "size"):
            value = step.get(key)
            if isinstance(value, (tuple, list)) and len(value) == 2:
                step[key] = (w, h) if tuple(value) == native else \
                    (2 * w, 2 * h) if tuple(value) == double else tuple(value)
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
    settings.check()
    cfg = load_config(start.config_path, num_classes=len(data.classes))
    native = family_of_config(cfg.model).pipeline_size
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
    stage2_pipeline = _scaled_pipeline(stage2, size, poly2mask, native) if stage2 else None
    train_pipeline = _scaled_pipeline(cfg.train_pipeline, size, poly2mask, native)
    if not settings.strong_augmentation and stage2_pipeline is not None:
        train_pipeline, stage2_pipeline = stage2_pipeline, None
    test_pipeline = _scaled_pipeline(cfg.test_pipeline, size, poly2mask, native)
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
    cfg.val_evaluator = dict(type="ValidationMetric", ann_file=str(data.val_coco),
                             prefix=VALIDATION_PREFIX, iou_threshold=AZURE_IOU_THRESHOLD,
                             box_score_threshold=AZURE_BOX_SCORE_THRESHOLD)
    cfg.test_evaluator = cfg.val_evaluator

    cfg.train_cfg = dict(type="StepLimitedEpochTrainLoop", max_epochs=epochs,
                         max_steps=settings.max_steps, val_interval=int(settings.evaluation_frequency))
    tiling = settings.inference_tiling()
    # A fine-tune on tiles is validated as its model will answer: tiled (training.tiled_validation).
    cfg.val_cfg = dict(type="TiledValLoop", tiling=tiling) if tiling else dict(type="ValLoop")
    cfg.test_cfg = dict(type="TestLoop")
    # What training computes in ("32", "16" or "bf16": training_precision decides, "auto" included).
    precision, _ = training_precision(settings.precision, device)
    amp = precision == "16"
    if precision == "bf16":
        register_optim_wrapper()
    cfg.optim_wrapper = dict(
        type="AmpOptimWrapper" if amp else "CpuBf16OptimWrapper" if precision == "bf16" else "OptimWrapper",
        optimizer=dict(type="AdamW", lr=settings.learning_rate, weight_decay=settings.weight_decay),
        paramwise_cfg=dict(norm_decay_mult=0, bias_decay_mult=0, bypass_duplicate=True),
        accumulative_counts=int(settings.gradient_accumulation_step))
    if amp:
        cfg.optim_wrapper["loss_scale"] = "dynamic"
    cfg.param_scheduler = schedule(total_steps, settings.learning_rate, settings.warmup_steps)
    cfg.auto_scale_lr = dict(enable=False, base_batch_size=settings.training_batch_size)

    best_key = validation_key(settings.metric_for_best_model)
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
