"""What a fine-tune run shows and records (rank 0 only): a progress bar on stderr, per-step
losses and per-epoch metrics in MLflow and in ``output/history.jsonl`` (which survives restarts),
the loss/mAP plot (``output/training_curves.png``) and, at the end, the model.

Tracking store: ``MLFLOW_TRACKING_URI`` when set (Azure ML sets it), else an embedded
``sqlite:///mlflow.db`` in the working directory. A resumed training continues the same MLflow
run (its id is kept in ``output/run.json``).
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import time
from pathlib import Path

from mmengine.hooks import Hook

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
DEFAULT_EXPERIMENT = "mmdet-mlflow-finetune"
FLUSH_EVERY_STEPS = 20          # per-step metrics go to MLflow in batches: one write per 20 steps
FLUSH_EVERY_SECONDS = 30.0


class TrainingRun:
    """The MLflow run of a fine-tune (or nothing, when ``enabled`` is False)."""

    def __init__(self, output_dir: Path, run_info: dict, enabled: bool = True):
        self.output_dir = Path(output_dir)
        self.enabled = enabled
        self.previous_run_id = run_info.get("mlflow_run_id")
        self.run_id: str | None = None
        self._pending: list = []
        self._last_flush = time.monotonic()
        self._started_here = False

    def __enter__(self):
        if not self.enabled:
            return self
        import mlflow
        from mlflow.tracking._tracking_service.utils import is_tracking_uri_set

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
                                   run_name=f"finetune-{self.output_dir.name}")
        self.run_id, self._started_here = run.info.run_id, True
        return self

    def __exit__(self, exc_type, exc, tb):
        if not self.enabled:
            return False
        import mlflow

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
        import mlflow

        params = dict(settings.as_params(), start=start.description[:500],
                      classes=",".join(data.classes)[:500], num_classes=len(data.classes),
                      training_images=data.train_images, validation_images=data.val_images,
                      world_size=world_size, device=device)
        mlflow.log_params(params)

    def set_tags(self, tags: dict) -> None:
        if self.enabled:
            import mlflow

            mlflow.set_tags({k: str(v)[:5000] for k, v in tags.items()})

    def log_metrics(self, metrics: dict, step: int, now: bool = False) -> None:
        if not self.enabled:
            return
        from mlflow.entities import Metric

        timestamp = int(time.time() * 1000)
        self._pending += [Metric(k, float(v), timestamp, int(step)) for k, v in metrics.items()]
        if now or len(self._pending) >= FLUSH_EVERY_STEPS * 6 or \
                time.monotonic() - self._last_flush > FLUSH_EVERY_SECONDS:
            self.flush()

    def flush(self) -> None:
        if not (self.enabled and self._pending):
            return
        from mlflow.tracking import MlflowClient

        client = MlflowClient()
        for i in range(0, len(self._pending), 1000):  # log_batch takes up to 1000 metrics
            client.log_batch(self.run_id, metrics=self._pending[i:i + 1000])
        self._pending, self._last_flush = [], time.monotonic()

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        if self.enabled and Path(path).exists():
            import mlflow

            mlflow.log_artifact(str(path), artifact_path)

    def finish(self, result) -> None:
        """The end of a successful training: summary metrics, files and the model."""
        if not self.enabled:
            return
        import mlflow

        import mlflow_model
        from mmdet_mlflow.finetune import CURVES_FILE, METRICS_FILE, RUN_INFO_FILE

        self.flush()
        if result.best:
            mlflow.log_metrics({f"best_{k}": v for k, v in result.best.items()
                                if isinstance(v, (int, float)) and k not in ("epoch", "step")})
        if result.seconds_per_step:
            mlflow.log_metric("seconds_per_step", result.seconds_per_step)
        for name in (CURVES_FILE, METRICS_FILE, RUN_INFO_FILE):
            self.log_artifact(self.output_dir / name)
        pytorch_dir = Path(result.pytorch_model_dir)
        self.log_artifact(pytorch_dir / "config.py", "training_config")
        mlflow_model.log_model(str(pytorch_dir / "config.py"), str(pytorch_dir / "weights.pth"),
                               name="model", classes=result.classes)


def _experiment_id() -> str | None:
    """The experiment the environment names (Azure ML sets it), else ours, created if needed.
    Not mlflow.set_experiment: that exports MLFLOW_EXPERIMENT_ID to every later subprocess,
    whatever tracking store it uses."""
    import mlflow

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


def mean_step_time(times: list[float], skip: int = 2) -> float | None:
    """Mean step time without the first ``skip`` steps (data loader and allocator warm-up)."""
    kept = times[skip:] if len(times) > skip else times
    return sum(kept) / len(kept) if kept else None


class TrainingMonitorHook(Hook):
    """Progress bar, per-step and per-epoch logging, the history file and the plot."""

    priority = "VERY_LOW"

    def __init__(self, run: TrainingRun, output_dir: Path, metric_for_best_model: str,
                 metric_names: dict, progress: bool = True, resumed: bool = False):
        self.run = run
        self.output_dir = Path(output_dir)
        self.metric_for_best_model = metric_for_best_model
        self.metric_names = metric_names       # our name -> mmdet CocoMetric key
        self.progress = progress
        self.resumed = resumed
        self.steps: list[dict] = []
        self.epochs: list[dict] = []
        self.step_times: list[float] = []
        self._bar = None
        self._history = None
        self._quiet = None
        self._captured = None

    # -- history that survives a restart
    def _load_history(self, runner) -> None:
        """Keep what happened up to the checkpoint resumed from; later lines (steps redone after
        the restart, and the resumed epoch's validation when it is redone) are dropped."""
        from mmdet_mlflow.finetune import HISTORY_FILE

        path = self.output_dir / HISTORY_FILE
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
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, path)
        self._history = open(path, "a", buffering=1)

    def _record(self, entry: dict) -> None:
        self._history.write(json.dumps(entry) + "\n")

    # -- mmengine hook points
    def before_train(self, runner) -> None:
        from tqdm import tqdm

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

    def _end_capture(self, runner) -> None:
        if self._quiet is None:
            return
        self._quiet.__exit__(None, None, None)
        self._quiet = None
        from mmdet_mlflow.finetune import EVALUATION_LOG_FILE

        where = f"epoch {runner.epoch}, step {runner.iter}" if runner is not None else "interrupted"
        with open(self.output_dir / EVALUATION_LOG_FILE, "a") as log:
            log.write(f"== {where}\n{self._captured.getvalue()}")

    def after_val_epoch(self, runner, metrics=None) -> None:
        self._end_capture(runner)
        # mmdet's CocoMetric returns nothing at all when the model detected nothing: that is
        # an average precision and recall of 0, not a missing epoch.
        named = {name: float((metrics or {}).get(key, 0.0)) for name, key in self.metric_names.items()}
        entry = dict(kind="epoch", epoch=runner.epoch, step=runner.iter, **named)
        self.epochs.append(entry)
        self._record(entry)
        self.run.log_metrics(named, runner.iter, now=True)
        self.write_plot()
        shown = ", ".join(f"{k} {v:.4f}" for k, v in named.items()
                          if k in ("mean_average_precision", "mean_average_precision_50", "recall"))
        self._bar.write(f"epoch {runner.epoch}: {shown}", file=sys.stderr)

    def after_train(self, runner) -> None:
        self.run.flush()
        self.write_plot()
        self.close()

    def close(self) -> None:
        """Give stdout back, close the bar and the history file (also after a failure)."""
        self._end_capture(None)
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._history is not None:
            self._history.close()
            self._history = None

    def mean_step_seconds(self) -> float | None:
        return mean_step_time(self.step_times)

    def write_plot(self) -> None:
        from mmdet_mlflow.finetune import CURVES_FILE

        if self.steps or self.epochs:
            plot_training_curves(self.steps, self.epochs, self.output_dir / CURVES_FILE,
                                 self.metric_for_best_model)


