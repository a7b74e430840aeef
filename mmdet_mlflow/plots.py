"""The pictures we write: evaluation's precision-recall curves per label (from COCOeval's own
precision array) and its grid of sample images, ground truth beside predictions (drawn by
visualize.draw_detections, the one drawing function), and fine-tuning's loss/metric curves.
Each is written atomically (mmdet_mlflow.files): a reader never sees half a PNG."""
from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np

from mmdet_mlflow.files import atomic_write
from mmdet_mlflow.visualize import draw_detections

PANEL_HEIGHT = 320
HEADER = 28


def pr_curves(coco_eval, at_threshold_eval, per_label: dict, path: Path) -> Path:
    """One panel per label with ground truth: mask precision (box precision, of a bbox
    ``coco_eval``) over recall at IoU 0.50 and 0.75, the mean over COCO's IoU thresholds
    0.50:0.95, the curve at ``iou_threshold``, and the operating point at ``box_score_threshold``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    params = coco_eval.params
    recall = params.recThrs
    precision = coco_eval.eval["precision"][:, :, :, 0, -1]  # (IoU, recall, label), all areas, 100 dets
    chosen = at_threshold_eval.eval["precision"][0, :, :, 0, 0]
    iou_threshold = float(at_threshold_eval.params.iouThrs[0])
    names = [coco_eval.cocoGt.cats[c]["name"] for c in params.catIds]
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
    what = "Mask" if params.iouType == "segm" else "Box"
    fig.suptitle(f"{what} precision-recall per label (COCOeval, all areas, 100 detections)", fontsize=10)
    return _save_figure(fig, path)


def sample_grid(samples, box_score_threshold: float, path: Path) -> Path:
    """One row per sample: ground truth | predictions at ``box_score_threshold``. ``samples``:
    (file name, BGR image, ground-truth response boxes, predicted response boxes)."""
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
    return write_image(path, np.vstack(padded))


def write_image(path: Path, image: np.ndarray) -> Path:
    """A BGR image as a file in the format its suffix names (.png, .jpg), atomically."""
    ok, encoded = cv2.imencode(Path(path).suffix, image)
    if not ok:
        raise ValueError(f"OpenCV cannot encode an image as {Path(path).suffix}")
    return atomic_write(path, lambda tmp: tmp.write_bytes(encoded.tobytes()))


def _save_figure(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    finally:
        plt.close(fig)


def _panel(image: np.ndarray, title: str) -> np.ndarray:
    scale = PANEL_HEIGHT / image.shape[0]
    resized = cv2.resize(image, (max(1, round(image.shape[1] * scale)), PANEL_HEIGHT),
                         interpolation=cv2.INTER_AREA)
    header = np.full((HEADER, resized.shape[1], 3), 255, np.uint8)
    cv2.putText(header, title, (6, HEADER - 9), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    return np.vstack([header, resized])


def training_curves(steps: list[dict], epochs: list[dict], path: Path, metrics: list[str]) -> Path:
    """Fine-tuning's loss per step (raw and smoothed) beside the validation ``metrics`` per epoch
    (names as docs/metrics.md lists them), as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(11, 4))
    if steps:
        x = np.array([s["step"] for s in steps])
        for key, color in (("loss", "tab:blue"), ("loss_cls", "tab:orange"),
                           ("loss_bbox", "tab:green"), ("loss_mask", "tab:red")):
            y = np.array([s.get(key, np.nan) for s in steps], dtype=float)
            if np.isnan(y).all():
                continue
            window = max(1, min(25, len(y) // 10))
            smooth = np.convolve(np.nan_to_num(y), np.ones(window) / window, mode="valid")
            if key == "loss":
                ax_loss.plot(x, y, color=color, alpha=0.25, linewidth=0.8)
            ax_loss.plot(x[window - 1:], smooth, color=color, label=key)
        ax_loss.set_xlabel("step")
        ax_loss.set_ylabel("training loss")
        ax_loss.legend()
        ax_loss.grid(alpha=0.3)
    if epochs:
        x = [e["epoch"] for e in epochs]
        for key, style in zip(metrics, ("o-", "s--", "^:", "d-.")):
            values = [e.get(key) for e in epochs]
            if any(v is not None for v in values):
                ax_metric.plot(x, [np.nan if v is None else v for v in values], style, label=key)
        ax_metric.set_xlabel("epoch")
        ax_metric.set_ylabel("validation (docs/metrics.md)")
        ax_metric.set_ylim(bottom=0)
        ax_metric.legend()
        ax_metric.grid(alpha=0.3)
    fig.suptitle("fine-tuning")
    return _save_figure(fig, path)
