"""Fine-tuning benchmark (not a test). Two numbers, each measured in this run:

(a) wrapper overhead: the mean training-step time of mmengine's bare Runner on the same config
    and data, divided by ours (``mmdet_mlflow.training.finetune``, with its hooks, progress bar
    and MLflow tracking). Higher is better: 1.0 = no overhead, >= 0.95 = our steps take at most
    ~5 % longer. Runs alternate (bare, ours, bare, ours, ...) so machine load hits both alike;
    the same hook times both (mmengine's step timer, wall clock), and the process CPU time per
    step is reported beside it (less sensitive to other load on a shared machine).
(b) quality: the tiny model trained from scratch with the quick CPU recipe (the demo's) on a
    few hundred synthetic images; segm_AP (mask mAP@[.5:.95]) on the synthetic validation set, with the
    wall and CPU time it took.

    python bench/finetune.py [--part a|b|all] [--rounds 3] [--threads N] [--work DIR]
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _quiet import quiet_logs

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mmdet_mlflow.training import QUICK_CPU_CONFIG, FinetuneSettings, finetune, quick_cpu_recipe  # noqa: E402
from mmdet_mlflow.training.config import build_config  # noqa: E402
from mmdet_mlflow.training.data_prep import prepare_data  # noqa: E402
from mmdet_mlflow.training.start import StartingPoint  # noqa: E402
from mmdet_mlflow.training.tracking import mean_step_time, step_seconds  # noqa: E402
from mmdet_mlflow.synth import generate  # noqa: E402

OVERHEAD_IMAGES = 80          # 64 training images: 8 steps an epoch at batch 8
OVERHEAD_EPOCHS = 2
QUALITY_IMAGES = 300          # 240 training, 60 validation
QUALITY_SEED = 0


def step_timer():
    """The same measuring hook for both runners: each step's wall time as mmengine's
    IterTimerHook measures it (data, forward, backward, update and every hook since the
    previous step), and this process's CPU time over the same span."""
    from mmengine.hooks import Hook

    class StepTimes(Hook):
        priority = "LOWEST"

        def __init__(self):
            self.wall, self.cpu, self._last_cpu = [], [], None

        def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
            seconds, now = step_seconds(runner), time.process_time()
            if seconds is not None:
                self.wall.append(seconds)
            if self._last_cpu is not None:
                self.cpu.append(now - self._last_cpu)
            self._last_cpu = now

    return StepTimes()


def bare_runner(data, settings: FinetuneSettings, work_dir: Path):
    """mmengine's own Runner and EpochBasedTrainLoop on the config finetune() builds."""
    from mmengine.runner import Runner

    start = StartingPoint.from_config(QUICK_CPU_CONFIG, "none")
    cfg = copy.deepcopy(build_config(start, data, settings, work_dir, "cpu"))
    cfg.train_cfg = dict(type="EpochBasedTrainLoop", max_epochs=settings.number_of_epochs, val_interval=1)
    runner = Runner.from_cfg(cfg)
    timer = step_timer()
    runner.register_hook(timer)
    runner.train()
    return timer


def ours(data_dir: Path, settings: FinetuneSettings, output: Path):
    timer = step_timer()
    finetune(data_dir / "train.jsonl", data_dir / "validation.jsonl", output, config=QUICK_CPU_CONFIG,
             checkpoint="none", settings=settings, extra_hooks=[timer])
    return timer


