"""Where training starts: one of our models (an MLflow model folder or a pytorch_model_folder),
or a config with a checkpoint (path, URL, ``official``) or none (from scratch); and the starting
weights adapted to the data's classes (``adapt_weights``)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from mlflow_model.checkpoints import classes_from_meta, resolve_checkpoint
from mlflow_model.configs import config_name, resolve_config_path
from scoring.model_dir import ModelDir, WeightsDir
from scoring.families import RTMDET_INS, Family
from scoring.weights import check_state_dict, read_state_dict
from mmdet_mlflow.training.settings import FinetuneError


@dataclass
class StartingPoint:
    """A config and (unless training from scratch) weights with the classes they were trained
    for (None when the checkpoint does not say)."""

    config_source: str                   # config name or path, or the model folder
    config_path: Path
    weights: dict | None
    weight_classes: list[str] | None
    description: str

    @classmethod
    def from_model_folder(cls, folder) -> "StartingPoint":
        """An MLflow model we saved (its ``model/`` weights folder) or a ``pytorch_model_folder``
        from an earlier fine-tune (a weights folder itself)."""
        folder = Path(folder).expanduser()
        saved = ModelDir(folder).data
        for weights_dir, kind in ((saved, "MLflow model"), (WeightsDir(folder), "PyTorch model folder")):
            if weights_dir.config.is_file() and weights_dir.weights.is_file():
                break
        else:
            if saved.onnx.is_file():
                raise FinetuneError(
                    f"{folder} is an ONNX Runtime model: it carries no torch weights to train from. "
                    f"Start from the pytorch_model_folder written beside it, or a torch model")
            inner = saved.path.relative_to(folder)
            raise FinetuneError(
                f"{folder} is neither an MLflow model saved by mmdet-mlflow ({inner / saved.config.name} "
                f"+ {inner / saved.weights.name}) nor a pytorch_model_folder ({saved.config.name} + "
                f"{saved.weights.name})")
        classes = weights_dir.read_info().get("classes") if weights_dir.info_file.is_file() else None
        weights, _ = read_state_dict(weights_dir.weights)
        return cls(str(folder), weights_dir.config.resolve(), weights,
                   list(classes) if classes else None, f"the {kind} {folder}")

    @classmethod
    def from_config(cls, config, checkpoint: str | None) -> "StartingPoint":
        config_path = resolve_config_path(config)
        if checkpoint is None or str(checkpoint).lower() == "none":
            return cls(str(config), config_path, None, None,
                       f"{config_name(config)} from scratch (random initialisation)")
        path, source = resolve_checkpoint(checkpoint, config_name(config))
        weights, meta = read_state_dict(path)
        return cls(str(config), config_path, weights, classes_from_meta(meta),
                   f"{config_name(config)} with checkpoint {checkpoint} (sha256 {source.sha256[:12]})")


def adapt_weights(model, weights: dict, weight_classes: Sequence[str] | None,
                  classes: Sequence[str], model_cfg, family: Family = RTMDET_INS) -> tuple[dict, list[str]]:
    """The starting weights for ``model`` (already initialised, built from ``model_cfg`` for
    ``classes``) set up for ``classes``: of its class-shaped tensors (every one whose shape the
    class count sets, ``class_shaped_layers``: a classifier, Mask R-CNN's class-specific box
    deltas and mask logits, ...), the rows of classes the checkpoint knows by name are kept
    (each class's rows where the family lays them, ``Family.class_rows``; rows of no class, a
    background row, from the checkpoint), the others keep the model's fresh initialisation;
    every other tensor must fit exactly. Returns the state dict to load strictly and what was
    re-initialised, in words."""
    from scoring.runtimes.torch_mmdet import class_shaped_layers

    own = model.state_dict()
    layers = class_shaped_layers(model_cfg, family)
    check_state_dict(_Keys({k: v for k, v in own.items() if k not in layers}),
                     {k: v for k, v in weights.items() if k not in layers},
                     "(everything but the class-shaped layers)")
    adapted = {k: weights[k] for k in own if k not in layers}
    fits = all(k in weights and weights[k].shape == own[k].shape for k in layers)
    if fits and (weight_classes is None or list(weight_classes) == list(classes)):
        adapted.update({k: weights[k] for k in layers})
        return adapted, [] if weight_classes else [
            "the checkpoint names no classes: its classifier is used as is, in the data's class order"]

    row_of = {name: i for i, name in enumerate(weight_classes or [])}
    kept = []
    for key, (per_class, rest) in layers.items():
        old, new = weights.get(key), own[key].clone()
        if old is not None and old.shape[1:] == new.shape[1:] and \
                old.shape[0] == per_class * len(row_of) + rest:
            kept = [name for name in classes if name in row_of]
            for name in kept:
                new[_class_rows(family, classes.index(name), len(classes), per_class)] = \
                    old[_class_rows(family, row_of[name], len(row_of), per_class)]
            if rest:  # rows of no class (a background row): the checkpoint's
                new[-rest:] = old[-rest:]
        adapted[key] = new
    fresh = [name for name in classes if name not in kept]
    note = f"classifier re-initialised for {len(fresh)} new classes ({', '.join(fresh) or 'none'})"
    if kept:
        note += f", kept for {', '.join(kept)}"
    if len(row_of) > len(kept):
        note += f"; the checkpoint's other {len(row_of) - len(kept)} classes are dropped"
    return adapted, [note]


def _class_rows(family: Family, index: int, count: int, per_class: int) -> list[int]:
    """The rows of class ``index`` of ``count`` in a tensor with ``per_class`` rows a class."""
    if family.class_rows == "anchor-major":
        return [block * count + index for block in range(per_class)]
    return [index * per_class + row for row in range(per_class)]


class _Keys:
    """Just enough of a module for check_state_dict (a state dict to compare against)."""

    def __init__(self, state_dict):
        self._state_dict = state_dict

    def state_dict(self):
        return self._state_dict
