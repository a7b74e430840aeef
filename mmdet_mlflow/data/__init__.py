"""Instance-segmentation and object-detection datasets: Azure AutoML JSONL, MLTable folders and
COCO JSON, read into one in-memory form (pixel polygons, or boxes alone), validated before
training and written back in any format.

    problems.py   DataError (every problem found, each naming file, line or record, field)
    dataset.py    Dataset / ImageRecord / Instance, the one in-memory form; Dataset.task
    paths.py      where an image reference points, and where it may point (read its docstring)
    validation.py image files, sizes, polygons, boxes, labels
    jsonl.py, mltable.py, coco.py   one format each: reading and writing
    formats.py    load_dataset (any format, told apart by content) and convert
"""
from mmdet_mlflow.data.coco import to_coco, write_coco
from mmdet_mlflow.data.dataset import (INSTANCE_SEGMENTATION, OBJECT_DETECTION, TASKS, Dataset, ImageRecord, Instance,
                                       response_boxes, spread_indices)
from mmdet_mlflow.data.formats import convert, load_dataset
from mmdet_mlflow.data.jsonl import to_jsonl_rows, write_jsonl
from mmdet_mlflow.data.mltable import MLTABLE_FILE, write_mltable
from mmdet_mlflow.data.problems import MAX_REPORTED_PROBLEMS, DataError

__all__ = ["DataError", "Dataset", "INSTANCE_SEGMENTATION", "ImageRecord", "Instance", "MAX_REPORTED_PROBLEMS",
           "MLTABLE_FILE", "OBJECT_DETECTION", "TASKS",
           "convert", "load_dataset", "response_boxes", "spread_indices", "to_coco", "to_jsonl_rows", "write_coco",
           "write_jsonl", "write_mltable"]
