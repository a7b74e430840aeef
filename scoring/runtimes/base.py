"""The runtime seam: what the runner needs from a model, whatever executes it.

A runtime turns BGR uint8 images into ``ImageDetections`` in three steps, Hugging Face pipeline
style, each testable on its own::

    batch = predictor.preprocess(images)          # test pipeline: resize, pad (normalize: torch)
    raw = predictor.forward(batch, params)         # the network only: the head's raw outputs
    detections = predictor.postprocess(raw, params)  # boxes, scores, NMS, lazy masks per image

The steps mean the same in every runtime: ``forward`` runs the network and nothing else (so it
is what a faster runtime or precision replaces), and ``postprocess`` does everything after it,
NMS included, with the request's params.

Detection is the contract and masks an optional part of it: an object-detection model's
detections carry ``masks=None``. Which class implements a model is its family's choice
(``scoring.families``: a loader per runtime): on torch, ``scoring.runtimes.torch_mmdet`` (any
mmdet detector; imported only for a model that uses torch), on ONNX Runtime and OpenVINO,
``scoring.runtimes.onnx_rtmdet`` and ``openvino_rtmdet`` (numpy post-processing). This module
imports numpy only, so the code shipped in a saved model stays importable without torch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Protocol, Sequence

import numpy as np

from scoring.runtimes.masks import MaskWindow
from scoring.schema import INSTANCE_SEGMENTATION, PredictParams


class MaskSource(Protocol):
    """Makes one image's full-size boolean masks on demand, a chunk at a time: all of them at
    once may not fit in memory (100 masks of a 12-megapixel image are 1.2 GB as bools).
    A source may also have ``iter_windows(threshold)``: each mask as a ``MaskWindow`` (its box
    window's pixels and offset), which costs the object's size rather than the picture's."""

    def __len__(self) -> int: ...

    def iter_masks(self, threshold: float) -> Iterator[np.ndarray]:
        """One (height, width) boolean array per detection, in detection order."""

    def select(self, indices: Sequence[int]) -> "MaskSource":
        """A source of these detections' masks only, in this order."""


@dataclass
class ImageDetections:
    """One image's detections in original-image pixels; masks made lazily by ``masks``, which is
    None when no mask was asked for (``mask_format`` "none": the runtime skips the mask work)."""

    image_size: tuple[int, int]  # (width, height) of the original image
    boxes: np.ndarray  # (N, 4) float x1, y1, x2, y2
    scores: np.ndarray  # (N,)
    labels: np.ndarray  # (N,) class indices
    class_names: Sequence[str]
    masks: MaskSource | None

    def __len__(self) -> int:
        return len(self.scores)

    def label_name(self, i: int) -> str:
        return self.class_names[int(self.labels[i])]

    def iter_masks(self, threshold: float) -> Iterator[np.ndarray]:
        """The full-size boolean mask of each detection, in order."""
        return self._mask_source().iter_masks(threshold)

    def iter_windows(self, threshold: float) -> Iterator[MaskWindow]:
        """Each detection's mask as a ``MaskWindow`` (``.full()`` gives the full-size mask): the
        source's own windows where it makes them, else its full-size masks."""
        masks = self._mask_source()
        windows = getattr(masks, "iter_windows", None)
        if windows is not None:
            return windows(threshold)
        return (MaskWindow.whole(mask) for mask in masks.iter_masks(threshold))

    def _mask_source(self) -> MaskSource:
        if self.masks is None:
            raise ValueError("these detections were made without masks (mask_format \"none\")")
        return self.masks


def masks_wanted(params: PredictParams) -> bool:
    """Whether a runtime makes masks for ``params``: not for ``mask_format`` "none", whose
    answer has none (the mask logits of thousands of detections are most of their work)."""
    return params.mask_format != "none"


def keep_ratio_size(width: int, height: int, scale: tuple[int, int]) -> tuple[int, int]:
    """mmcv's ``rescale_size`` for a keep-ratio resize into ``scale`` (long edge, short edge):
    the factor is min(long / max(w, h), short / min(w, h)), sizes rounded as mmcv's
    ``_scale_size`` rounds them (int(x + 0.5)). Both runtimes' resize and the runner's check
    that a picture survives it use this one function."""
    long_edge, short_edge = max(scale), min(scale)
    factor = min(long_edge / max(width, height), short_edge / min(width, height))
    return int(width * factor + 0.5), int(height * factor + 0.5)


def forward_batch_size(info: dict, on_gpu: bool) -> int:
    """Images per forward pass, for every runtime: the batch_size setting (the model_config's,
    else MMDET_MLFLOW_BATCH_SIZE) if set, else the model's (``batch_size`` in model.json, 8) on
    a GPU, else 1. On CPU, batches of 8 ran slower per image than single passes for both tiny
    and x (bench/predict.py), while a GPU gains."""
    from scoring.settings import BATCH_SIZE

    chosen = BATCH_SIZE.value()
    if chosen:
        return int(chosen)
    return int(info.get("batch_size", 8)) if on_gpu else 1


class Predictor:
    """Base of every runtime. Subclasses set ``class_names``, ``default_params`` and
    ``batch_size`` and implement the three steps; ``__call__`` runs them batch by batch."""

    runtime: str = ""  # "torch" or "onnx": what model.json's "runtime" names
    # What the model serves: "object-detection" (no masks: ``ImageDetections.masks`` is None)
    # or "instance-segmentation" (scoring.schema.TASKS).
    task: str = INSTANCE_SEGMENTATION
    # What the network computes in: "fp32", "int8" (an ONNX model's quantized network) or
    # "bf16" (OpenVINO on a CPU with native bf16); a logged evaluation records it.
    precision: str = "fp32"
    class_names: list[str]
    default_params: PredictParams
    batch_size: int
    # The score threshold of the model config's test settings (RTMDet-Ins: 0.05): evaluation
    # scores for AP at it. None when the runtime does not know it.
    configured_score_threshold: float | None = None

    # Low-resolution cells of margin around its box each mask is cut to (None: masks are not
    # cut to their boxes, exactly mmdet's; scoring.runtimes.masks.iter_box_windows).
    mask_box_margin: float | None = None

    # The model's model_config (scoring.settings.ModelConfig): active while it scores (the
    # frame and batch-file entry points set it); none for a predictor built without one.
    model_config = None

    # The (width, height) box the test pipeline resizes into, keeping the aspect ratio (RTMDet:
    # 640 x 640); None when the runtime does not resize.
    input_scale: tuple[int, int] | None = None

    def __init__(self, family, class_names: Sequence[str], default_params: PredictParams,
                 batch_size: int):
        """What every runtime knows of its model: its ``family`` (scoring.families, which owns
        the task), its classes, its default params and its images per forward pass."""
        self.family = family
        self.task = family.task
        self.class_names = list(class_names)
        self.default_params = default_params
        self.batch_size = batch_size

    def image_problem(self, image: np.ndarray) -> str | None:
        """Why ``image`` cannot go through this model (None when it can): a side that the
        keep-ratio resize would shrink to 0 pixels, which mmcv's resize and OpenCV refuse."""
        if self.input_scale is None:
            return None
        height, width = image.shape[:2]
        new_w, new_h = keep_ratio_size(width, height, self.input_scale)
        if new_w < 1 or new_h < 1:
            return (f"image is {width}x{height}: too thin for the model, whose {self.input_scale[0]}x"
                    f"{self.input_scale[1]} input would make it {new_w}x{new_h} pixels")
        return None

    def preprocess(self, images: Sequence[np.ndarray]) -> Any:
        raise NotImplementedError

    def forward(self, batch: Any, params: PredictParams) -> Any:
        raise NotImplementedError

    def postprocess(self, raw: Any, params: PredictParams) -> list[ImageDetections]:
        raise NotImplementedError

    def __call__(self, images: Sequence[np.ndarray],
                 params: PredictParams | None = None) -> list[ImageDetections]:
        """Detections for ``images`` (BGR uint8, HxWx3), ``batch_size`` images per forward pass."""
        params = params or self.default_params
        out: list[ImageDetections] = []
        for start in range(0, len(images), self.batch_size):
            batch = self.preprocess(images[start : start + self.batch_size])
            out.extend(self.postprocess(self.forward(batch, params), params))
        return out
