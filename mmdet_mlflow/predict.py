"""Predict on image files with a saved model: one JSON line per image, optional pictures."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Iterable

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif"}


def image_files(path: Path) -> list[Path]:
    """The image itself, or the images in a folder (recursively), sorted."""
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is neither an image file nor a folder")
    return sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def predict_files(model_dir: Path, files: Iterable[Path], output: Path,
                  params: dict | None = None, visualize_dir: Path | None = None) -> dict:
    """Score ``files`` in batches; a file that cannot be read gets an ``error`` line instead of
    stopping the run. Returns counts."""
    from tqdm import tqdm

    import mlflow_model
    from scoring.decode import decode_image
    from scoring.encode import encode_detections
    from scoring.errors import InputError
    from scoring.schema import OUTPUT_COLUMN

    files = list(files)
    segmenter = mlflow_model.load_segmenter(Path(model_dir) / mlflow_model.MODEL_DATA_DIR)
    predict_params = segmenter.default_params.updated(params)
    if visualize_dir:
        from mmdet_mlflow.visualize import draw_detections
        import cv2

        visualize_dir.mkdir(parents=True, exist_ok=True)
    output.parent.mkdir(parents=True, exist_ok=True)
    counts = {"images": 0, "errors": 0, "detections": 0}
    with open(output, "w") as out, tqdm(total=len(files), unit="img", desc="predict",
                                        file=sys.stderr, disable=None) as bar:
        for start in range(0, len(files), segmenter.batch_size):
            batch, images = [], []
            for path in files[start:start + segmenter.batch_size]:
                try:
                    images.append(decode_image(path.read_bytes(), row=str(path)))
                    batch.append(path)
                except InputError as err:
                    out.write(json.dumps({"file": str(path), "error": str(err)}) + "\n")
                    counts["errors"] += 1
            for path, image, dets in zip(batch, images, segmenter(images, predict_params)):
                boxes = encode_detections(dets, predict_params)[OUTPUT_COLUMN]
                out.write(json.dumps({"file": str(path), OUTPUT_COLUMN: boxes}) + "\n")
                counts["images"] += 1
                counts["detections"] += len(boxes)
                if visualize_dir:
                    cv2.imwrite(str(visualize_dir / f"{path.stem}.png"), draw_detections(image, boxes))
            out.flush()
            bar.update(len(files[start:start + segmenter.batch_size]))
    return counts
