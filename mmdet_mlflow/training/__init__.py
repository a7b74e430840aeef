"""Fine-tune RTMDet-Ins on an instance-segmentation dataset with mmengine's Runner.

    starting point  ->  training config  ->  FinetuneRunner.train()  ->  export
    (our MLflow model,   (the model's own       (checkpoint each epoch,     (output/mlflow_model_folder,
     config+checkpoint,   recipe: AdamW, flat-   resume from the last one,   output/pytorch_model_folder,
     or from scratch)     cosine, RTMDet aug)    validation each epoch)      published atomically)

Hyperparameters carry the names of Azure ML's fine-tune component (``number_of_epochs``,
``training_batch_size``, ...); validation metrics the names docs/metrics.md defines (Azure's
``mean_average_precision`` is mask AP at IoU 0.5; COCO's mAP@[.5:.95] is ``segm_AP``). Under
``torchrun --nproc_per_node N`` it trains with DDP (gloo on CPU, nccl on GPU).

    settings.py     FinetuneSettings, FinetuneError, the metrics that may pick the best epoch
    start.py        where training starts, adapt_weights (the head for the data's classes)
    data_prep.py    the data read, validated and written as COCO JSON for mmdet
    config.py       the mmengine config (the model's recipe scaled to data, size, steps)
    precision.py    what training computes in (32, 16, bf16 CPU autocast, auto), its optim wrapper
    distributed.py  torchrun: process group, rank 0 first
    runner.py       mmengine Runner, loop and hooks: start weights, max_steps, safe checkpoints
    validation.py   the validation metric (our metric core on mmdet's gathered predictions)
    tracking.py     progress, history, MLflow (rank 0)
    checkpoints.py  which checkpoint to resume from, which to export
    export.py       the two model folders, published atomically
    outputs.py      the output folder's layout
    job.py          finetune(): all of the above, in order

Importing the package is cheap (the CLI does it to build its options); torch, mmengine and mlflow
load when ``finetune`` runs.
"""
from mmdet_mlflow.training.job import FinetuneResult, finetune
from mmdet_mlflow.training.outputs import finetuned_classes
from mmdet_mlflow.training.settings import (BEST_MODEL_METRICS, QUICK_CPU_CONFIG, FinetuneError,
                                            FinetuneSettings, quick_cpu_recipe)

__all__ = ["BEST_MODEL_METRICS", "FinetuneError", "FinetuneResult", "FinetuneSettings",
           "QUICK_CPU_CONFIG", "finetune", "finetuned_classes", "quick_cpu_recipe"]
