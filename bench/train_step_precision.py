"""One fine-tuning step on CPU in fp32 and under torch's CPU bf16 autocast (not a test): does
bf16 training pay on this CPU? (adopt it for `finetune --precision auto` only if a step
is >= 1.3x faster and the demo recipe's final segm mAP stays within 0.01.)

A step is what mmengine's OptimWrapper does for RTMDet-Ins: forward with loss (``detector.loss``,
the data preprocessor included), backward of the summed losses, SGD update; batch 8 of 256x256
pictures with 3 instances each (boxes + masks), random weights, the model in training mode.
The two precisions alternate, best and median of ``--steps`` after one warm-up each, so machine
load hits both alike. Prints the CPU and its flags, and the ratio.

    .venv/bin/python bench/train_step_precision.py [--models tiny,x] [--steps 3] [--batch 8] [--size 256]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from _quiet import quiet_logs

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "bench")]

from helpers import TINY, X  # noqa: E402

CONFIGS = {"tiny": TINY, "x": X}


def batch(size: int, count: int, num_classes: int, seed: int = 0):
    """``count`` (inputs, data samples) as mmdet's training pipeline hands them to the model."""
    import numpy as np
    import torch
    from mmdet.structures import DetDataSample
    from mmdet.structures.mask import BitmapMasks
    from mmengine.structures import InstanceData

    rng = np.random.default_rng(seed)
    inputs, samples = [], []
    for _ in range(count):
        inputs.append(torch.from_numpy(rng.integers(0, 256, (3, size, size), dtype=np.uint8)))
        boxes, masks = [], np.zeros((3, size, size), np.uint8)
        for k in range(3):
            x0, y0 = rng.integers(0, size // 2, 2)
            w, h = rng.integers(size // 8, size // 2, 2)
            boxes.append([x0, y0, x0 + w, y0 + h])
            masks[k, y0:y0 + h, x0:x0 + w] = 1
        sample = DetDataSample(metainfo=dict(img_shape=(size, size), ori_shape=(size, size),
                                             pad_shape=(size, size), scale_factor=(1.0, 1.0),
                                             batch_input_shape=(size, size)))
        sample.gt_instances = InstanceData(
            bboxes=torch.tensor(boxes, dtype=torch.float32),
            labels=torch.from_numpy(rng.integers(0, num_classes, 3)),
            masks=BitmapMasks(masks, size, size))
        samples.append(sample)
    return {"inputs": inputs, "data_samples": samples}


def build(config: str):
    import torch
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules

    from mlflow_model.configs import load_config

    register_all_modules()
    cfg = load_config(config, num_classes=3)
    model = MODELS.build(cfg.model)
    model.init_weights()
    model.train()
    return model, torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)


def step(model, optimizer, data, bf16: bool) -> float:
    import torch

    started = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        processed = model.data_preprocessor(data, True)
        losses = model.loss(processed["inputs"], processed["data_samples"])
        loss = sum(v.sum() if not isinstance(v, list) else sum(x.sum() for x in v)
                   for k, v in losses.items() if "loss" in k)
    optimizer.zero_grad()
    loss.backward()  # outside autocast, as torch recommends (and mmengine's AmpOptimWrapper does)
    optimizer.step()
    return time.perf_counter() - started


def main() -> None:
    import torch

    from onnx_vs_torch import cpu_description

    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny,x")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's); 1 on a machine others are loading")
    args = parser.parse_args()
    quiet_logs()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"{cpu_description()}; torch {torch.__version__} {torch.get_num_threads()} threads; "
          f"bf16 autocast supported: {torch.cpu._is_avx512_bf16_supported()}; AMX tiles: "
          f"{torch.cpu._is_amx_tile_supported()}", flush=True)
    data = batch(args.size, args.batch, 3)
    for name in args.models.split(","):
        model, optimizer = build(CONFIGS[name])
        times = {"fp32": [], "bf16": []}
        for precision in times:  # warm-up: oneDNN picks and caches its kernels on first use
            step(model, optimizer, data, precision == "bf16")
        for _ in range(args.steps):
            for precision in times:
                times[precision].append(step(model, optimizer, data, precision == "bf16"))
        best = {p: min(t) for p, t in times.items()}
        median = {p: statistics.median(t) for p, t in times.items()}
        print(f"[train step] {name}, batch {args.batch} at {args.size} px: fp32 best "
              f"{best['fp32'] * 1000:.0f} ms (median {median['fp32'] * 1000:.0f}), bf16 autocast best "
              f"{best['bf16'] * 1000:.0f} ms (median {median['bf16'] * 1000:.0f}): "
              f"{best['fp32'] / best['bf16']:.2f}x (median {median['fp32'] / median['bf16']:.2f}x)",
              flush=True)


if __name__ == "__main__":
    main()
