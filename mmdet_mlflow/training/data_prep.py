"""The training and validation sets, read and validated once (any format mmdet_mlflow.data
reads) and written as the COCO JSON mmdet's CocoDataset and our validation metric read."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mmdet_mlflow.data import Dataset, load_dataset, write_coco
from mmdet_mlflow.data.dataset import instances_task
from mmdet_mlflow.training.settings import FinetuneError
from mmdet_mlflow.training.tiles import TrainingTiles, tile_dataset

TILES_FOLDER = "train_tiles"  # beside the training COCO file: the tiles' pictures


@dataclass
class PreparedData:
    """Training/validation sets converted once to COCO JSON, with the class order the model is
    trained for."""

    train_coco: Path
    val_coco: Path
    classes: list[str]
    train_images: int                     # images with at least one object (mmdet keeps only those)
    val_images: int
    has_rle: bool                         # COCO RLE masks: decoded to bitmaps, not polygons
    task: str                             # what the data annotate: Dataset.task of both sets


def prepare_data(training_data, validation_data, coco_paths: tuple[Path, Path] | None,
                 validate: bool = True, confine_images: bool = False,
                 tiling: TrainingTiles | None = None) -> PreparedData:
    """Read and validate both sets (AutoML JSONL, MLTable or COCO) and write them as COCO JSON
    to ``coco_paths`` (train, validation; None: they are COCO files already, ours, used as they
    are). The validation set must use the training set's labels. ``confine_images``: see
    mmdet_mlflow.data.paths. ``tiling``: the training set also holds every picture's tiles
    (mmdet_mlflow.training.tiles), written beside the training COCO file."""
    train = load_dataset(training_data, validate=validate, confine_images=confine_images)
    val = load_dataset(validation_data, classes=train.classes, validate=validate,
                       confine_images=confine_images)
    if not any(record.instances for record in train.images):
        raise FinetuneError(f"{training_data} has no labelled objects to train on")
    # (a validation set without objects is for either task)
    if (instances_task(val.images) or train.task) != train.task:
        raise FinetuneError(
            f"the training data ({training_data}) are {train.task} data but the validation data "
            f"({validation_data}) are {val.task} data: give both sets for one task (both with "
            f"masks, or both boxes only)")
    if tiling is not None and coco_paths is not None:
        train = tile_dataset(train, tiling, coco_paths[0].parent / TILES_FOLDER)
    if coco_paths is None:
        train_coco, val_coco = Path(training_data).absolute(), Path(validation_data).absolute()
    else:
        # Absolute image paths: mmdet joins them to no folder of ours.
        train_coco, val_coco = (write_coco(dataset, path, relative=False)
                                for dataset, path in zip((train, val), coco_paths))
    return PreparedData(train_coco, val_coco, list(train.classes), _trainable_images(train),
                        len(val.images), _has_rle(train) or _has_rle(val), train.task)


def _trainable_images(dataset: Dataset) -> int:
    return sum(1 for r in dataset.images if any(not i.iscrowd for i in r.instances))


def _has_rle(dataset: Dataset) -> bool:
    return any(inst.rle is not None for record in dataset.images for inst in record.instances)
