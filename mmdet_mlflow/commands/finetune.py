"""mmdet-mlflow finetune: train a detector of any family we serve (RTMDet-Ins, RTMDet, Mask
R-CNN, YOLOF, ...) on AutoML JSONL / MLTable / COCO data, export an MLflow model of its task. Run it again with the same --output to resume after an interruption. The Azure ML
fine-tune component runs this command as it is (components/finetune/spec.yaml)."""
from __future__ import annotations

import sys

from mmdet_mlflow.commands.args import add_dataclass_arguments, boolean, dataclass_values
from mmdet_mlflow.training import FinetuneError, FinetuneSettings, finetune, quick_cpu_recipe
from mmdet_mlflow.precision_check import MAX_SEGM_MAP_DROP
from scoring.runtimes import DEFAULT_RUNTIME, RUNTIMES

SETTING_HELPS = {
    "number_of_epochs": "training epochs",
    "max_steps": "stop after this many steps (overrides --number-of-epochs)",
    "training_batch_size": "images per step and process",
    "validation_batch_size": "images per validation batch",
    "learning_rate": "learning rate after warm-up, for the config's own optimizer and schedule "
                     "(default: the model family's: 0.001 for RTMDet's AdamW, 0.01 for Mask R-CNN's "
                     "SGD, ...; docs/finetune.md)",
    "weight_decay": "the optimizer's weight decay (default: the model family's, e.g. 0.05 for RTMDet)",
    "warmup_steps": "linear warm-up steps (default: a tenth of training, at most 1000)",
    "gradient_accumulation_step": "steps whose gradients add up before an update",
    "image_size": "square input size for training and inference",
    "image_min_size": "with --image-max-size: a max x min input instead of a square",
    "image_max_size": "see --image-min-size",
    "metric_for_best_model": "which validation metric picks the exported epoch: mean_average_precision "
                             "or recall (Azure's meaning), or a COCO stat such as segm_AP or bbox_AP "
                             "(docs/metrics.md)",
    "precision": "32; 16: mixed precision (AMP) on GPU; bf16: torch's bf16 autocast on CPU (fp32 "
                 "weights; fast where the CPU has AMX or AVX512-BF16); auto: bf16 on CPUs that "
                 "compute it natively where the demo recipe's measurement adopted it, else 32 "
                 "(docs/runtimes.md)",
    "checkpoint_interval_steps": "also checkpoint every N steps (always: every epoch)",
    "evaluation_frequency": "validate every N epochs, and always after the last (Azure AutoML's name)",
    "num_workers": "data-loading processes (default: 0 on CPU, 2 on GPU)",
    "strong_augmentation": "RTMDet's mosaic and mixup augmentation (true/false)",
    "seed": "random seed",
    "tile_grid_size": "AutoML's tiling for small objects in large pictures: \"MxN\" (columns x rows, "
                      "e.g. 3x2) cuts every training picture into these tiles, trained on with the "
                      "whole pictures, and validation scores tiled inference (docs/finetune.md); "
                      "unset: no tiles",
    "tile_overlap_ratio": "with --tile-grid-size: the overlap of adjacent tiles, 0 <= r < 1",
}


def add_settings_arguments(parser) -> None:
    """One option per FinetuneSettings field, named as Azure's fine-tune component names it
    (--number-of-epochs for number_of_epochs, ...), defaults from FinetuneSettings."""
    group = parser.add_argument_group("hyperparameters (Azure ML fine-tune names)")
    add_dataclass_arguments(group, FinetuneSettings, helps=SETTING_HELPS)


def settings_from_args(args) -> FinetuneSettings:
    given = dataclass_values(args, FinetuneSettings)
    return quick_cpu_recipe(**given) if getattr(args, "recipe", None) == "quick-cpu" else \
        FinetuneSettings(**given)


