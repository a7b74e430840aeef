"""Predict on image files with a saved model: one JSON line per image, optional pictures."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Iterable

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif"}


def image_files(path: Path):
    """The image itself, or every entry of a folder (recursively) named as a picture, each
    with its problem (``scoring.batch_files.input_entries``: a FIFO, a symlink loop, ... is an
    error line, never a silent gap), sorted; hidden names are skipped and counted."""
    from scoring.batch_files import input_entries

    return input_entries(path, wanted=lambda name: Path(name).suffix.lower() in IMAGE_SUFFIXES)


def picture_paths(names: Iterable[str]) -> dict[str, Path]:
    """Where ``--visualize`` draws each input (named relative to the input folder): the same
    sub-folders, the suffix made .png (``a/1.jpg`` -> ``a/1.png``, so ``a/1.jpg`` and ``b/1.jpg``
    stay apart); where two inputs would share a picture (``1.jpg`` and ``1.png``), the later
    keeps its whole name (``1.png.png``)."""
    taken: set[Path] = set()
    out = {}
    for name in names:
        picture = Path(name).with_suffix(".png")
        if picture in taken:
            picture = Path(name + ".png")
        taken.add(picture)
        out[name] = picture
    return out


def predict_files(model_dir: Path, files: Iterable[Path], output: Path,
                  params: dict | None = None, visualize_dir: Path | None = None,
                  root: Path | None = None) -> dict:
    """Score ``files`` (paths, or ``image_files``' entries) through the one runner; a file that
    cannot be read gets an ``error`` line instead of stopping the run, as in batch scoring.
    Files are named relative to ``root`` (the input folder) in pictures. Returns counts."""
    from tqdm import tqdm

    import mlflow_model
    from scoring import settings
    from scoring.batch_files import file_name, read_image_file
    from scoring.class_filter import check_classes
    from scoring.runner import predict_params, score_images
    from scoring.schema import OUTPUT_COLUMN

    files = list(files)
    mlflow_model.checked_predict_params(model_dir, params)  # a bad param: refused before the load
    predictor = mlflow_model.load_saved_predictor(model_dir)
    params = predict_params(predictor, params)  # mask params of a box-only model: refused here,
    check_classes(predictor.class_names, params)  # and unknown classes, before anything is written
    if visualize_dir:
        import cv2

        from mmdet_mlflow.visualize import draw_detections

        visualize_dir.mkdir(parents=True, exist_ok=True)
        pictures = picture_paths([file_name(path, root) for path in files])
    output.parent.mkdir(parents=True, exist_ok=True)
    counts = {"images": 0, "errors": 0, "detections": 0}
    items = ((path, path) for path in files)
    # the model's model_config is active while it scores, as when MLflow serves it
    with settings.using(predictor.model_config), open(output, "w") as out, \
            tqdm(total=len(files), unit="img", desc="predict", file=sys.stderr, disable=None) as bar:
        for scored in score_images(predictor, items, params, on_error="yield",
                                   keep_images=bool(visualize_dir),
                                   decode=lambda path, _: read_image_file(path, row=str(path))):
            path = scored.key
            if not scored.ok:
                out.write(json.dumps({"file": str(path), "error": str(scored.error)}) + "\n")
                counts["errors"] += 1
            else:
                boxes = scored.response[OUTPUT_COLUMN]
                out.write(json.dumps({"file": str(path), OUTPUT_COLUMN: boxes}) + "\n")
                counts["images"] += 1
                counts["detections"] += len(boxes)
                if visualize_dir:
                    picture = visualize_dir / pictures[file_name(path, root)]
                    picture.parent.mkdir(parents=True, exist_ok=True)
                    cv2.imwrite(str(picture), draw_detections(scored.image, boxes))
            out.flush()
            bar.update(1)
    return counts
