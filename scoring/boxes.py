"""Box overlap, the one definition every comparison of boxes uses (tiling's merge, the packaging
checks of a cheaper precision): boxes are (x1, y1, x2, y2), any units, x2 >= x1 and y2 >= y1."""
from __future__ import annotations

from typing import Sequence

Box = Sequence[float]


def intersection(a: Box, b: Box) -> float:
    width = min(a[2], b[2]) - max(a[0], b[0])
    height = min(a[3], b[3]) - max(a[1], b[1])
    return max(0.0, float(width)) * max(0.0, float(height))


def area(box: Box) -> float:
    return max(0.0, float(box[2] - box[0])) * max(0.0, float(box[3] - box[1]))


def box_iou(a: Box, b: Box) -> float:
    """Intersection over union (0 for two empty boxes)."""
    inter = intersection(a, b)
    union = area(a) + area(b) - inter
    return inter / union if union > 0 else 0.0
