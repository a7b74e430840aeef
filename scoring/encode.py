"""The one encoder: detections -> the model card's response, ``{"boxes": [...]}`` per image."""
from __future__ import annotations

from typing import Callable

import cv2
import numpy as np

from scoring.rle import encode_window as encode_rle_window
from scoring.runtimes.base import ImageDetections
from scoring.schema import OUTPUT_COLUMN, PredictParams, detection_record

# Normalized coordinates keep 5 decimals: under 0.05 px on a 10,000-pixel side.
DECIMALS = 5


def mask_polygons(mask: np.ndarray, tolerance: float,
                  offset: tuple[int, int] = (0, 0)) -> list[np.ndarray]:
    """Outer contours of a boolean mask as (K, 2) pixel-coordinate arrays, one per connected
    part, the largest part (by contour area) first; simplified by Douglas-Peucker at
    ``tolerance`` pixels (0 = the exact contour, with straight runs stored by their end points);
    parts under 3 points are dropped. Holes are lost (outer contours only: a ring comes back as
    a disc); ``mask_format="rle"`` keeps them. ``offset`` (x0, y0): where the mask's top-left
    pixel sits in the picture (a ``MaskWindow``'s)."""
    if mask.size == 0:
        return []
    contours, _ = cv2.findContours(
        np.ascontiguousarray(mask, dtype=np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE,
        offset=(int(offset[0]), int(offset[1])),
    )
    if len(contours) > 1:
        # largest first, as users drawing "the" polygon take the first; ties keep OpenCV's order
        contours = sorted(contours, key=cv2.contourArea, reverse=True)
    out = []
    for contour in contours:
        if tolerance > 0:
            contour = cv2.approxPolyDP(contour, tolerance, True)
        if len(contour) >= 3:
            out.append(contour.reshape(-1, 2))
    return out


def normalized_segments(polygons: list[np.ndarray], image_size) -> list[list[float]]:
    """Pixel polygons -> ``[x0, y0, x1, y1, ...]`` lists normalized by the image size."""
    width, height = image_size
    scale = np.array([width, height], dtype=np.float64)
    return [np.round(p / scale, DECIMALS).ravel().tolist() for p in polygons]


def encode_detections(detections: ImageDetections, params: PredictParams,
                      on_mask: Callable[[np.ndarray], None] | None = None) -> dict:
    """One image's response entry, each detection's mask as ``params.mask_format`` asks. Masks
    are made and encoded one at a time, each over its window (``ImageDetections.iter_windows``);
    ``on_mask`` sees each full-size mask as it goes by (evaluation keeps its RLE: made once, used
    twice). With ``mask_format="none"`` no mask is made at all (``on_mask`` is never called)."""
    if params.mask_format == "none" and on_mask is None:
        return {OUTPUT_COLUMN: [
            detection_record(detections.boxes[i], detections.image_size, detections.label_name(i),
                             detections.scores[i])
            for i in range(len(detections))]}
    records = []
    for i, window in enumerate(detections.iter_windows(params.mask_threshold)):
        if on_mask is not None:
            on_mask(window.full())
        polygons = rle = None
        if params.mask_format == "polygon":
            polygons = normalized_segments(
                mask_polygons(window.pixels, params.polygon_tolerance, window.offset),
                detections.image_size)
        elif params.mask_format == "rle":
            rle = encode_rle_window(window.pixels, window.offset, window.image_hw)
        records.append(
            detection_record(
                detections.boxes[i],
                detections.image_size,
                detections.label_name(i),
                detections.scores[i],
                polygons,
                rle,
            )
        )
    return {OUTPUT_COLUMN: records}
