"""The one runner: images in, responses out, ``decode -> batch -> segmenter -> encode``.

Every path that scores images goes through ``score_images``: the pyfunc (``scoring.frame``,
under ``mlflow models serve`` and Azure's online endpoint), ``mmdet-mlflow predict``, batch
scoring (the CLI and Azure's batch entry script) and evaluation. Only one batch of decoded
images is in memory at a time, and each image's masks are made a chunk at a time by the
encoder. Callers differ only in

- what an item is: ``(key, value)`` pairs, the key naming the row in errors (a request's index
  label, a file name) and the value anything the decoder takes (base64, a URL, bytes);
- what happens to a bad item: ``on_error="raise"`` stops at the first InputError (a request is
  answered 4xx as a whole), ``"yield"`` reports it as a ``Scored`` with ``error`` set and goes on
  (batch jobs, predict on a folder);
- how detections are encoded: ``encode`` defaults to the public response; evaluation passes one
  that also keeps each mask's RLE (see ``mmdet_mlflow.evaluate``);
- limits: a served request has a ``deadline`` for its work (checked between forward passes and
  between masks, so a request whose client gave up stops instead of holding the worker) and a
  ``budget`` for its image URLs together (time spent fetching only); batch jobs have neither.

Every image is checked before it reaches the model: it must survive the model's resize (a 1 x
2000 image would become 0 pixels high) and its worst-case mask work (max_detections x pixels)
must be within ``MMDET_MLFLOW_MAX_MASK_PIXELS`` (unless ``mask_format`` is "none": no mask is
made). The ``classes`` param is checked against the model's classes before the first image.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from scoring import settings
from scoring.class_filter import check_classes
from scoring.decode import decode_image
from scoring.encode import encode_detections
from scoring.errors import InputError
from scoring.fetch import Deadline, FetchBudget
from scoring.runtimes.base import ImageDetections, Segmenter
from scoring.runtimes.masks import MaskWindow
from scoring.schema import PredictParams
from scoring.tiling import segment_tiled

Encoder = Callable[[ImageDetections, PredictParams], Any]


@dataclass
class Scored:
    """One item's outcome: its response (``encode``'s result) or the InputError that stopped it."""

    key: Any
    response: Any = None
    error: InputError | None = None
    image: np.ndarray | None = None  # the decoded image, when asked for (pictures, checks)
    detections: ImageDetections | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def score_images(segmenter: Segmenter, items: Iterable[tuple[Any, Any]],
                 params: PredictParams | dict | None = None, *, encode: Encoder = encode_detections,
                 on_error: str = "raise", keep_images: bool = False,
                 decode: Callable[[Any, Any], np.ndarray] | None = None,
                 deadline: Deadline | None = None,
                 budget: FetchBudget | None = None) -> Iterator[Scored]:
    """Score ``items`` in order, the segmenter's ``batch_size`` images per forward pass.

    ``params`` are this call's predict params (a dict is checked against the model's defaults).
    ``decode(key, value)`` overrides how a value becomes a BGR image (default: the one decoder,
    fetching URLs within ``budget``). ``deadline``: stop with an InputError once it has passed.
    """
    if on_error not in ("raise", "yield"):
        raise ValueError(f"on_error must be 'raise' or 'yield', not {on_error!r}")
    if not isinstance(params, PredictParams):
        params = segmenter.default_params.updated(params)
    check_classes(segmenter.class_names, params)  # an unknown class name: refused before any work
    decode = decode or (lambda key, value: decode_image(value, row=key, budget=budget))
    size = segmenter.batch_size
    max_mask_pixels = settings.MAX_MASK_PIXELS.value()
    batch: list[tuple[Any, np.ndarray]] = []
    for key, value in items:
        try:
            _check_deadline(deadline)
            image = decode(key, value)
            _check_work(segmenter, image, params, max_mask_pixels, key)
            batch.append((key, image))
        except InputError as err:
            if on_error == "raise":
                raise
            yield Scored(key, error=err)
            continue
        if len(batch) == size:
            _check_deadline(deadline)
            yield from _score_batch(segmenter, batch, params, encode, keep_images, deadline)
            batch = []
    if batch:
        _check_deadline(deadline)
        yield from _score_batch(segmenter, batch, params, encode, keep_images, deadline)


def _check_deadline(deadline: Deadline | None) -> None:
    if deadline is not None and deadline.passed():
        raise InputError(f"the request {deadline.what}; send fewer or smaller images per request")


class _MasksWithinDeadline:
    """An image's masks, checking the request's deadline before each one: encoding thousands of
    masks (score_threshold 0, max_detections 10000 on a 700x700 image took 6 minutes) happens
    after the forward pass, so the checks between passes alone let it outlive its request."""

    def __init__(self, masks, deadline: Deadline):
        self.masks = masks
        self.deadline = deadline

    def __len__(self) -> int:
        return len(self.masks)

    def iter_masks(self, threshold: float) -> Iterator[np.ndarray]:
        for mask in self.masks.iter_masks(threshold):
            _check_deadline(self.deadline)
            yield mask

    def iter_windows(self, threshold: float):
        windows = getattr(self.masks, "iter_windows", None)
        if windows is None:
            yield from (MaskWindow.whole(mask) for mask in self.iter_masks(threshold))
            return
        for window in windows(threshold):
            _check_deadline(self.deadline)
            yield window


def _check_work(segmenter: Segmenter, image: np.ndarray, params: PredictParams,
                max_mask_pixels: int, key) -> None:
    """Refuse, before the model runs, what it cannot take or what would cost too much."""
    problem = segmenter.image_problem(image)
    if problem:
        raise InputError(problem, row=key)
    height, width = image.shape[:2]
    if params.mask_format == "none":
        return  # no mask is made: the mask work is nothing
    if params.max_detections * width * height > max_mask_pixels:
        raise InputError(
            f"max_detections {params.max_detections} x {width}x{height} pixels = "
            f"{params.max_detections * width * height} mask pixels, over the limit of "
            f"{max_mask_pixels} ({settings.MAX_MASK_PIXELS.env}); lower max_detections or send a "
            f"smaller image", row=key)


def _segment(segmenter: Segmenter, images: list[np.ndarray], params: PredictParams,
             deadline: Deadline | None) -> Iterator[ImageDetections]:
    """The batch's detections: one pass of the segmenter's batches, or, with tiling, each
    picture's tiles and whole picture (scoring.tiling), checking the deadline between pictures."""
    if not params.tile_grid:
        yield from segmenter(images, params)
        return
    for image in images:
        _check_deadline(deadline)
        yield segment_tiled(segmenter, image, params)


def _score_batch(segmenter, batch, params, encode, keep_images, deadline=None) -> Iterator[Scored]:
    images = [image for _, image in batch]
    for (key, image), detections in zip(batch, _segment(segmenter, images, params, deadline)):
        if deadline is not None:
            detections = replace(detections, masks=_MasksWithinDeadline(detections.masks, deadline))
        yield Scored(key, response=encode(detections, params),
                     image=image if keep_images else None,
                     detections=detections if keep_images else None)
