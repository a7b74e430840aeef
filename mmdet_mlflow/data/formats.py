"""Reading any supported format (told apart by content) and converting between them."""
from __future__ import annotations

import json
from pathlib import Path

from mmdet_mlflow.data.coco import load_coco, write_coco
from mmdet_mlflow.data.dataset import Dataset
from mmdet_mlflow.data.jsonl import load_jsonl_files, write_jsonl
from mmdet_mlflow.data.mltable import is_mltable, mltable_jsonl_paths, write_mltable
from mmdet_mlflow.data.problems import DataError


def load_dataset(path, classes: list[str] | None = None, validate: bool = True,
                 confine_images: bool = False) -> Dataset:
    """Read AutoML JSONL, an MLTable folder (or its ``MLTable`` file) or COCO instances JSON,
    told apart by content. ``classes`` fixes the class order (and refuses other labels); by
    default COCO's category order, or the sorted unique labels of JSONL. ``validate`` also opens
    every image (header only) to check it exists, decodes and has the stated size; the
    annotation checks (labels, polygons) always run. ``confine_images`` refuses image paths
    outside the folder of the annotation file (see ``mmdet_mlflow.data.paths``). Raises
    ``DataError`` listing all problems."""
    path = Path(path).expanduser().absolute()
    if is_mltable(path):
        return load_jsonl_files(mltable_jsonl_paths(path), classes, validate, source=path,
                                confine_images=confine_images)
    if not path.is_file():
        raise DataError(f"{path}: no such file or folder")
    if _sniff(path) == "coco":
        return load_coco(path, classes, validate, confine_images)
    return load_jsonl_files([path], classes, validate, source=path, confine_images=confine_images)


def _sniff(path: Path) -> str:
    """'coco' for a JSON document with ``images``, else 'jsonl'."""
    if path.suffix.lower() == ".jsonl":
        return "jsonl"
    with open(path, "rb") as f:
        head = f.read(1 << 16)
    text = head.decode("utf-8", errors="replace").lstrip()
    if not text.startswith("{"):
        raise DataError(f"{path}: line 1: not JSON (expected a COCO JSON object or JSON lines)")
    first_line = text.split("\n", 1)[0]
    try:
        first = json.loads(first_line)
        # A one-line JSON document is JSONL if it looks like an AutoML record.
        return "jsonl" if isinstance(first, dict) and "image_url" in first else "coco"
    except json.JSONDecodeError:
        return "coco"  # a multi-line (pretty-printed) JSON document


def convert(input_path, output_path, classes: list[str] | None = None, validate: bool = True,
            confine_images: bool = False) -> Dataset:
    """Read any supported format and write ``output_path``: ``.jsonl`` -> AutoML JSONL,
    ``.json`` -> COCO, anything else -> an MLTable folder holding ``data.jsonl``."""
    dataset = load_dataset(input_path, classes=classes, validate=validate, confine_images=confine_images)
    output = Path(output_path).absolute()
    suffix = output.suffix.lower()
    if suffix == ".jsonl":
        write_jsonl(dataset, output)
    elif suffix == ".json":
        write_coco(dataset, output)
    else:
        jsonl = output / "data.jsonl"
        write_jsonl(dataset, jsonl)
        write_mltable(output, jsonl)
    return dataset
