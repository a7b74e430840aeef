"""The one runner: images in, responses out, ``decode -> batch -> predictor -> encode``.

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
- limits (``scoring.work``): a served request has a ``deadline`` for its work (checked between
  forward passes, merge steps and masks, so a request that ran out of time stops instead of
  holding the worker) and a ``budget`` for its image URLs together (time spent fetching only);
  a batch job (``on_error="yield"``) gives each picture a deadline of its own instead, and a
  picture past it becomes an error row while the job goes on.

Every image is checked before it reaches the model (``scoring.work.check_work``): it must
survive the model's resize, its worst-case mask work and a tiled picture's merge must be within
their limits. The ``classes`` param is checked against the model's classes before the first image.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from scoring.class_filter import check_classes
from scoring.decode import decode_image
from scoring.encode import encode_detections
from scoring.errors import InputError
from scoring.fetch import Deadline, FetchBudget
from scoring.runtimes.base import ImageDetections, Predictor
from scoring.runtimes.masks import MaskWindow
from scoring.schema import PredictParams, check_task_params
from scoring.tiling import segment_tiled, tiles_for
from scoring.work import check_deadline, check_work, picture_deadline

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


def predict_params(predictor: Predictor, values: PredictParams | dict | None) -> PredictParams:
    """A call's predict params: the model's defaults updated with ``values`` (PredictParams are
    taken as they are), refusing what the model's task does not take (mask params of a box-only
    model), so that a batch job fails at its start as a request fails at once."""
    if isinstance(values, PredictParams):
        return values
    check_task_params(predictor.task, values)  # mask params of a box-only model: refused
    return predictor.default_params.updated(values)


def score_images(predictor: Predictor, items: Iterable[tuple[Any, Any]],
                 params: PredictParams | dict | None = None, *, encode: Encoder = encode_detections,
                 on_error: str = "raise", keep_images: bool = False,
                 decode: Callable[[Any, Any], np.ndarray] | None = None,
                 deadline: Deadline | None = None,
                 budget: FetchBudget | None = None) -> Iterator[Scored]:
    """Score ``items`` in order, the predictor's ``batch_size`` images per forward pass.

    ``params`` are this call's predict params (a dict is checked against the model's defaults).
    ``decode(key, value)`` overrides how a value becomes a BGR image (default: the one decoder,
    fetching URLs within ``budget``). ``deadline``: stop with an InputError once it has passed.
    """
    if on_error not in ("raise", "yield"):
        raise ValueError(f"on_error must be 'raise' or 'yield', not {on_error!r}")
    params = predict_params(predictor, params)
    check_task_params(predictor.task, {"mask_format": params.mask_format})
    check_classes(predictor.class_names, params)  # an unknown class name: refused before any work
    decode = decode or (lambda key, value: decode_image(value, row=key, budget=budget))
    job = _Job(predictor, params, encode, keep_images, deadline, on_error)
    batch: list[tuple[Any, np.ndarray]] = []
    for key, value in items:
        try:
            check_deadline(deadline)
            image = decode(key, value)
            check_work(predictor, image, params, len(tiles_for(image.shape[:2], params)), key)
            batch.append((key, image))
        except InputError as err:
            if on_error == "raise":
                raise
            yield Scored(key, error=err)
            continue
        if len(batch) == predictor.batch_size:
            check_deadline(deadline)
            yield from job.score(batch)
            batch = []
    if batch:
        check_deadline(deadline)
        yield from job.score(batch)


@dataclass
class _Job:
    """How one call scores its batches: the same params, encoder and limits for each."""

    predictor: Predictor
    params: PredictParams
    encode: Encoder
    keep_images: bool
    deadline: Deadline | None  # the request's, when it is one
    on_error: str

    def score(self, batch: list[tuple[Any, np.ndarray]]) -> Iterator[Scored]:
        """A batch's answers: with tiling, picture by picture (the whole picture and its tiles,
        merged); without, the batch in the predictor's passes. Each picture's work is bounded by
        its deadline: the request's, or in a batch job its own from when its work starts."""
        if self.params.tile_grid:
            for key, image in batch:
                deadline = self._picture_deadline()
                yield self._scored(key, image, deadline, lambda: segment_tiled(
                    self.predictor, image, self.params, deadline))
            return
        deadlines = [self._picture_deadline() for _ in batch]
        found = self.predictor([image for _, image in batch], self.params)
        for (key, image), detections, deadline in zip(batch, found, deadlines):
            yield self._scored(key, image, deadline, lambda: detections)

    def _picture_deadline(self) -> Deadline | None:
        return self.deadline if self.on_error == "raise" else picture_deadline(self.deadline)

    def _scored(self, key, image: np.ndarray, deadline: Deadline | None,
                detect: Callable[[], ImageDetections]) -> Scored:
        try:
            detections = detect()
            check_deadline(deadline, "(after the network's passes)")
            if deadline is not None and detections.masks is not None:
                detections = replace(detections, masks=_MasksWithinDeadline(detections.masks, deadline))
            response = self.encode(detections, self.params)
        except InputError as err:
            if self.on_error == "raise":
                raise
            return Scored(key, error=err.for_row(key) if err.row is None else err)
        return Scored(key, response=response, image=image if self.keep_images else None,
                      detections=detections if self.keep_images else None)


class _MasksWithinDeadline:
    """An image's masks, checking the deadline before each one: encoding thousands of masks
    happens after the forward passes, so the checks between passes alone would let it outlive
    its request."""

    def __init__(self, masks, deadline: Deadline):
        self.masks = masks
        self.deadline = deadline

    def __len__(self) -> int:
        return len(self.masks)

    def iter_masks(self, threshold: float) -> Iterator[np.ndarray]:
        for mask in self.masks.iter_masks(threshold):
            check_deadline(self.deadline, "(making masks)")
            yield mask

    def iter_windows(self, threshold: float):
        windows = getattr(self.masks, "iter_windows", None)
        if windows is None:
            yield from (MaskWindow.whole(mask) for mask in self.iter_masks(threshold))
            return
        for window in windows(threshold):
            check_deadline(self.deadline, "(making masks)")
            yield window
