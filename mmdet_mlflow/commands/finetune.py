"""mmdet-mlflow finetune: train RTMDet-Ins on AutoML JSONL / MLTable / COCO data, export an
MLflow model. Run it again with the same --output to resume after an interruption."""
from __future__ import annotations

import dataclasses


def add_settings_arguments(parser) -> None:
    """One option per FinetuneSettings field, named as Azure's fine-tune component names it
    (--number-of-epochs for number_of_epochs, ...), defaults from FinetuneSettings."""
    from mmdet_mlflow.finetune import BEST_MODEL_METRICS, FinetuneSettings

    helps = {
        "number_of_epochs": "training epochs",
        "max_steps": "stop after this many steps (overrides --number-of-epochs)",
        "training_batch_size": "images per step and process",
        "validation_batch_size": "images per validation batch",
        "learning_rate": "AdamW learning rate after warm-up (flat, then cosine over the second half)",
        "weight_decay": "AdamW weight decay",
        "warmup_steps": "linear warm-up steps (default: a tenth of training, at most 1000)",
        "gradient_accumulation_step": "steps whose gradients add up before an update",
        "image_size": "square input size for training and inference",
        "image_min_size": "with --image-max-size: a max x min input instead of a square",
        "image_max_size": "see --image-min-size",
        "metric_for_best_model": f"which validation metric picks the exported epoch: "
                                 f"{', '.join(BEST_MODEL_METRICS)}",
        "precision": "32, or 16 for mixed precision (AMP) on GPU",
        "checkpoint_interval_steps": "also checkpoint every N steps (always: every epoch)",
        "num_workers": "data-loading processes (default: 0 on CPU, 2 on GPU)",
        "strong_augmentation": "RTMDet's mosaic and mixup augmentation (true/false)",
        "seed": "random seed",
    }
    defaults = FinetuneSettings()
    group = parser.add_argument_group("hyperparameters (Azure ML fine-tune names)")
    for f in dataclasses.fields(FinetuneSettings):
        default = getattr(defaults, f.name)
        kind = {"int": int, "float": float, "str": str, "bool": _boolean}.get(
            str(f.type).split(" ")[0].replace("|", "").strip(), int)
        if f.name == "precision":
            kind = str
        text = helps.get(f.name, f.name)
        group.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, type=kind, default=None,
                           metavar={int: "N", float: "F", _boolean: "BOOL"}.get(kind, "S"),
                           help=text if "default" in text or default is None else f"{text} (default: {default})")


def settings_from_args(args):
    from mmdet_mlflow.finetune import FinetuneSettings, quick_cpu_recipe

    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(FinetuneSettings)
             if getattr(args, f.name, None) is not None}
    return quick_cpu_recipe(**given) if getattr(args, "recipe", None) == "quick-cpu" else \
        FinetuneSettings(**given)


def _boolean(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"not a boolean: {text}")


def add_parser(subparsers):
    p = subparsers.add_parser(
        "finetune", help="fine-tune on AutoML JSONL / MLTable / COCO data and export an MLflow model",
        description="Starts from one of our MLflow models (--model), or a config with a checkpoint "
                    "(--config with --checkpoint PATH|URL|official|none), adapts the head to the "
                    "data's classes, trains with mmengine (AdamW, flat-cosine), validates with COCO "
                    "mask mAP each epoch and exports the best epoch as OUTPUT/mlflow_model_folder "
                    "and OUTPUT/pytorch_model_folder. Checkpoints go to OUTPUT/checkpoints: run the "
                    "same command again to resume. Runs under torchrun for several processes.")
    start = p.add_mutually_exclusive_group(required=True)
    start.add_argument("--model", help="an MLflow model folder saved by mmdet-mlflow (package or finetune)")
    start.add_argument("--config", help="an RTMDet-Ins config name mmdet ships or a config file")
    p.add_argument("--checkpoint", help="with --config: a checkpoint path, http(s) URL, 'official' "
                                        "(published COCO weights) or 'none' (train from scratch)")
    p.add_argument("--training-data", required=True, help="AutoML JSONL, MLTable folder or COCO JSON")
    p.add_argument("--validation-data", required=True, help="AutoML JSONL, MLTable folder or COCO JSON")
    p.add_argument("--output", required=True, help="output folder (also the resume state)")
    p.add_argument("--mlflow-model-folder", help="write the MLflow model here instead of OUTPUT/mlflow_model_folder")
    p.add_argument("--pytorch-model-folder", help="write config + weights here instead of OUTPUT/pytorch_model_folder")
    p.add_argument("--recipe", choices=["quick-cpu"],
                   help="quick-cpu: the tiny model's from-scratch CPU recipe (explicit options override it)")
    p.add_argument("--no-tracking", dest="track", action="store_false", help="do not log to MLflow")
    p.add_argument("--no-validate-images", dest="validate_images", action="store_false",
                   help="do not open every image before training (labels and polygons are still checked)")
    add_settings_arguments(p)
    p.set_defaults(handler=run)


def run(args):
    from mmdet_mlflow.finetune import FinetuneError, finetune

    if args.config and not args.checkpoint:
        raise FinetuneError("--config needs --checkpoint (a path, URL, 'official', or 'none' to "
                            "train from scratch)")
    if args.model and args.checkpoint:
        raise FinetuneError("--checkpoint goes with --config; --model brings its own weights")
    result = finetune(args.training_data, args.validation_data, args.output, model=args.model,
                      config=args.config, checkpoint=args.checkpoint, settings=settings_from_args(args),
                      mlflow_model_dir=args.mlflow_model_folder, pytorch_model_dir=args.pytorch_model_folder,
                      track=args.track, validate_data=args.validate_images)
    if result.mlflow_model_dir is None:
        return 0  # not rank 0 under torchrun: rank 0 reports
    best = result.best or {}
    print(f"fine-tuned {len(result.classes)} classes ({', '.join(result.classes)}) for {result.steps} "
          f"steps; best epoch {best.get('epoch')}: mask mAP {best.get('mean_average_precision', 0):.4f}")
    print(f"MLflow model: {result.mlflow_model_dir}")
    print(f"PyTorch model: {result.pytorch_model_dir}")
    if result.mlflow_run_id:
        print(f"MLflow run: {result.mlflow_run_id}")
    print(f"serve it: mlflow models serve -m {result.mlflow_model_dir} --env-manager local -p 5000")