def add_parser(subparsers):
    p = subparsers.add_parser(
        "finetune", help="fine-tune on AutoML JSONL / MLTable / COCO data and export an MLflow model",
        description="Starts from one of our models (--model), or a config with a checkpoint "
                    "(--config with --checkpoint PATH|URL|official|none), adapts the head to the "
                    "data's classes, trains with mmengine (AdamW, flat-cosine), validates each "
                    "epoch (COCO and Azure metrics, docs/metrics.md) and exports the best epoch as "
                    "OUTPUT/mlflow_model_folder and OUTPUT/pytorch_model_folder. Checkpoints go to "
                    "OUTPUT/checkpoints: run the same command again to resume. Runs under torchrun "
                    "for several processes.")
    p.add_argument("--model", help="an MLflow model folder saved by mmdet-mlflow (package or finetune) "
                                   "or a pytorch_model_folder of an earlier fine-tune; given with "
                                   "--config, --model wins (an Azure pipeline always passes a config)")
    p.add_argument("--config", help="a config name mmdet ships (rtmdet-ins_tiny_8xb32-300e_coco, "
                                    "rtmdet_tiny_8xb32-300e_coco, mask-rcnn_r50_fpn_1x_coco, ...) or a config "
                                    "file; an instance-segmentation model needs data with masks")
    p.add_argument("--checkpoint", help="with --config: a checkpoint path, http(s) URL, 'official' "
                                        "(published COCO weights) or 'none' (train from scratch)")
    p.add_argument("--training-data", required=True, help="AutoML JSONL, MLTable folder or COCO JSON")
    p.add_argument("--validation-data", required=True, help="AutoML JSONL, MLTable folder or COCO JSON")
    p.add_argument("--output", required=True, help="output folder (also the resume state)")
    p.add_argument("--mlflow-model-folder", help="write the MLflow model here instead of OUTPUT/mlflow_model_folder")
    p.add_argument("--pytorch-model-folder", help="write config + weights here instead of OUTPUT/pytorch_model_folder")
    p.add_argument("--runtime", choices=RUNTIMES, default=DEFAULT_RUNTIME,
                   help="what serves the MLflow model: torch (mmdet), onnx (ONNX Runtime: needs none of "
                        "torch, mmcv, mmdet to serve; docs/onnx.md) or openvino (the same graph on "
                        "OpenVINO Runtime, bf16 where the serving CPU has it; docs/runtimes.md)")
    p.add_argument("--accept-accuracy-drop", nargs="?", const=True, default=False, type=boolean,
                   metavar="BOOL",
                   help=f"with --runtime openvino: write the MLflow model even when bf16 loses more "
                        f"than {MAX_SEGM_MAP_DROP} segm mAP against fp32 on the validation data "
                        f"(alone, or true/false as Azure passes it)")
    p.add_argument("--recipe", choices=["quick-cpu"],
                   help="quick-cpu: the tiny model's from-scratch CPU recipe (explicit options override it)")
    p.add_argument("--no-tracking", dest="track", action="store_false", help="do not log to MLflow")
    p.add_argument("--no-validate-images", dest="validate_images", action="store_false",
                   help="do not open every image before training (labels and polygons are still checked)")
    p.add_argument("--confine-images", action="store_true",
                   help="refuse image paths outside the folder of the annotation file naming them "
                        "(the Azure component sets it)")
    add_settings_arguments(p)
    p.set_defaults(handler=run)


def start_point(args) -> tuple[str | None, str | None, str | None]:
    """(model, config, checkpoint) from the options: --model, or --config with --checkpoint.
    --model wins over a --config given too (say so): an Azure pipeline passes its default
    config name even when it starts from a model."""
    if args.model:
        if args.config or args.checkpoint:
            print(f"finetune: starting from --model {args.model}; --config/--checkpoint left unused",
                  file=sys.stderr)
        return args.model, None, None
    if not args.config:
        raise FinetuneError("start from --model (an MLflow model folder or a pytorch_model_folder) "
                            "or --config with --checkpoint")
    if not args.checkpoint:
        raise FinetuneError("--config needs --checkpoint (a path, URL, 'official', or 'none' to "
                            "train from scratch)")
    return None, args.config, args.checkpoint


def run(args):
    model, config, checkpoint = start_point(args)
    result = finetune(args.training_data, args.validation_data, args.output, model=model,
                      config=config, checkpoint=checkpoint, settings=settings_from_args(args),
                      mlflow_model_dir=args.mlflow_model_folder, pytorch_model_dir=args.pytorch_model_folder,
                      track=args.track, validate_data=args.validate_images,
                      confine_images=args.confine_images, runtime=args.runtime,
                      accept_accuracy_drop=args.accept_accuracy_drop)
    if result.mlflow_model_dir is None:
        return 0  # not rank 0 under torchrun: rank 0 reports
    best = result.best or {}
    scored = "segm" if "segm_AP" in best else "bbox"  # an object-detection model has boxes only
    print(f"fine-tuned {len(result.classes)} classes ({', '.join(result.classes)}) for {result.steps} "
          f"steps at precision {result.precision}; best epoch {best.get('epoch')}: {scored}_AP "
          f"{best.get(f'{scored}_AP', 0):.4f}, mean_average_precision {best.get('mean_average_precision', 0):.4f} "
          f"({'mask' if scored == 'segm' else 'box'} AP at IoU 0.5)")
    print(f"MLflow model: {result.mlflow_model_dir}")
    print(f"PyTorch model: {result.pytorch_model_dir}")
    if result.mlflow_run_id:
        print(f"MLflow run: {result.mlflow_run_id}")
    print(f"serve it: mlflow models serve -m {result.mlflow_model_dir} --env-manager local -p 5000")