def plot_training_curves(steps: list[dict], epochs: list[dict], path: Path,
                         metric: str = "mean_average_precision") -> Path:
    """Loss per step (raw and smoothed) beside validation mAP per epoch, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, (ax_loss, ax_map) = plt.subplots(1, 2, figsize=(11, 4))
    if steps:
        x = np.array([s["step"] for s in steps])
        for key, color in (("loss", "tab:blue"), ("loss_cls", "tab:orange"),
                           ("loss_bbox", "tab:green"), ("loss_mask", "tab:red")):
            y = np.array([s.get(key, np.nan) for s in steps], dtype=float)
            if np.isnan(y).all():
                continue
            window = max(1, min(25, len(y) // 10))
            smooth = np.convolve(np.nan_to_num(y), np.ones(window) / window, mode="valid")
            if key == "loss":
                ax_loss.plot(x, y, color=color, alpha=0.25, linewidth=0.8)
            ax_loss.plot(x[window - 1:], smooth, color=color, label=key)
        ax_loss.set_xlabel("step")
        ax_loss.set_ylabel("training loss")
        ax_loss.legend()
        ax_loss.grid(alpha=0.3)
    if epochs:
        x = [e["epoch"] for e in epochs]
        for key, style in ((metric, "o-"), ("mean_average_precision_50", "s--"),
                           ("bbox_mean_average_precision", "^:")):
            values = [e.get(key) for e in epochs]
            if any(v is not None for v in values):
                ax_map.plot(x, [np.nan if v is None else v for v in values], style, label=key)
        ax_map.set_xlabel("epoch")
        ax_map.set_ylabel("validation (COCO masks unless bbox_)")
        ax_map.set_ylim(bottom=0)
        ax_map.legend()
        ax_map.grid(alpha=0.3)
    fig.suptitle("fine-tuning")
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
    return path
