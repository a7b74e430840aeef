"""One fine-tune, start to end::

    starting point  ->  training config  ->  FinetuneRunner.train()  ->  export
    (start.py)          (config.py)          (runner.py, tracking.py)    (export.py)

Runs the same in one process or under torchrun (distributed.py): rank 0 prepares the data and
the others read what it wrote; only rank 0 writes outputs and talks to MLflow. The output folder
(outputs.py) is also the resume state: run the same call again after a crash and training
continues from the last checkpoint (checkpoints.py).
"""
from __future__ import annotations

import contextlib
import functools
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from mmdet_mlflow.files import atomic_write_json
from mmdet_mlflow.training.data_prep import PreparedData, prepare_data
from mmdet_mlflow.training.tiles import TrainingTiles
from mmdet_mlflow.training.outputs import TrainingOutput
from mmdet_mlflow.training.settings import FinetuneError, FinetuneSettings
from mmdet_mlflow.training.start import StartingPoint


@dataclass
class FinetuneResult:
    output_dir: Path
    mlflow_model_dir: Path | None
    pytorch_model_dir: Path | None
    classes: list[str]
    epochs: list[dict] = field(default_factory=list)  # per-epoch validation metrics
    best: dict | None = None                          # the epoch whose weights were exported
    resumed_from: str | None = None
    steps: int = 0
    seconds_per_step: float | None = None             # mean step time (mmengine's timer), first 2 left out
    mlflow_run_id: str | None = None
    notes: list[str] = field(default_factory=list)
    runtime: str = "torch"                            # the exported MLflow model's runtime
    precision: str = "32"                             # what training computed in: 32, 16 (AMP) or bf16


def finetune(training_data, validation_data, output_dir, *, model=None, config=None,
             checkpoint=None, settings: FinetuneSettings | None = None,
             mlflow_model_dir=None, pytorch_model_dir=None, device: str | None = None,
             track: bool = True, progress: bool = True, validate_data: bool = True,
             confine_images: bool = False, extra_hooks: Sequence = (),
             runtime: str = "torch", accept_accuracy_drop: bool = False,
             max_accuracy_drop: float | None = None) -> FinetuneResult:
    """Fine-tune and export. Start from ``model`` (an MLflow model folder we saved, or a
    pytorch_model_folder) or ``config`` + ``checkpoint`` (path, URL, ``official``, or
    None/``"none"``: from scratch).
    ``output_dir`` holds checkpoints and, by default, the two model folders; running again with
    the same ``output_dir`` resumes. ``mlflow_model_dir``/``pytorch_model_dir`` put the model
    folders elsewhere (Azure ML outputs). ``confine_images``: refuse image paths outside the
    data's folders (mmdet_mlflow.data.paths). ``extra_hooks``: mmengine Hook objects to add
    (every rank). ``runtime``: the MLflow model's runtime, ``"torch"`` or ``"onnx"`` (the best
    weights exported to ONNX and checked against torch, as ``mlflow_model.save_model`` does;
    the pytorch_model_folder is written either way) or ``"openvino"`` (gated as ``package
    --runtime openvino`` is: bf16 measured against fp32 on the validation data, refused with
    AccuracyDropError when it loses more than 0.01 segm mAP unless ``accept_accuracy_drop``; the
    pytorch_model_folder is written before the gate, so the training is not lost);
    ``max_accuracy_drop``: the gate's limit (default ``precision_check.MAX_SEGM_MAP_DROP``).
    ``settings.precision``: what training computes in (``training.precision``; "auto" is decided
    here, and the result, run.json and the MLflow run's ``training_precision`` tag say what ran)."""
    # torch, mmengine, mmdet and mlflow take seconds to import: loaded here, not with the
    # package, which the CLI imports to build its options.
    import torch

    from mmdet_mlflow.training.distributed import join_process_group, main_first
    from mmdet_mlflow.training.precision import training_precision
    from mmdet_mlflow.training.tracking import TrainingRun

    settings = settings or FinetuneSettings()
    _check_request(settings, model, config, runtime, accept_accuracy_drop)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    precision, precision_note = training_precision(settings.precision, device)
    notes = [precision_note] if precision_note else []
    out = TrainingOutput(Path(output_dir).expanduser().absolute())
    processes = join_process_group(device)
    start, data = main_first(processes, functools.partial(
        _load_inputs, out=out, model=model, config=config, checkpoint=checkpoint,
        training_data=training_data, validation_data=validation_data, settings=settings,
        validate_data=validate_data, confine_images=confine_images))
    cfg, family, settings = _training_config(start, data, settings, out, device, processes.world_size, runtime)
    resume_from, run_info = _resume_point(out, data)
    runner = _runner(cfg, start, data, resume_from, extra_hooks)
    result = FinetuneResult(out.folder, None, None, data.classes, notes=notes, runtime=runtime,
                            precision=precision,
                            resumed_from=str(resume_from) if resume_from else None)
    if not processes.is_main:
        _train(runner)
        return result

    for note in notes:
        print(f"finetune: {note}", file=sys.stderr)
    run_info.update(start=start.description, classes=data.classes, settings=settings.as_params(),
                    world_size=processes.world_size, device=device, precision=precision)
    with TrainingRun(out.folder, run_info, enabled=track) as run:
        run_info["mlflow_run_id"] = run.run_id
        atomic_write_json(out.run_info, run_info)
        if resume_from is None:
            run.log_params(settings, start, data, processes.world_size, device)
        run.set_tags({"training_precision": precision})
        hook = _train_monitored(runner, run, out, settings, progress, resumed=resume_from is not None)
        best_path = _record_training(result, runner, hook, run, settings.metric_for_best_model)
        result.pytorch_model_dir, result.mlflow_model_dir = _export_best(
            best_path, cfg, data.classes, Path(pytorch_model_dir or out.pytorch_model),
            Path(mlflow_model_dir or out.mlflow_model), runtime=runtime,
            info=dict(start=start.description, family=family.name, task=family.task,
                      best=result.best, settings=settings.as_params(),
                      training_precision=precision),
            default_params=settings.inference_tiling(),
            gate_data=out.validation_coco if runtime == "openvino" else None,
            gate_data_name=str(validation_data), accept_accuracy_drop=accept_accuracy_drop,
            max_accuracy_drop=max_accuracy_drop)
        atomic_write_json(out.metrics, dict(epochs=result.epochs, best=result.best,
                                            metric_for_best_model=settings.metric_for_best_model))
        with _without_known_warnings():
            run.finish(result)
    return result


