"""The mmengine parts of fine-tuning: a Runner that starts from class-adapted weights, a loop
that honours ``max_steps``, and checkpoints that ``torch.load(weights_only=True)`` can read.

None of them touches the training step: the step is mmengine's and mmdet's own. Importing this
module registers the loops with mmengine (this one and the tiled validation's,
training.tiled_validation) and the validation metric with mmdet.
"""
from __future__ import annotations

import logging
from typing import Sequence

import numpy as np
import torch
from mmengine.hooks import Hook
from mmengine.logging import HistoryBuffer
from mmengine.registry import LOOPS
from mmengine.runner import EpochBasedTrainLoop, Runner

from mmdet_mlflow.training.validation import ValidationMetric  # noqa: F401  (registers it with mmdet)
from mmdet_mlflow.training.tiled_validation import TiledValLoop  # noqa: F401  (registers it with mmengine)
from mmdet_mlflow.training.start import StartingPoint, adapt_weights
from scoring.families import family_of_config

_BUFFER_MARK = "__history_buffer__"


@LOOPS.register_module(force=True)
class StepLimitedEpochTrainLoop(EpochBasedTrainLoop):
    """mmengine's epoch loop, plus: it stops after ``max_steps`` (Azure's max_steps; the last
    epoch ends early and is validated as usual), and resuming from a mid-epoch checkpoint skips
    the batches that epoch already trained on (mmengine would run the whole epoch again, adding
    steps). The sampler's per-epoch seed gives the same batch order again."""

    def __init__(self, runner, dataloader, max_epochs: int, max_steps: int | None = None, **kwargs):
        super().__init__(runner, dataloader, max_epochs, **kwargs)
        if max_steps:
            self._max_iters = min(self._max_iters, int(max_steps))

    def run_epoch(self) -> None:
        self.runner.call_hook("before_train_epoch")
        self.runner.model.train()
        per_epoch = len(self.dataloader)
        done = min(max(0, self._iter - self._epoch * per_epoch), per_epoch)
        for idx, data_batch in enumerate(self.dataloader):
            if self._iter >= self._max_iters:
                break
            if idx < done:
                continue
            self.run_iter(idx, data_batch)
        self.runner.call_hook("after_train_epoch")
        self._epoch += 1


class PlainResumeStateHook(Hook):
    """mmengine pickles its message hub's HistoryBuffer objects (numpy arrays and bound methods
    inside) into every checkpoint, and torch.load(weights_only=True) rightly refuses them, so
    mmengine cannot resume under torch >= 2.6 without unpickling arbitrary objects. We store
    each buffer as tensors instead (and numpy scalars as numbers) and rebuild it when resuming
    (after the file is read, before the message hub takes it): our checkpoints need no
    allow-list at all."""

    priority = "VERY_HIGH"

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        hub = checkpoint.get("message_hub")
        if isinstance(hub, dict) and "log_scalars" in hub:
            checkpoint["message_hub"] = dict(
                hub,
                log_scalars={key: _plain_buffer(value) for key, value in hub["log_scalars"].items()},
                # numpy scalars (e.g. the ETA) as Python numbers
                runtime_info={key: value.item() if isinstance(value, np.generic) else value
                              for key, value in hub.get("runtime_info", {}).items()})

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        hub = checkpoint.get("message_hub")
        if isinstance(hub, dict) and "log_scalars" in hub:
            hub["log_scalars"] = {key: _history_buffer(value)
                                  for key, value in hub["log_scalars"].items()}


class ResumeValidationHook(Hook):
    """mmengine writes an epoch's checkpoint before validating that epoch, so a run killed
    during validation would resume with that epoch never validated (and never a candidate for
    the best model). Resuming from an epoch checkpoint therefore validates it first, on every
    rank (validation gathers results across processes)."""

    priority = "LOWEST"  # after the monitor (rank 0) has loaded its history

    def before_train(self, runner) -> None:
        if getattr(runner, "validate_resumed_epoch", False) and runner.val_loop is not None:
            runner.val_loop.run()


def _plain_buffer(buffer):
    if not isinstance(buffer, HistoryBuffer):
        return buffer
    logs, counts = buffer.data
    return {_BUFFER_MARK: True, "log_history": torch.from_numpy(np.asarray(logs, dtype=np.float64)),
            "count_history": torch.from_numpy(np.asarray(counts, dtype=np.float64)),
            "max_length": int(buffer.max_length)}


def _history_buffer(value):
    if isinstance(value, dict) and value.get(_BUFFER_MARK):
        return HistoryBuffer(value["log_history"].numpy(), value["count_history"].numpy(),
                             value["max_length"])
    return value


class _KnownNoise(logging.Filter):
    """mmengine warnings that say nothing to act on: RTMDet's shared head convs are skipped by
    design (the config's bypass_duplicate), and mmengine's own deprecations."""

    NOISE = ("It is skipped since bypass_duplicate=True", '"FileClient" will be deprecated',
             '"HardDiskBackend" is the alias of "LocalBackend"')

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(noise in message for noise in self.NOISE)


class FinetuneRunner(Runner):
    """mmengine's Runner that starts from the given weights, adapted to the dataset's classes,
    right after the model's own initialisation (re-initialised classifier rows thus get the
    head's own initialisation, the same on every rank since mmengine broadcasts it), and writes
    checkpoints weights_only can read. Not used when resuming: the checkpoint has everything."""

    def __init__(self, *args, **kwargs):
        self.start: StartingPoint | None = None   # None: from scratch, or resuming
        self.classes: Sequence[str] = ()
        self.start_notes: list[str] = []           # what adapting the weights changed, in words
        self.validate_resumed_epoch = False         # resuming from an epoch checkpoint: validate it first
        super().__init__(*args, **kwargs)
        self.logger.addFilter(_KnownNoise())
        self.register_hook(PlainResumeStateHook())
        self.register_hook(ResumeValidationHook())

    def start_from(self, start: StartingPoint, classes: Sequence[str]) -> None:
        """Train ``start``'s weights, adapted to ``classes``, rather than a fresh model."""
        self.start, self.classes = start, list(classes)

    def _init_model_weights(self) -> None:
        super()._init_model_weights()
        if self.start is None or self.start.weights is None:
            return
        model = self.model.module if hasattr(self.model, "module") else self.model
        family = family_of_config(self.cfg.model)
        adapted, notes = adapt_weights(model, self.start.weights, self.start.weight_classes,
                                       self.classes, self.cfg.model, family=family)
        model.load_state_dict(adapted, strict=True)
        self.start_notes = notes
