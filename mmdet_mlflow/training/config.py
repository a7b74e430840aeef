"""The mmengine config that trains a starting point on prepared data: the model's own recipe (its
config's optimizer, schedule, pipelines and hooks: RTMDet's AdamW, flat-cosine, EMA and pipeline
switch for the last epochs, Mask R-CNN's SGD and step decay, ...) scaled to the dataset, the input
size and the step budget, at the fine-tune's learning rate (the family's, ``Family.training``,
unless the settings name one), validated each epoch by ``ValidationMetric``; an object-detection
model trains on boxes alone."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from mlflow_model.configs import load_config
from mmdet_mlflow.metrics import AZURE_BOX_SCORE_THRESHOLD, AZURE_IOU_THRESHOLD
from mmdet_mlflow.training.data_prep import PreparedData
from mmdet_mlflow.training.precision import register_optim_wrapper, training_precision
from mmdet_mlflow.training.settings import FinetuneError, FinetuneSettings
from mmdet_mlflow.training.start import StartingPoint
from scoring.families import Family, family_of_config
from scoring.schema import INSTANCE_SEGMENTATION

# The keys of pipeline steps that hold a (w, h) size, or a list of them.
SIZE_KEYS = ("img_scale", "scale", "crop_size", "size", "scales")

# mmengine prefixes the validation metric's names with this (training.validation).
VALIDATION_PREFIX = "validation"


def validation_key(metric: str) -> str:
    """mmengine's key for one of our validation metric names (docs/metrics.md)."""
    return f"{VALIDATION_PREFIX}/{metric}"


def _scaled_pipeline(pipeline, size: tuple[int, int], poly2mask: bool, family: Family) -> list:
    """A config's pipeline at another input size, loading what the family trains on. Sizes
    (mmdet's (w, h)): the family's ``pipeline_scale`` -> ``size``, twice it (RTMDet's mosaic
    canvas) -> twice ``size``, any other (multi-scale resizes, crops) scaled by as much
    (``size`` fits in the pipeline scale by that factor); steps within steps (``RandomChoice``)
    too. Masks are loaded for an instance-segmentation family only: an object-detection model
    trains on the boxes of any data."""
    native = tuple(family.training.pipeline_scale)
    double = (2 * native[0], 2 * native[1])
    factor = min(size[0] / native[0], size[1] / native[1])

    def scaled(value):
        if isinstance(value, (tuple, list)) and len(value) == 2 and all(isinstance(v, int) for v in value):
            value = tuple(value)
            return size if value == native else (2 * size[0], 2 * size[1]) if value == double else \
                tuple(max(1, round(v * factor)) for v in value)
        if isinstance(value, list):  # a list of sizes to choose from
            return [scaled(item) for item in value]
        return value

    def step_at_size(step):
        step = dict(step)
        kind = str(step["type"]).split(".")[-1]
        if kind == "LoadAnnotations":
            if not family.makes_masks:
                step["with_mask"] = False
                step.pop("poly2mask", None)
            elif "with_mask" in step:
                step["poly2mask"] = poly2mask
        if kind == "FilterAnnotations" and not family.makes_masks:
            step["by_mask"] = False
        for key in SIZE_KEYS:
            if key in step:
                step[key] = scaled(step[key])
        if isinstance(step.get("transforms"), list):  # RandomChoice: lists of pipelines
            step["transforms"] = [[step_at_size(s) for s in option] if isinstance(option, list)
                                  else step_at_size(option) for option in step["transforms"]]
        return step

    return [step_at_size(step) for step in pipeline]