def _check_request(settings: FinetuneSettings, model, config, runtime: str,
                   accept_accuracy_drop: bool) -> None:
    """Refuse contradictory or unknown options before hours of training, not after."""
    from scoring.runtimes import RUNTIMES

    settings.check()
    if runtime not in RUNTIMES:
        raise FinetuneError(f"runtime must be one of {', '.join(RUNTIMES)}, not {runtime!r}")
    if accept_accuracy_drop and runtime != "openvino":
        raise FinetuneError("--accept-accuracy-drop is for --runtime openvino (its bf16 accuracy gate)")
    if (model is None) == (config is None):
        raise FinetuneError("start from --model (an MLflow model folder) or --config with "
                            "--checkpoint (a path, URL, 'official' or 'none'), not both or neither")


def _load_inputs(main: bool, *, out: TrainingOutput, model, config, checkpoint, training_data,
                 validation_data, settings: FinetuneSettings, validate_data: bool,
                 confine_images: bool) -> tuple[StartingPoint, PreparedData]:
    """The starting point and the prepared data: read, validated and written as COCO by the main
    process (``main``); the other ranks read the COCO files it wrote (validated there) and
    write nothing."""
    start = StartingPoint.from_model_folder(model) if model is not None else \
        StartingPoint.from_config(config, checkpoint)
    if main:
        return start, prepare_data(training_data, validation_data, (out.train_coco, out.validation_coco),
                                   validate_data, confine_images,
                                   TrainingTiles.from_settings(settings.tile_grid_size,
                                                               settings.tile_overlap_ratio))
    return start, prepare_data(out.train_coco, out.validation_coco, None, validate=False)


def _training_config(start: StartingPoint, data: PreparedData, settings: FinetuneSettings,
                     out: TrainingOutput, device: str, world_size: int, runtime: str):
    """The mmengine config that trains, the model's family, and the settings that train: the
    learning rate and weight decay the family's where the settings leave them unset (what
    run.json, MLflow and model.json record). Refuses a runtime the family cannot export to,
    before hours of training, not after."""
    from mmdet_mlflow.training.config import build_config
    from scoring.families import UnknownModel, family_of_config

    cfg = build_config(start, data, settings, out.checkpoints, device, world_size)
    family = family_of_config(cfg.model)
    settings = settings.for_family(family, cfg.optim_wrapper["optimizer"])
    try:
        family.check_runtime(runtime)
    except UnknownModel as err:
        raise FinetuneError(str(err)) from None
    return cfg, family, settings


