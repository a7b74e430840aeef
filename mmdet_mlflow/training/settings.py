"""Fine-tuning's hyperparameters (named as Azure ML's fine-tune component names them), the
validation metrics that may pick the exported epoch, and the measured quick CPU recipe."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from mmdet_mlflow.metrics import AZURE_METRIC_NAMES, COCO_STAT_NAMES, coco_metric_name
from mmdet_mlflow.training.precision import PRECISIONS
from scoring.errors import MmdetMlflowError
from scoring.tiles import TileGridError, check_overlap_ratio, parse_tile_grid

# What validation reports each epoch (training.validation.ValidationMetric), by the names
# docs/metrics.md defines: Azure's (mask AP at IoU 0.5, precision and recall at score 0.3) and
# COCO's stats for masks and boxes.
VALIDATION_METRICS = AZURE_METRIC_NAMES + tuple(
    coco_metric_name(section, stat) for section in ("segm", "bbox") for stat in COCO_STAT_NAMES)
# Any of them may pick the exported epoch, but precision: a model that predicts almost nothing
# has a high one.
BEST_MODEL_METRICS = tuple(name for name in VALIDATION_METRICS if name != "precision")
# Names an earlier version took, for a clear error (mean_average_precision then meant COCO's
# segm mAP@[.5:.95]; it now has Azure's meaning, mask AP at IoU 0.5, everywhere).
RENAMED_METRICS = {"mean_average_precision_50": "segm_AP50", "mean_average_precision_75": "segm_AP75",
                   "bbox_mean_average_precision": "bbox_AP"}


class FinetuneError(MmdetMlflowError, ValueError):
    """Bad fine-tune settings or starting point (the CLI prints it without a traceback)."""


@dataclass
class FinetuneSettings:
    """Hyperparameters, named as Azure ML's fine-tune component names them."""

    number_of_epochs: int = 15
    max_steps: int | None = None             # stop after this many steps (overrides epochs)
    training_batch_size: int = 8             # per process
    validation_batch_size: int = 8
    # After warm-up, for the config's own optimizer and schedule; None: the model family's
    # (scoring.families TrainingRecipe: RTMDet's AdamW 0.001 and 0.05, Mask R-CNN's SGD 0.01, ...)
    learning_rate: float | None = None
    weight_decay: float | None = None
    warmup_steps: int | None = None          # default: a tenth of training, at most 1000
    gradient_accumulation_step: int = 1
    image_size: int = 640                    # square training/inference size (RTMDet: 640)
    image_min_size: int | None = None        # with image_max_size: a (max x min) input instead
    image_max_size: int | None = None
    metric_for_best_model: str = "mean_average_precision"   # docs/metrics.md
    precision: str = "32"                    # "16": AMP on GPU; "bf16": CPU autocast; "auto" (training/precision.py)
    checkpoint_interval_steps: int | None = None  # also checkpoint every N steps
    evaluation_frequency: int = 1            # validate every N epochs (and always after the last)
    num_workers: int | None = None           # data-loading processes (default: 0 on CPU, 2 on GPU)
    strong_augmentation: bool = True         # RTMDet's mosaic + mixup (off: its stage-2 pipeline throughout)
    seed: int = 0
    tile_grid_size: str | None = None        # AutoML's "MxN" (columns x rows): train on tiles too
    tile_overlap_ratio: float = 0.25         # AutoML's: overlap of adjacent tiles, [0, 1)

    def check(self) -> None:
        problems = []
        for name in ("number_of_epochs", "training_batch_size", "validation_batch_size",
                     "image_size", "gradient_accumulation_step", "evaluation_frequency"):
            if int(getattr(self, name)) < 1:
                problems.append(f"{name} must be at least 1 (got {getattr(self, name)})")
        for name in ("max_steps", "checkpoint_interval_steps", "image_min_size", "image_max_size"):
            value = getattr(self, name)
            if value is not None and int(value) < 1:
                problems.append(f"{name} must be at least 1 (got {value})")
        if self.learning_rate is not None and not self.learning_rate > 0:
            problems.append(f"learning_rate must be positive (got {self.learning_rate})")
        if self.weight_decay is not None and self.weight_decay < 0:
            problems.append(f"weight_decay must not be negative (got {self.weight_decay})")
        for name in ("image_size", "image_min_size", "image_max_size"):
            value = getattr(self, name)
            if value is not None and int(value) % 32:
                problems.append(f"{name} must be a multiple of 32, RTMDet's largest stride (got {value})")
        if (self.image_min_size is None) != (self.image_max_size is None):
            problems.append("image_min_size and image_max_size go together")
        elif self.image_min_size and self.image_min_size > self.image_max_size:
            problems.append("image_min_size is larger than image_max_size")
        if str(self.precision) not in PRECISIONS:
            problems.append(f"precision must be 32, 16 (AMP on a GPU), bf16 (CPU autocast) or auto "
                            f"(got {self.precision!r})")
        try:
            parse_tile_grid(self.tile_grid_size)
            check_overlap_ratio(self.tile_overlap_ratio)
        except TileGridError as err:
            problems.append(str(err))
        if self.metric_for_best_model not in BEST_MODEL_METRICS:
            problems.append(_best_model_metric_problem(self.metric_for_best_model))
        if problems:
            raise FinetuneError("; ".join(problems))

    def inference_tiling(self) -> dict:
        """The tiling the fine-tuned model answers with by default (as AutoML: a model trained
        on tiles predicts on tiles too); empty when it trained on whole pictures."""
        grid = parse_tile_grid(self.tile_grid_size)
        if grid is None:
            return {}
        return {"tile_grid_size": self.tile_grid_size, "tile_overlap_ratio": self.tile_overlap_ratio}

    def input_size(self) -> tuple[int, int]:
        """(width, height) of the network input, mmdet's (w, h) scale convention."""
        if self.image_max_size:
            return int(self.image_max_size), int(self.image_min_size)
        return int(self.image_size), int(self.image_size)

    def for_family(self, family, optimizer: dict) -> "FinetuneSettings":
        """These settings with the learning rate and weight decay they leave unset filled in:
        the family's (``Family.training``), else the config's own ``optimizer``'s."""
        recipe = family.training
        return dataclasses.replace(
            self,
            learning_rate=_first(self.learning_rate, recipe.learning_rate, optimizer.get("lr")),
            weight_decay=_first(self.weight_decay, recipe.weight_decay, optimizer.get("weight_decay", 0.0)))

    def as_params(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


def _first(*values):
    return next(value for value in values if value is not None)


def _best_model_metric_problem(name: str) -> str:
    if name == "precision":
        hint = (" (precision favours a model that predicts little; it is logged each epoch, and "
                "precision at a chosen score threshold is the evaluation step's job)")
    elif name in RENAMED_METRICS:
        hint = f" ({name} is now called {RENAMED_METRICS[name]}: docs/metrics.md)"
    else:
        hint = " (docs/metrics.md)"
    return (f"metric_for_best_model must be mean_average_precision or recall (Azure's meaning), "
            f"or a COCO stat segm_<stat> or bbox_<stat> with <stat> one of "
            f"{', '.join(COCO_STAT_NAMES)}{hint} (got {name!r})")


# The recipe the offline demo uses: the tiny model trained from scratch on a few hundred
# synthetic images on a 2-core CPU in minutes. bench/recipe_search.py's second grid chose it
# (bench/results/recipe-search.md has the figures, their date and CPU): fewer epochs lost mAP.
# From scratch there is no pretrained feature to protect, so a high learning rate (a higher
# one was worse) and a short warm-up; batch 8 (batch 4 with as many images was worse); 256 px
# (a larger size costs more a step and was worse for the same time); RTMDet's stage-2
# augmentation (no mosaic) throughout, so the model sees every object whole; validation only at
# the middle and the end (each costs training time).
QUICK_CPU_CONFIG = "rtmdet-ins_tiny_8xb32-300e_coco"


def quick_cpu_recipe(**overrides) -> FinetuneSettings:
    """Settings for the tiny model from scratch on CPU within ~10 minutes (the demo recipe)."""
    recipe = dict(number_of_epochs=16, training_batch_size=8, validation_batch_size=8,
                  learning_rate=0.004, weight_decay=0.05, warmup_steps=30, image_size=256,
                  strong_augmentation=False, num_workers=0, evaluation_frequency=8)
    recipe.update(overrides)
    return FinetuneSettings(**recipe)