def schedule(total_steps: int, learning_rate: float, warmup_steps: int | None,
             own: list | None = None, own_learning_rate: float | None = None) -> list[dict]:
    """The config's own schedule (``own``, its ``param_scheduler``, for ``own_learning_rate``)
    in steps: a linear warm-up (its start factor), then its decay at the same fractions of
    training: RTMDet's flat, then cosine down to 5 % over the second half (the card's "flat
    cosine"); a step decay (``MultiStepLR``, Mask R-CNN's x0.1 at epochs 8 and 11 of 12) at its
    milestones. Without ``own``, RTMDet's. Other decays keep the rate flat after warm-up."""
    if own is None:
        own = [dict(type="LinearLR", start_factor=1.0e-5),
               dict(type="CosineAnnealingLR", eta_min=0.05, begin=150, end=300)]
        own_learning_rate = 1.0
    warmup = warmup_steps if warmup_steps is not None else min(1000, max(1, total_steps // 10))
    warmup = max(1, min(warmup, total_steps))
    linear = next((s for s in own if s["type"] == "LinearLR"), {})
    stages = [dict(type="LinearLR", start_factor=linear.get("start_factor", 1.0e-3) if warmup > 1 else 1.0,
                   by_epoch=False, begin=0, end=warmup)]
    for stage in own:
        span = stage.get("end")
        if stage["type"] == "CosineAnnealingLR" and span:
            start = max(warmup, int(total_steps * (stage.get("begin", 0) / span)))
            if total_steps > start:
                floor = stage.get("eta_min", 0.0) / own_learning_rate if own_learning_rate else 0.0
                stages.append(dict(type="CosineAnnealingLR", eta_min=learning_rate * floor, by_epoch=False,
                                   begin=start, end=total_steps, T_max=total_steps - start))
        elif stage["type"] == "MultiStepLR" and span:
            stages.append(dict(type="MultiStepLR", by_epoch=False, begin=0, end=total_steps,
                               gamma=stage.get("gamma", 0.1),
                               milestones=[max(warmup, int(total_steps * m / span)) for m in stage["milestones"]]))
    return stages


def steps_per_epoch(images: int, batch_size: int, world_size: int) -> int:
    """What mmengine's DefaultSampler + DataLoader give each process (drop_last off)."""
    return max(1, math.ceil(math.ceil(images / world_size) / batch_size))


def build_config(start: StartingPoint, data: PreparedData, settings: FinetuneSettings,
                 work_dir: Path, device: str, world_size: int = 1):
    """The mmengine Config that trains ``start`` on ``data`` with ``settings``: the model's
    own recipe (its config's optimizer, schedule, augmentation and hooks: RTMDet's AdamW,
    flat-cosine, EMA and pipeline switch for the last epochs) scaled to the dataset, the input
    size and the step budget. ``settings`` leaving the learning rate or weight decay unset get
    the family's (``FinetuneSettings.for_family``)."""
    settings.check()
    cfg = load_config(start.config_path, num_classes=len(data.classes))
    family = family_of_config(cfg.model)
    check_trainable(family, data, settings, start)
    own_optimizer = _own_optimizer(cfg, start)
    own_epochs = (cfg.get("train_cfg") or {}).get("max_epochs") or 300
    settings = settings.for_family(family, own_optimizer)
    budget = StepBudget.of(data, settings, world_size)
    train_pipeline, test_pipeline, stage2_pipeline = _pipelines(cfg, settings, data, family)
    _set_data(cfg, data, settings, family, device, train_pipeline, test_pipeline)
    _set_loops(cfg, settings, budget)
    _set_optimizer(cfg, settings, own_optimizer, budget, device)
    _set_hooks(cfg, settings, budget, own_epochs, stage2_pipeline)
    _set_environment(cfg, settings, work_dir, device, world_size)
    return cfg


def _own_optimizer(cfg, start: StartingPoint) -> dict:
    """The optimizer the config trains with (its type, momentum, ...), which the fine-tune keeps."""
    if not (cfg.get("optim_wrapper") or {}).get("optimizer"):
        raise FinetuneError(f"{start.config_path} has no optim_wrapper.optimizer: its config says "
                            f"nothing of how to train it")
    return dict(cfg.optim_wrapper.optimizer)


@dataclass(frozen=True)
class StepBudget:
    """How long the fine-tune trains: its epochs, each of ``per_epoch`` steps, ``total_steps``
    in all (``max_steps`` may end the last epoch early)."""

    epochs: int
    per_epoch: int
    total_steps: int

    @classmethod
    def of(cls, data: PreparedData, settings: FinetuneSettings, world_size: int) -> "StepBudget":
        per_epoch = steps_per_epoch(data.train_images, settings.training_batch_size, world_size)
        epochs = int(settings.number_of_epochs)
        if settings.max_steps:
            epochs = min(epochs, math.ceil(settings.max_steps / per_epoch))
        return cls(epochs, per_epoch, min(epochs * per_epoch, settings.max_steps or epochs * per_epoch))


def _pipelines(cfg, settings: FinetuneSettings, data: PreparedData,
               family: Family) -> tuple[list, list, list | None]:
    """The config's training and test pipelines at the fine-tune's input size, and the stage-2
    pipeline training switches to for its last epochs (None: no switch)."""
    size, poly2mask = settings.input_size(), data.has_rle
    # RTMDet trains with mosaic + mixup, then switches to a milder stage-2 pipeline (no mosaic,
    # a balanced zoom) for its last epochs; without strong augmentation, stage 2 throughout.
    stage2 = cfg.get("train_pipeline_stage2")
    stage2_pipeline = _scaled_pipeline(stage2, size, poly2mask, family) if stage2 else None
    train_pipeline = _scaled_pipeline(cfg.train_pipeline, size, poly2mask, family)
    if not settings.strong_augmentation and stage2_pipeline is not None:
        train_pipeline, stage2_pipeline = stage2_pipeline, None
    test_pipeline = _scaled_pipeline(cfg.test_pipeline, size, poly2mask, family)
    if size[0] != size[1]:
        # Resizing to fit max x min keeps portrait images portrait: pad each to a multiple of
        # the stride instead of to a landscape canvas it may not fit.
        for step in test_pipeline:
            if step["type"] == "Pad":
                step.pop("size", None)
                step["size_divisor"] = 32
    return train_pipeline, test_pipeline, stage2_pipeline


def _set_data(cfg, data: PreparedData, settings: FinetuneSettings, family: Family, device: str,
              train_pipeline: list, test_pipeline: list) -> None:
    """The pipelines, the data loaders of both sets through them, and the validation metric."""
    workers = settings.num_workers if settings.num_workers is not None else (2 if device == "cuda" else 0)
    metainfo = dict(classes=tuple(data.classes))

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
    cfg.val_evaluator = dict(type="ValidationMetric", ann_file=str(data.val_coco), task=family.task,
                             prefix=VALIDATION_PREFIX, iou_threshold=AZURE_IOU_THRESHOLD,
                             box_score_threshold=AZURE_BOX_SCORE_THRESHOLD)
    cfg.test_evaluator = cfg.val_evaluator


def _set_loops(cfg, settings: FinetuneSettings, budget: StepBudget) -> None:
    cfg.train_cfg = dict(type="StepLimitedEpochTrainLoop", max_epochs=budget.epochs,
                         max_steps=settings.max_steps, val_interval=int(settings.evaluation_frequency))
    tiling = settings.inference_tiling()
    # A fine-tune on tiles is validated as its model will answer: tiled (training.tiled_validation).
    cfg.val_cfg = dict(type="TiledValLoop", tiling=tiling) if tiling else dict(type="ValLoop")
    cfg.test_cfg = dict(type="TestLoop")


def _set_optimizer(cfg, settings: FinetuneSettings, own_optimizer: dict, budget: StepBudget,
                   device: str) -> None:
    """The config's own optimizer and schedule at the fine-tune's rate, budget and precision."""
    # What training computes in ("32", "16" or "bf16": training_precision decides, "auto" included).
    precision, _ = training_precision(settings.precision, device)
    amp = precision == "16"
    if precision == "bf16":
        register_optim_wrapper()
    # The config's own optimizer (its type, momentum, per-parameter rules, gradient clipping)
    # at the fine-tune's learning rate and weight decay.
    own_wrapper = cfg.optim_wrapper
    cfg.optim_wrapper = dict(
        type="AmpOptimWrapper" if amp else "CpuBf16OptimWrapper" if precision == "bf16" else "OptimWrapper",
        optimizer=dict(own_optimizer, lr=settings.learning_rate, weight_decay=settings.weight_decay),
        **{key: own_wrapper[key] for key in ("paramwise_cfg", "clip_grad") if own_wrapper.get(key)},
        accumulative_counts=int(settings.gradient_accumulation_step))
    if amp:
        cfg.optim_wrapper["loss_scale"] = "dynamic"
    cfg.param_scheduler = schedule(budget.total_steps, settings.learning_rate, settings.warmup_steps,
                                   list(cfg.get("param_scheduler") or []), own_optimizer.get("lr"))
    cfg.auto_scale_lr = dict(enable=False, base_batch_size=settings.training_batch_size)


def _set_hooks(cfg, settings: FinetuneSettings, budget: StepBudget, own_epochs: int,
               stage2_pipeline: list | None) -> None:
    """mmengine's default hooks (checkpoints kept by the best validation metric) and the
    config's own, its pipeline switch rescaled to the fine-tune's epochs."""
    best_key = validation_key(settings.metric_for_best_model)
    cfg.default_hooks = dict(
        timer=dict(type="IterTimerHook"),
        logger=dict(type="LoggerHook", interval=max(1, min(50, budget.per_epoch))),
        param_scheduler=dict(type="ParamSchedulerHook"),
        # max_keep_ckpts=2: mmengine deletes the oldest before writing the next, so a crash
        # while writing still leaves a complete one to resume from.
        checkpoint=dict(type="CheckpointHook", interval=1, by_epoch=True, max_keep_ckpts=2,
                        save_last=True, save_best=best_key, rule="greater"),
        sampler_seed=dict(type="DistSamplerSeedHook"),
        visualization=dict(type="DetVisualizationHook", draw=False))
    # The config's own hooks (RTMDet's EMA), but its pipeline switch: at the same share of the
    # fine-tune's epochs (RTMDet: the last 20 of 300), to the stage-2 pipeline at its size.
    own_hooks = [dict(hook) for hook in cfg.get("custom_hooks") or []]
    hooks = [hook for hook in own_hooks if hook["type"] != "PipelineSwitchHook"]
    if stage2_pipeline is not None:
        epochs = budget.epochs
        switch = next((hook for hook in own_hooks if hook["type"] == "PipelineSwitchHook"), {})
        share = (own_epochs - switch.get("switch_epoch", own_epochs - 20)) / own_epochs
        hooks.append(dict(type="PipelineSwitchHook", switch_pipeline=stage2_pipeline,
                          switch_epoch=max(0, epochs - max(1, round(epochs * share)))))
    if settings.checkpoint_interval_steps:
        hooks.append(dict(type="CheckpointHook", interval=int(settings.checkpoint_interval_steps),
                          by_epoch=False, max_keep_ckpts=2, save_last=False))
    cfg.custom_hooks = hooks


def _set_environment(cfg, settings: FinetuneSettings, work_dir: Path, device: str, world_size: int) -> None:
    """Where and how it runs: the device's normalisation and process group, seed, work folder,
    logging; the config's keys that training does not read are dropped."""
    if device == "cpu":
        # SyncBN needs CUDA: plain BatchNorm per process (DDP on CPU: gloo, no SyncBN), and
        # mmdet's RTMDet would convert every BatchNorm to SyncBN when distributed.
        _replace_type(cfg.model, "SyncBN", "BN")
        if _takes(cfg.model.type, "use_syncbn"):
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
    # mmengine keeps one visualizer per name for the life of the process, with the folder of the
    # run that made it: a name of its own per output, or a second fine-tune in the same process
    # (a notebook, a test session) writes into the first one's folder.
    cfg.visualizer = dict(type="DetLocalVisualizer", vis_backends=[dict(type="LocalVisBackend")],
                          name=f"visualizer:{work_dir}")
    cfg.log_processor = dict(type="LogProcessor", window_size=50, by_epoch=True)
    for unused in ("tta_model", "tta_pipeline", "img_scales", "data_root", "dataset_type",
                   "train_pipeline_stage2", "checkpoint"):
        cfg.pop(unused, None)


def check_trainable(family: Family | None, data: PreparedData, settings: FinetuneSettings,
                    start: StartingPoint) -> None:
    """Refuse, before any training, what this model cannot learn from this data or be
    validated by."""
    if family is None:
        raise FinetuneError(f"{start.description}: not an mmdet image detector, nothing to fine-tune")
    if family.makes_masks and data.task != INSTANCE_SEGMENTATION:
        raise FinetuneError(
            f"{family.title} is an instance-segmentation model and learns masks, but the training "
            f"data are {data.task} data (boxes without masks): train an object-detection model "
            f"on them (e.g. --config rtmdet_tiny_8xb32-300e_coco), or give data with masks")
    if not family.makes_masks and settings.metric_for_best_model.startswith("segm_"):
        raise FinetuneError(
            f"metric_for_best_model {settings.metric_for_best_model} scores masks, which "
            f"{family.title} ({family.task}) does not make: use a bbox_ stat or mean_average_precision "
            f"(box AP at IoU 0.5 for an object-detection model)")
    smallest = min(settings.input_size())
    if smallest < family.training.min_image_size:
        raise FinetuneError(
            f"{family.title} trains at an input of at least {family.training.min_image_size} px "
            f"({family.training.min_image_size_reason}), not {smallest} px: raise --image-size "
            f"(or --image-min-size)")


def _takes(model_type: str, argument: str) -> bool:
    """Whether mmdet's ``model_type`` detector takes ``argument`` (RTMDet's ``use_syncbn``)."""
    import inspect

    from mmdet.registry import MODELS
    from mmengine.registry import init_default_scope

    init_default_scope("mmdet")
    built = MODELS.get(str(model_type))
    return built is not None and argument in inspect.signature(built.__init__).parameters


def _replace_type(node, old: str, new: str) -> None:
    if isinstance(node, dict):
        if node.get("type") == old:
            node["type"] = new
        for value in node.values():
            _replace_type(value, old, new)
    elif isinstance(node, (list, tuple)):
        for value in node:
            _replace_type(value, old, new)