def _resume_point(out: TrainingOutput, data: PreparedData) -> tuple[Path | None, dict]:
    """The checkpoint an earlier run in ``out`` left to resume from (None: a fresh start), and
    that run's run.json; refused when it trained other classes."""
    from mmdet_mlflow.training.checkpoints import latest_checkpoint

    resume_from = latest_checkpoint(out.checkpoints)
    run_info = out.read_run_info()
    if resume_from is not None and run_info.get("classes") and run_info["classes"] != data.classes:
        raise FinetuneError(f"{out.folder} holds a training run for classes {run_info['classes']}, "
                            f"but the data has {data.classes}: use another --output")
    return resume_from, run_info


def _runner(cfg, start: StartingPoint, data: PreparedData, resume_from: Path | None, extra_hooks: Sequence):
    """The runner, with ``extra_hooks``: resuming from ``resume_from``, else starting from
    ``start``'s weights."""
    from mmdet_mlflow.training.runner import FinetuneRunner

    if resume_from is not None:
        cfg.resume, cfg.load_from = True, str(resume_from)
    runner = FinetuneRunner.from_cfg(cfg)
    for hook in extra_hooks:
        runner.register_hook(hook)
    if resume_from is None:
        runner.start_from(start, data.classes)
    else:  # mmengine checkpoints an epoch before validating it: validate it now
        runner.validate_resumed_epoch = resume_from.name.startswith("epoch_")
    return runner


def _train_monitored(runner, run, out: TrainingOutput, settings: FinetuneSettings, progress: bool,
                     resumed: bool):
    """Train on the main process, each epoch's progress and validation metrics reported to the
    user and ``run``; returns the monitoring hook, which holds them."""
    from mmdet_mlflow.training.tracking import TrainingMonitorHook

    hook = TrainingMonitorHook(run, out.folder, settings.metric_for_best_model,
                               progress=progress, resumed=resumed)
    runner.register_hook(hook, priority="VERY_LOW")
    try:
        _train(runner)
    finally:
        hook.close()
    return hook


def _record_training(result: FinetuneResult, runner, hook, run, metric_for_best_model: str) -> Path:
    """What the training did, into ``result``: its epochs, steps, step time, notes, run, and the
    best epoch; returns the checkpoint of that epoch."""
    from mmdet_mlflow.training.checkpoints import best_checkpoint

    result.notes += runner.start_notes
    result.epochs, result.steps = hook.epochs, runner.iter
    result.seconds_per_step = hook.mean_step_seconds()
    result.mlflow_run_id = run.run_id
    best_path, result.best = best_checkpoint(runner, hook.epochs, metric_for_best_model)
    return best_path


def _export_best(best_path: Path, cfg, classes: list[str], pytorch_model_dir: Path, *args, **kwargs):
    """``export_models`` of the weights in ``best_path``; where the OpenVINO model's accuracy
    gate refuses, the error also says that the training is kept and how to export it anyway."""
    from mmdet_mlflow.precision_check import AccuracyDropError
    from mmdet_mlflow.training.checkpoints import load_training_checkpoint
    from mmdet_mlflow.training.export import export_models

    weights = load_training_checkpoint(best_path)["state_dict"]
    try:
        return export_models(cfg, weights, classes, pytorch_model_dir, *args, **kwargs)
    except AccuracyDropError as err:
        raise AccuracyDropError(
            f"{err}. No MLflow model was written, but the trained weights are kept in "
            f"{pytorch_model_dir}: run this finetune again with --accept-accuracy-drop to export "
            f"them without training again, or package them for another runtime (mmdet-mlflow "
            f"package --config {pytorch_model_dir / 'config.py'} --checkpoint "
            f"{pytorch_model_dir / 'weights.pth'} --runtime onnx --output ...)") from None


@contextlib.contextmanager
def _without_known_warnings():
    """Without the deprecation warnings mmdet 3.3's own code raises on every run (nothing a
    user can act on)."""
    with warnings.catch_warnings():
        for message in (r".*torch\.cuda\.amp\.autocast", r"torch\.meshgrid"):
            warnings.filterwarnings("ignore", message=message)
        yield


def _train(runner) -> None:
    with _without_known_warnings():
        runner.train()
