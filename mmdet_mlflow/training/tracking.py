"""What a fine-tune run shows and records (rank 0 only): a progress bar on stderr, per-step
losses and per-epoch metrics in MLflow and in ``output/history.jsonl`` (which survives restarts),
the loss/mAP plot (``output/training_curves.png``) and, at the end, the model.

Tracking store: ``MLFLOW_TRACKING_URI`` when set (Azure ML sets it), else an embedded
``sqlite:///mlflow.db`` in the working directory. A resumed training continues the same MLflow
run (its id is kept in ``output/run.json``). Metric names: docs/metrics.md.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import time
from pathlib import Path

import mlflow
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient
from mlflow.tracking._tracking_service.utils import is_tracking_uri_set
from mmengine.hooks import Hook
from tqdm import tqdm

import mlflow_model
from scoring.model_dir import ModelDir, WeightsDir
from mmdet_mlflow.files import atomic_write_text
from mmdet_mlflow.plots import training_curves
from mmdet_mlflow.training.config import validation_key
from mmdet_mlflow.training.outputs import TrainingOutput
from mmdet_mlflow.training.settings import VALIDATION_METRICS

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
DEFAULT_EXPERIMENT = "mmdet-mlflow-finetune"
FLUSH_EVERY_STEPS = 20          # per-step metrics go to MLflow in batches: one write per 20 steps
FLUSH_EVERY_SECONDS = 30.0
# Shown after each validation, and drawn beside the metric that picks the exported epoch.
HEADLINE_METRICS = ("mean_average_precision", "segm_AP", "precision", "recall")


class TrainingRun:
    """The MLflow run of a fine-tune (or nothing, when ``enabled`` is False)."""

    def __init__(self, output_dir: Path, run_info: dict, enabled: bool = True):
        self.output = TrainingOutput(output_dir)
        self.enabled = enabled
        self.previous_run_id = run_info.get("mlflow_run_id")
        self.run_id: str | None = None
        self._pending: list = []
        self._last_flush = time.monotonic()
        self._started_here = False

    def __enter__(self):
        if not self.enabled:
            return self
        if not is_tracking_uri_set():  # neither MLFLOW_TRACKING_URI nor set by the caller's code
            mlflow.set_tracking_uri(DEFAULT_TRACKING_URI)
        active = mlflow.active_run()
        if active is not None:
            self.run_id = active.info.run_id
            return self
        run = None
        if self.previous_run_id and not os.environ.get("MLFLOW_RUN_ID"):
            try:
                run = mlflow.start_run(run_id=self.previous_run_id)
            except mlflow.exceptions.MlflowException:
                run = None  # another tracking store than last time: a new run
        if run is None:
            run = mlflow.start_run(experiment_id=_experiment_id(),
                                   run_name=f"finetune-{self.output.folder.name}")
        self.run_id, self._started_here = run.info.run_id, True
        return self

    def __exit__(self, exc_type, exc, tb):
        if not self.enabled:
            return False
        try:
            self.flush()
        finally:
            if self._started_here:
                mlflow.end_run("FINISHED" if exc_type is None else
                               "KILLED" if exc_type is KeyboardInterrupt else "FAILED")
        return False

    def log_params(self, settings, start, data, world_size: int, device: str) -> None:
        if not self.enabled:
            return
        params = dict(settings.as_params(), start=start.description[:500],
                      classes=",".join(data.classes)[:500], num_classes=len(data.classes),
                      training_images=data.train_images, validation_images=data.val_images,
                      world_size=world_size, device=device)
        mlflow.log_params(params)

    def set_tags(self, tags: dict) -> None:
        if self.enabled:
            mlflow.set_tags({k: str(v)[:5000] for k, v in tags.items()})

    def log_metrics(self, metrics: dict, step: int, now: bool = False) -> None:
        """Queue ``metrics`` at ``step``; they are written in batches."""
        if not self.enabled:
            return
        timestamp = int(time.time() * 1000)
        self._pending += [Metric(k, float(v), timestamp, int(step)) for k, v in metrics.items()]
        if now or len(self._pending) >= FLUSH_EVERY_STEPS * 6 or \
                time.monotonic() - self._last_flush > FLUSH_EVERY_SECONDS:
            self.flush()

    def flush(self) -> None:
        if not (self.enabled and self._pending):
            return
        client = MlflowClient()
        for i in range(0, len(self._pending), 1000):  # log_batch takes up to 1000 metrics
            client.log_batch(self.run_id, metrics=self._pending[i:i + 1000])
        self._pending, self._last_flush = [], time.monotonic()

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        if self.enabled and Path(path).exists():
            mlflow.log_artifact(str(path), artifact_path)

    def finish(self, result) -> None:
        """The end of a successful training: summary metrics, files and the model."""
        if not self.enabled:
            return
        self.flush()
        if result.best:
            mlflow.log_metrics({f"best_{k}": v for k, v in result.best.items()
                                if isinstance(v, (int, float)) and v >= 0 and k not in ("epoch", "step")})
        if result.seconds_per_step:
            mlflow.log_metric("seconds_per_step", result.seconds_per_step)
        for path in (self.output.curves, self.output.metrics, self.output.run_info):
            self.log_artifact(path)
        exported = WeightsDir(result.pytorch_model_dir)
        self.log_artifact(exported.config, "training_config")
        # the logged model answers as the written one: its defaults (e.g. a fine-tune on tiles
        # predicts tiled) come from that folder's model.json
        written = (ModelDir(result.mlflow_model_dir).data.read_info()
                   if result.mlflow_model_dir and ModelDir(result.mlflow_model_dir).mlmodel.is_file() else {})
        defaults = {k: v for k, v in (written.get("default_params") or {}).items() if v is not None}
        mlflow_model.log_model(str(exported.config), str(exported.weights), name="model",
                               classes=result.classes, runtime=result.runtime,
                               default_params=defaults or None)


def _experiment_id() -> str | None:
    """The experiment the environment names (Azure ML sets it), else ours, created if needed.
    Not mlflow.set_experiment: that exports MLFLOW_EXPERIMENT_ID to every later subprocess,
    whatever tracking store it uses."""
    if any(os.environ.get(v) for v in ("MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID")):
        return None
    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name(DEFAULT_EXPERIMENT)
    return experiment.experiment_id if experiment else client.create_experiment(DEFAULT_EXPERIMENT)


def step_seconds(runner) -> float | None:
    """The last full training step's wall time as mmengine's IterTimerHook measured it (data
    loading, forward, backward, update and every hook since the previous step)."""
    if "train/time" not in runner.message_hub.log_scalars:
        return None
    return float(runner.message_hub.get_scalar("train/time").current())


def _validation_pictures(runner) -> int | None:
    """The pictures this process validates (its sampler's share; None when unknown)."""
    loader = runner.val_dataloader
    for part in (getattr(loader, "sampler", None), getattr(loader, "dataset", None)):
        try:
            return len(part)
        except TypeError:
            continue
    return None


def mean_step_time(times: list[float], skip: int = 2) -> float | None:
    """Mean step time without the first ``skip`` steps (data loader and allocator warm-up)."""
    kept = times[skip:] if len(times) > skip else times
    return sum(kept) / len(kept) if kept else None


class TrainingMonitorHook(Hook):
    """Progress bar, per-step and per-epoch logging, the history file and the plot."""

    priority = "VERY_LOW"

    def __init__(self, run: TrainingRun, output_dir: Path, metric_for_best_model: str,
                 progress: bool = True, resumed: bool = False):
        self.run = run
        self.output = TrainingOutput(output_dir)
        self.metric_for_best_model = metric_for_best_model
        self.progress = progress
        self.resumed = resumed
        self.steps: list[dict] = []
        self.epochs: list[dict] = []
        self.step_times: list[float] = []
        self._bar = None
        self._validation_bar = None
        self._history = None
        self._quiet = None
        self._captured = None

    # -- history that survives a restart
    def _load_history(self, runner) -> None:
        """Keep what happened up to the checkpoint resumed from; later lines (steps redone after
        the restart, and the resumed epoch's validation when it is redone) are dropped."""
        path = self.output.history
        lines = path.read_text().splitlines() if (self.resumed and path.is_file()) else []
        kept = []
        last_validated = runner.epoch - 1 if getattr(runner, "validate_resumed_epoch", False) else runner.epoch
        for line in lines:
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by the crash
            if entry.get("kind") == "step" and entry["step"] <= runner.iter:
                self.steps.append(entry)
            elif entry.get("kind") == "epoch" and entry["epoch"] <= last_validated:
                self.epochs.append(entry)
            else:
                continue
            kept.append(line)
        atomic_write_text(path, "".join(line + "\n" for line in kept))
        self._history = open(path, "a", buffering=1)

    def _record(self, entry: dict) -> None:
        self._history.write(json.dumps(entry) + "\n")

    # -- mmengine hook points
    def before_train(self, runner) -> None:
        self._load_history(runner)
        notes = getattr(runner, "start_notes", [])
        if notes:
            self.run.set_tags({"start_notes": "; ".join(notes)})
        self._bar = tqdm(total=runner.max_iters, initial=runner.iter, desc="fine-tuning",
                         unit="step", file=sys.stderr, dynamic_ncols=True, disable=not self.progress)
        for note in notes:
            self._bar.write(f"finetune: {note}", file=sys.stderr)
        if self.resumed:
            self._bar.write(f"finetune: resumed after epoch {runner.epoch}, step {runner.iter}",
                            file=sys.stderr)

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        step = runner.iter + 1
        values = {k: float(v.detach() if hasattr(v, "detach") else v)
                  for k, v in (outputs or {}).items() if k.startswith("loss")}
        values["learning_rate"] = float(runner.optim_wrapper.get_lr()["lr"][0])
        seconds = step_seconds(runner)
        if seconds is not None:
            self.step_times.append(seconds)
        entry = dict(kind="step", step=step, epoch=runner.epoch + 1, **values)
        self.steps.append(entry)
        self._record(entry)
        self.run.log_metrics(values, step)
        self._bar.update(1)
        if "loss" in values:
            self._bar.set_postfix(epoch=runner.epoch + 1, loss=f"{values['loss']:.3f}", refresh=False)

    def after_train_epoch(self, runner) -> None:
        self.run.flush()

    def before_val_epoch(self, runner) -> None:
        # pycocotools prints its tables on stdout: keep them in a file, not between the bars.
        self._captured = io.StringIO()
        self._quiet = contextlib.redirect_stdout(self._captured)
        self._quiet.__enter__()
        # Validation takes a while (tiled: tiles + 1 network passes a picture): its own bar,
        # under the training one, counting this process's share of the pictures.
        self._validation_bar = tqdm(total=_validation_pictures(runner), desc="validation", unit="img",
                                    file=sys.stderr, dynamic_ncols=True, leave=False,
                                    disable=not self.progress)

    def after_val_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        if self._validation_bar is not None:
            samples = data_batch.get("data_samples") if isinstance(data_batch, dict) else None
            self._validation_bar.update(len(samples) if samples is not None else 1)

    def _close_validation_bar(self) -> None:
        if self._validation_bar is not None:
            self._validation_bar.close()
            self._validation_bar = None

    def _end_capture(self, runner) -> None:
        if self._quiet is None:
            return
        self._quiet.__exit__(None, None, None)
        self._quiet = None
        where = f"epoch {runner.epoch}, step {runner.iter}" if runner is not None else "interrupted"
        with open(self.output.evaluation_log, "a") as log:
            log.write(f"== {where}\n{self._captured.getvalue()}")

    def after_val_epoch(self, runner, metrics=None) -> None:
        self._close_validation_bar()
        self._end_capture(runner)
        metrics = metrics or {}
        named = {name: float(metrics[validation_key(name)]) for name in VALIDATION_METRICS
                 if validation_key(name) in metrics}
        entry = dict(kind="epoch", epoch=runner.epoch, step=runner.iter, **named)
        self.epochs.append(entry)
        self._record(entry)
        # undefined values (-1, COCO's convention) stay in the history, not in MLflow: as evaluate
        self.run.log_metrics({k: v for k, v in named.items() if v >= 0}, runner.iter, now=True)
        self.write_plot()
        shown = ", ".join(f"{k} {named[k]:.4f}" for k in HEADLINE_METRICS if k in named)
        self._bar.write(f"epoch {runner.epoch}: {shown}", file=sys.stderr)

    def after_train(self, runner) -> None:
        self.run.flush()
        self.write_plot()
        self.close()

    def close(self) -> None:
        """Give stdout back, close the bar and the history file (also after a failure)."""
        self._end_capture(None)
        self._close_validation_bar()
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._history is not None:
            self._history.close()
            self._history = None

    def mean_step_seconds(self) -> float | None:
        return mean_step_time(self.step_times)

    def write_plot(self) -> None:
        if self.steps or self.epochs:
            shown = dict.fromkeys((self.metric_for_best_model,) + HEADLINE_METRICS[:2] + ("bbox_AP",))
            training_curves(self.steps, self.epochs, self.output.curves, list(shown))
