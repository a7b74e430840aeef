"""bf16 autocast's numbers at fp32's speed, on a CPU without native bf16 (not a test).

Under ``torch.autocast("cpu", dtype=torch.bfloat16)`` the heavy ops (convolutions and matrix
products, forward and backward) take bf16 inputs and return bf16. A CPU without AMX or
AVX512-BF16 runs those kernels emulated, many times slower than fp32, so a fine-tune there in
bf16 takes hours. Here a dispatch mode (below autocast and autograd) runs each such op on its
bf16 inputs widened to fp32, which is exact, and rounds the result to bf16: what a native kernel
that sums in fp32 returns, up to the order of its sums. Every other op runs as it would.

    # how close the widened ops are to torch's own bf16 kernels on this CPU, and a few losses
    .venv/bin/python bench/bf16_numerics.py check
    # a command with bf16 autocast's numbers (here: the demo recipe's fine-tune in bf16)
    .venv/bin/python bench/bf16_numerics.py run -m mmdet_mlflow.cli finetune ... --precision bf16

It answers "does training in bf16 reach fp32's accuracy?", not "how fast is bf16?": speed needs
the native CPU (``bench/train_step_precision.py``).
"""
from __future__ import annotations

import argparse
import copy
import runpy
import sys
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map

ROOT = Path(__file__).resolve().parent.parent

aten = torch.ops.aten
# The ops autocast runs in bf16 that reach the CPU kernels of a detector's training step.
WIDENED = {aten.convolution.default, aten.convolution_backward.default, aten._convolution.default,
           aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default,
           aten.addbmm.default}


class Bf16OnFp32Kernels(TorchDispatchMode):
    """Widen the bf16 inputs of ``WIDENED`` ops to fp32, compute, round the results to bf16."""

    def __init__(self):
        super().__init__()
        self.widened: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in WIDENED:
            tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
            if tensors and all(t.dtype == torch.bfloat16 for t in tensors):
                self.widened[str(func)] = self.widened.get(str(func), 0) + 1
                wide = func(*tree_map(_widen, args), **tree_map(_widen, kwargs))
                return tree_map(_round, wide)
        return func(*args, **kwargs)


def _widen(value):
    return value.float() if isinstance(value, torch.Tensor) else value


def _round(value):
    return value.to(torch.bfloat16) if isinstance(value, torch.Tensor) else value


def check() -> None:
    """Single ops against torch's bf16 kernels, then the tiny model's losses on 5 batches: fp32,
    torch's bf16 autocast, and autocast on widened kernels."""
    sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "bench")]
    from _quiet import quiet_logs
    from onnx_vs_torch import cpu_description
    from train_step_precision import TINY, batch, build

    quiet_logs()
    print(f"{cpu_description()}; torch {torch.__version__}")
    torch.manual_seed(0)
    x, w, b = torch.randn(2, 64, 32, 32), torch.randn(96, 64, 3, 3) * 0.05, torch.randn(96)
    a, m = torch.randn(64, 128), torch.randn(128, 32)
    ops = {"conv2d": lambda: torch.nn.functional.conv2d(x.bfloat16(), w.bfloat16(), b.bfloat16(), padding=1),
           "matmul": lambda: a.bfloat16() @ m.bfloat16()}
    for name, op in ops.items():
        native = op()
        with Bf16OnFp32Kernels():
            widened = op()
        differ = (native.float() != widened.float()).float().mean().item()
        print(f"{name}: bf16 results that differ between torch's kernel and the widened one: {differ:.2%}")

    model, _ = build(TINY)

    def losses(data, mode):
        kernels = Bf16OnFp32Kernels() if mode == "widened" else torch.autocast("cpu", enabled=False)
        with torch.no_grad(), kernels, torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode != "fp32"):
            processed = model.data_preprocessor(copy.deepcopy(data), True)
            found = model.loss(processed["inputs"], processed["data_samples"])
        return {k: float(sum(x.sum() for x in v) if isinstance(v, list) else v.sum())
                for k, v in found.items() if "loss" in k}

    print("loss (fp32) and how far bf16 moves it: torch's bf16 kernels, widened kernels")
    gaps = {"bf16": [], "widened": []}
    for seed in range(5):
        data = batch(256, 2, 3, seed=seed)
        found = {mode: losses(data, mode) for mode in ("fp32", "bf16", "widened")}
        for key, fp32 in found["fp32"].items():
            moved = {mode: found[mode][key] - fp32 for mode in gaps}
            for mode in gaps:
                gaps[mode].append(abs(moved[mode]))
            print(f"  batch {seed} {key:9s} {fp32:8.5f}  {moved['bf16']:+.5f}  {moved['widened']:+.5f}")
    for mode, values in gaps.items():
        print(f"mean |{mode} - fp32|: {sum(values) / len(values):.5f}")


def run(module: str, argv: list[str]) -> None:
    """``python -m module argv...`` with every widened op rounded as bf16 kernels round."""
    sys.argv = [module, *argv]
    kernels = Bf16OnFp32Kernels()
    try:
        with kernels:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
    finally:
        print(f"bf16 ops run on widened fp32 kernels: {kernels.widened}", file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("check", help="the widened ops against torch's bf16 kernels")
    running = commands.add_parser("run", help="run a module with bf16 autocast on widened kernels")
    running.add_argument("-m", dest="module", required=True)
    running.add_argument("args", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    if args.command == "check":
        check()
    else:
        run(args.module, args.args)


if __name__ == "__main__":
    main()
