"""Fine-tuning benchmark of every model family (not a test): a short fine-tune of each family's
measured config (bench/families.py's CONFIGS) on a small synthetic data set, through our real
``finetune`` (the config's own recipe, scaled to the data, the input size and the steps; MLflow
tracking; the exported MLflow model), and what it reached.

Each family starts from a checkpoint in mmdet's published layout with random weights for the 80
COCO classes (tests/helpers.make_official_checkpoint, untouched biases): the fine-tune
re-initialises its class-shaped layers for the synthetic classes, as it would a real COCO
checkpoint's. There are no COCO weights here, so this is training from scratch: the numbers say
that each family trains end to end on CPU and how fast, not what it reaches when pretrained.

Object-detection families train on ``synth --task object-detection`` data, instance-segmentation
families (RTMDet-Ins, Mask R-CNN) on ``synth``'s instance-segmentation data (the same pictures).
Per family: its task, config, training/validation images, epochs, steps, wall minutes, the
last epoch's box mAP@[.5:.95] (and mask mAP for instance segmentation) on the validation set,
the written model's task (read back from the MLflow model) and how many boxes it answers for one
validation picture at score threshold 0 (it predicts).

Only results go to stdout (mmengine's logs, warnings and a progress line per family go to
stderr). Each run records its families' results in the work folder (``results.json``) and prints
the table of every family recorded there, so families may run one per process (e.g. each under
its own ``flock``) and the last run prints them all.

    .venv/bin/python bench/finetune_families.py [--families rtmdet,yolof] [--images 60]
        [--epochs N] [--work DIR] [--threads N]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from families import CONFIGS  # noqa: E402  (bench/families.py: the config each family is measured with)

from scoring.schema import INSTANCE_SEGMENTATION, OBJECT_DETECTION  # noqa: E402

# The listed families (the generic path has no recipe of its own to check).
FAMILIES = ("rtmdet-ins", "rtmdet", "mask-rcnn", "yolof", "vfnet", "deformable-detr", "sparse-rcnn")
DATA_TASK = {"rtmdet-ins": INSTANCE_SEGMENTATION, "mask-rcnn": INSTANCE_SEGMENTATION}


@dataclass(frozen=True)
class CpuScale:
    """What the config's recipe is scaled to for a few minutes on 2 CPU cores: the square input
    size, the batch, the epochs. The learning rate and weight decay stay the family's
    (``TrainingRecipe``), the optimizer, schedule shape, augmentation and hooks the config's."""

    image_size: int
    batch: int
    epochs: int


# The tiny RTMDets take 256 px and more epochs; the ResNet-50 families 160-192 px and fewer
# (Deformable DETR 320 px, its smallest: TrainingRecipe.min_image_size).
SCALES = {
    "rtmdet-ins": CpuScale(256, 8, 12),
    "rtmdet": CpuScale(256, 8, 12),
    "mask-rcnn": CpuScale(192, 4, 2),
    "yolof": CpuScale(192, 4, 12),
    "vfnet": CpuScale(160, 4, 2),
    "deformable-detr": CpuScale(320, 4, 2),
    "sparse-rcnn": CpuScale(192, 4, 2),
}


def data_set(work: Path, task: str, images: int) -> Path:
    from mmdet_mlflow.synth import generate

    folder = work / f"data-{task}-{images}"
    if not (folder / "validation.jsonl").is_file():
        generate(folder, num_images=images, seed=0, progress=False, task=task)
    return folder