def part_a(work: Path, rounds: int) -> dict:
    data_dir = work / "overhead-data"
    if not (data_dir / "train.jsonl").is_file():
        generate(data_dir, num_images=OVERHEAD_IMAGES, seed=1, progress=False)
    settings = quick_cpu_recipe(number_of_epochs=OVERHEAD_EPOCHS)
    coco = work / "overhead-coco"
    data = prepare_data(data_dir / "train.jsonl", data_dir / "validation.jsonl",
                        (coco / "train.coco.json", coco / "validation.coco.json"))
    runs = {"bare": [], "ours": []}
    for i in range(rounds):
        for name, run in (("bare", lambda: bare_runner(data, settings, work / f"bare-{i}")),
                          ("ours", lambda: ours(data_dir, settings, work / f"ours-{i}"))):
            timer = run()
            runs[name].append((mean_step_time(timer.wall), mean_step_time(timer.cpu)))
            print(f"round {i + 1} {name}: {runs[name][-1][0]:.3f} s/step wall, "
                  f"{runs[name][-1][1]:.3f} s/step CPU", file=sys.stderr)
    wall = {k: statistics.median(w for w, _ in v) for k, v in runs.items()}
    cpu = {k: statistics.median(c for _, c in v) for k, v in runs.items()}
    return {"bare_seconds_per_step": wall["bare"], "our_seconds_per_step": wall["ours"],
            "ratio_bare_over_ours": wall["bare"] / wall["ours"],
            "bare_cpu_seconds_per_step": cpu["bare"], "our_cpu_seconds_per_step": cpu["ours"],
            "cpu_ratio_bare_over_ours": cpu["bare"] / cpu["ours"], "rounds": rounds, "per_round": runs}


def part_b(work: Path) -> dict:
    data_dir = work / "quality-data"
    if not (data_dir / "train.jsonl").is_file():
        generate(data_dir, num_images=QUALITY_IMAGES, seed=QUALITY_SEED, progress=False)
    settings = quick_cpu_recipe()
    before = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.monotonic()
    result = finetune(data_dir / "train.jsonl", data_dir / "validation.jsonl", work / "quality",
                      config=QUICK_CPU_CONFIG, checkpoint="none", settings=settings)
    wall = time.monotonic() - t0
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"recipe": settings.as_params(), "config": QUICK_CPU_CONFIG, "wall_seconds": wall,
            "cpu_seconds": cpu, "steps": result.steps, "seconds_per_step": result.seconds_per_step,
            "best": result.best, "epochs": result.epochs,
            "mlflow_model": str(result.mlflow_model_dir)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["a", "b", "all"], default="all")
    parser.add_argument("--rounds", type=int, default=3, help="(a): bare/ours pairs; the median counts")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's, the core count)")
    parser.add_argument("--work", type=Path, help="work folder (default: a temporary one)")
    args = parser.parse_args()
    quiet_logs()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("MLFLOW_TRACKING_URI", "sqlite:///" + str(
        (args.work or Path(tempfile.gettempdir())) / "bench-finetune-mlflow.db"))
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-finetune-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"torch threads {torch.get_num_threads()}, cores {os.cpu_count()}, load average "
          f"{os.getloadavg()[0]:.1f}, work {work}")
    report = {}
    if args.part in ("a", "all"):
        report["overhead"] = a = part_a(work, args.rounds)
        print(f"(a) step time, bare mmengine Runner / ours (higher is better, goal >= 0.95): "
              f"{a['ratio_bare_over_ours']:.3f} wall ({a['bare_seconds_per_step']:.3f} s vs "
              f"{a['our_seconds_per_step']:.3f} s), {a['cpu_ratio_bare_over_ours']:.3f} CPU "
              f"({a['bare_cpu_seconds_per_step']:.3f} s vs {a['our_cpu_seconds_per_step']:.3f} s); "
              f"medians of {a['rounds']} alternating runs")
    if args.part in ("b", "all"):
        report["quality"] = b = part_b(work)
        best = b["best"] or {}
        print(f"(b) tiny from scratch, {QUALITY_IMAGES} synthetic images, quick CPU recipe: "
              f"segm_AP {best.get('segm_AP', 0):.4f} (segm_AP50 "
              f"{best.get('segm_AP50', 0):.4f}, bbox_AP "
              f"{best.get('bbox_AP', 0):.4f}) at epoch {best.get('epoch')} in "
              f"{b['wall_seconds'] / 60:.1f} min wall, {b['cpu_seconds'] / 60:.1f} min CPU; "
              f"recipe {json.dumps(b['recipe'])}")
    (work / "bench-finetune.json").write_text(json.dumps(report, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
