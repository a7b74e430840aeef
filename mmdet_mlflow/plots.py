"""Evaluation pictures: precision-recall curves per label (from COCOeval's own precision array)
and a grid of sample images, ground truth beside predictions (drawn by visualize.draw_detections,
the one drawing function)."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

PANEL_HEIGHT = 320
HEADER = 28


def pr_curves(segm_eval, at_threshold_eval, per_label: dict, path: Path) -> Path:
    """One panel per label with ground truth: mask precision over recall at IoU 0.50 and 0.75,
    the mean over COCO's IoU thresholds 0.50:0.95, the curve at ``iou_threshold``, and the
    operating point at ``box_score_threshold``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    params = segm_eval.params
    recall = params.recThrs
    precision = segm_eval.eval["precision"][:, :, :, 0, -1]  # (IoU, recall, label), all areas, 100 dets
    chosen = at_threshold_eval.eval["precision"][0, :, :, 0, 0]
    iou_threshold = float(at_threshold_eval.params.iouThrs[0])
    names = [segm_eval.cocoGt.cats[c]["name"] for c in params.catIds]
    shown = [k for k, name in enumerate(names) if per_label[name]["ground_truth"] > 0]
    columns = min(4, max(1, len(shown)))
    rows = max(1, math.ceil(len(shown) / columns))
    fig, axes = plt.subplots(rows, columns, figsize=(3.6 * columns, 3.3 * rows), squeeze=False)
    for ax in axes.ravel()[len(shown):]:
        ax.axis("off")
    for ax, k in zip(axes.ravel(), shown):
        name = names[k]
        for t, style in ((0.5, "-"), (0.75, "--")):
            index = int(np.argmin(np.abs(params.iouThrs - t)))
            ax.plot(recall, np.clip(precision[index, :, k], 0, 1), style, lw=1.4, label=f"IoU {t:.2f}")
        ax.plot(recall, np.clip(precision[:, :, k].mean(axis=0), 0, 1), ":", lw=1.6,
                label="mean IoU .50:.95")
        if not any(np.isclose(iou_threshold, t) for t in (0.5, 0.75)):
            ax.plot(recall, np.clip(chosen[:, k], 0, 1), "-", lw=1.0, label=f"IoU {iou_threshold:.2f}")
        m = per_label[name]
        if m["precision"] >= 0:
            ax.plot([m["recall"]], [m["precision"]], "o", color="black", ms=5,
                    label=f"at score threshold (IoU {iou_threshold:.2f})")
        ap = m["average_precision"]
        ax.set_title(f"{name}  AP@{iou_threshold:.2f} {ap:.3f}  (n={m['ground_truth']})", fontsize=9)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("recall", fontsize=8)
        ax.set_ylabel("precision", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    if shown:
        axes.ravel()[0].legend(fontsize=7, loc="lower left")
    fig.suptitle("Mask precision-recall per label (COCOeval, all areas, 100 detections)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def sample_grid(samples, box_score_threshold: float, path: Path) -> Path:
    """One row per sample: ground truth | predictions at ``box_score_threshold``. ``samples``:
    (file name, BGR image, ground-truth response boxes, predicted response boxes)."""
    import cv2

    from mmdet_mlflow.visualize import draw_detections

    rows = []
    for name, image, truth, predicted in samples:
        panels = [_panel(draw_detections(image, truth), f"{name}: ground truth ({len(truth)})"),
                  _panel(draw_detections(image, predicted),
                         f"predictions, score >= {box_score_threshold:g} ({len(predicted)})")]
        rows.append(np.hstack([panels[0], np.full((panels[0].shape[0], 6, 3), 255, np.uint8), panels[1]]))
    if not rows:
        rows = [np.full((HEADER, 400, 3), 255, np.uint8)]
    width = max(r.shape[1] for r in rows)
    padded = [np.pad(r, ((0, 6), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in rows]
    cv2.imwrite(str(path), np.vstack(padded))
    return path


def _panel(image: np.ndarray, title: str) -> np.ndarray:
    import cv2

    scale = PANEL_HEIGHT / image.shape[0]
    resized = cv2.resize(image, (max(1, round(image.shape[1] * scale)), PANEL_HEIGHT),
                         interpolation=cv2.INTER_AREA)
    header = np.full((HEADER, resized.shape[1], 3), 255, np.uint8)
    cv2.putText(header, title, (6, HEADER - 9), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    return np.vstack([header, resized])