def run_family(family: str, work: Path, images: int, epochs: int | None) -> dict:
    import mlflow
    import pandas as pd
    from scoring.model_dir import ModelDir

    from helpers import b64, make_official_checkpoint
    from mmdet_mlflow.training import FinetuneSettings, finetune

    config, scale = CONFIGS[family], SCALES[family]
    epochs = epochs or scale.epochs
    data = data_set(work, DATA_TASK.get(family, OBJECT_DETECTION), images)
    folder = work / family
    checkpoint = folder / "official-random.pth"
    if not checkpoint.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        make_official_checkpoint(checkpoint, config, confident=False)
    output = folder / f"run-{time.strftime('%Y%m%d-%H%M%S')}"
    settings = FinetuneSettings(number_of_epochs=epochs, image_size=scale.image_size,
                                training_batch_size=scale.batch, validation_batch_size=scale.batch,
                                evaluation_frequency=epochs, num_workers=0)
    start = time.monotonic()
    result = finetune(data / "train.jsonl", data / "validation.jsonl", output, config=config,
                      checkpoint=str(checkpoint), settings=settings, progress=False)
    minutes = (time.monotonic() - start) / 60
    last = result.epochs[-1] if result.epochs else {}

    model_dir = result.mlflow_model_dir
    task = ModelDir(model_dir).read_info()["task"]
    picture = data / json.loads((data / "validation.jsonl").read_text().splitlines()[0])["image_url"]
    answers = mlflow.pyfunc.load_model(str(model_dir)).predict(
        pd.DataFrame({"image": [b64(picture)]}), params={"score_threshold": 0.0, "max_detections": 100})
    boxes = answers["boxes"].iloc[0]
    boxes = json.loads(boxes) if isinstance(boxes, str) else boxes
    return dict(family=family, data_task=DATA_TASK.get(family, OBJECT_DETECTION), config=config,
                train_images=len((data / "train.jsonl").read_text().splitlines()),
                validation_images=len((data / "validation.jsonl").read_text().splitlines()),
                epochs=epochs, steps=result.steps, image_size=scale.image_size, batch=scale.batch,
                learning_rate=json.loads((output / "run.json").read_text())["settings"]["learning_rate"],
                minutes=minutes, bbox_AP=last.get("bbox_AP"), segm_AP=last.get("segm_AP"),
                bbox_AP50=last.get("bbox_AP50"), model_task=task, answers=len(boxes),
                seconds_per_step=result.seconds_per_step, output=str(output))


def table(results: dict) -> str:
    def number(value, digits=3):
        return "-" if value is None else f"{value:.{digits}f}"

    rows = ["| family | data | config | images (train/val) | input | batch | lr | epochs (steps) | "
            "wall min | s/step | bbox mAP | bbox AP50 | segm mAP | model task | boxes |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for family in FAMILIES:
        r = results.get(family)
        if r is None:
            continue
        if "error" in r:
            rows.append(f"| {family} | {r['data_task']} | {r['config']} | failed: {r['error']} |")
            continue
        rows.append(
            f"| {family} | {r['data_task']} | {r['config']} | {r['train_images']}/{r['validation_images']} | "
            f"{r['image_size']} | {r['batch']} | {r['learning_rate']:g} | {r['epochs']} ({r['steps']}) | "
            f"{r['minutes']:.1f} | {number(r['seconds_per_step'], 2)} | {number(r['bbox_AP'])} | "
            f"{number(r['bbox_AP50'])} | {number(r['segm_AP'])} | {r['model_task']} | {r['answers']} |")
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", default=",".join(FAMILIES),
                        help=f"comma-separated, of {', '.join(FAMILIES)} (default: all)")
    parser.add_argument("--images", type=int, default=60, help="synthetic pictures (a fifth validate)")
    parser.add_argument("--epochs", type=int, help="epochs for every family (default: each family's, SCALES)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's, the core count)")
    parser.add_argument("--work", type=Path, help="work folder: data, checkpoints, runs, MLflow store and "
                                                  "results.json (default: a temporary one)")
    args = parser.parse_args()
    families = [name.strip() for name in args.families.split(",") if name.strip()]
    unknown = sorted(set(families) - set(FAMILIES))
    if unknown:
        parser.error(f"unknown families {', '.join(unknown)}: choose of {', '.join(FAMILIES)}")

    # Only results on stdout: everything else written to file descriptor 1 (mmengine's logger,
    # which keeps the stdout it found) goes to stderr.
    results_out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    work = (args.work or Path(tempfile.mkdtemp(prefix="bench-finetune-families-"))).absolute()
    work.mkdir(parents=True, exist_ok=True)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"
    os.chdir(work)  # a sqlite store keeps its artifacts in ./mlruns
    record = work / "results.json"
    results = json.loads(record.read_text()) if record.is_file() else {}
    for family in families:
        print(f"{family}: fine-tuning {CONFIGS[family]} ...", file=sys.stderr, flush=True)
        try:
            results[family] = run_family(family, work, args.images, args.epochs)
        except Exception as err:  # one family's failure is a result too; the others still run
            results[family] = dict(family=family, config=CONFIGS[family],
                                   data_task=DATA_TASK.get(family, OBJECT_DETECTION),
                                   error=f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}")
        print(f"{family}: {json.dumps(results[family])}", file=sys.stderr, flush=True)
        record.write_text(json.dumps(results, indent=2))
    with contextlib.redirect_stdout(results_out):
        print(f"torch threads {torch.get_num_threads()}, cores {os.cpu_count()}, work {work}")
        print(table(results))
    results_out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
