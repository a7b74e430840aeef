"""Pictures of predictions: the public response (normalized boxes, and polygons or COCO RLE masks
as ``mask_format`` asked, or boxes alone) drawn on the image, so anything that has a response
(CLI, servers, evaluation) draws the same way."""
from __future__ import annotations

import colorsys
import zlib

import cv2
import numpy as np


def label_color(label: str) -> tuple[int, int, int]:
    """A stable, distinct BGR colour per label."""
    hue = (zlib.crc32(label.encode()) % 360) / 360.0
    r, g, b = colorsys.hsv_to_rgb(hue, 0.75, 1.0)
    return int(b * 255), int(g * 255), int(r * 255)


def draw_detections(image_bgr: np.ndarray, boxes: list[dict], alpha: float = 0.45) -> np.ndarray:
    """A copy of the image with each detection's mask filled and outlined (its polygons, or its
    RLE with any holes; nothing for boxes alone), its box and 'label score' ('label' alone for a
    box without a score: ground truth)."""
    height, width = image_bgr.shape[:2]
    scale = np.array([width, height], dtype=np.float64)
    overlay = image_bgr.copy()
    out = image_bgr.copy()
    outlines = []  # per detection: pixel outlines to draw over the blend
    for det in boxes:
        color = label_color(det["label"])
        polygons = [np.round(np.asarray(seg, dtype=np.float64).reshape(-1, 2) * scale).astype(np.int32)
                    for seg in det.get("polygon") or []]
        filled = [p for p in polygons if len(p) >= 3]
        if filled:
            cv2.fillPoly(overlay, filled, color)
        mask = rle_mask(det.get("rle"), width, height)
        if mask is not None:
            overlay[mask] = color
            # outer outlines and the holes' (RETR_CCOMP): an RLE keeps holes, the picture shows them
            contours, _ = cv2.findContours(mask.view(np.uint8), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
            polygons += [c.reshape(-1, 2) for c in contours]
        outlines.append(polygons)
    cv2.addWeighted(overlay, alpha, out, 1 - alpha, 0, dst=out)
    thickness = max(1, round(min(width, height) / 400))
    font_scale = max(0.4, min(width, height) / 1000)
    for det, polygons in zip(boxes, outlines):
        color = label_color(det["label"])
        b = det["box"]
        p1 = (int(round(b["topX"] * width)), int(round(b["topY"] * height)))
        p2 = (int(round(b["bottomX"] * width)), int(round(b["bottomY"] * height)))
        cv2.rectangle(out, p1, p2, color, thickness)
        for pts in polygons:
            cv2.polylines(out, [pts], True, color, thickness)
        # A prediction is tagged 'label score'; ground truth (no score) with its label alone.
        text = f"{det['label']} {det['score']:.2f}" if det.get("score") is not None else det["label"]
        (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, font_scale, thickness)
        y = max(p1[1], th + base)
        cv2.rectangle(out, (p1[0], y - th - base), (p1[0] + tw, y), color, -1)
        cv2.putText(out, text, (p1[0], y - base), cv2.FONT_HERSHEY_SIMPLEX, font_scale,
                    (0, 0, 0), thickness, cv2.LINE_AA)
    return out


def rle_mask(rle: dict | None, width: int, height: int) -> np.ndarray | None:
    """A detection's ``rle`` as a boolean mask of the picture's size (None without one). An RLE
    made for another size (a picture drawn smaller than it was scored) is resized to fit."""
    if not rle:
        return None
    from scoring.rle import decode

    mask = decode(rle)
    if mask.shape != (height, width):
        mask = cv2.resize(mask.view(np.uint8), (width, height), interpolation=cv2.INTER_NEAREST).astype(bool)
    return mask
