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
  that also keeps each mask's RLE (see ``mmdet_mlflow.evaluate``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from scoring.decode import decode_image
from scoring.encode import encode_detections
from scoring.errors import InputError
from scoring.runtimes.base import ImageDetections, Segmenter
from scoring.schema import PredictParams

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
                 batch_size: int | None = None) -> Iterator[Scored]:
    """Score ``items`` in order, ``batch_size`` (default: the segmenter's) images per forward pass.

    ``params`` are this call's predict params (a dict is checked against the model's defaults).
    ``decode(key, value)`` overrides how a value becomes a BGR image (default: the one decoder).
    """
    if on_error not in ("raise", "yield"):
        raise ValueError(f"on_error must be 'raise' or 'yield', not {on_error!r}")
    if not isinstance(params, PredictParams):
        params = segmenter.default_params.updated(params)
    decode = decode or _decode
    size = batch_size or segmenter.batch_size
    batch: list[tuple[Any, np.ndarray]] = []
    for key, value in items:
        try:
            batch.append((key, decode(key, value)))
        except InputError as err:
            if on_error == "raise":
                raise
            yield Scored(key, error=err)
            continue
        if len(batch) == size:
            yield from _score_batch(segmenter, batch, params, encode, keep_images)
            batch = []
    if batch:
        yield from _score_batch(segmenter, batch, params, encode, keep_images)


def _decode(key, value) -> np.ndarray:
    return decode_image(value, row=key)


def _score_batch(segmenter, batch, params, encode, keep_images) -> Iterator[Scored]:
    images = [image for _, image in batch]
    for (key, image), detections in zip(batch, segmenter(images, params)):
        yield Scored(key, response=encode(detections, params),
                     image=image if keep_images else None,
                     detections=detections if keep_images else None)
