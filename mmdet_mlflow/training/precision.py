"""The precision fine-tuning computes in: "32" (fp32), "16" (mmengine's AMP, GPU only), "bf16"
(torch's CPU autocast to bfloat16) or "auto" (the fastest one the device has that keeps accuracy).

bf16 on CPU: the forward pass and the losses run under ``torch.autocast("cpu",
dtype=torch.bfloat16)`` while the weights, their gradients and the optimizer's state stay fp32
(``CpuBf16OptimWrapper``). mmengine's own ``AmpOptimWrapper`` refuses to run without a GPU (an
assert in its constructor), hence this wrapper. No loss scaling: bf16 has fp32's exponent range,
so gradients do not underflow as fp16's do.

"auto" follows the rule measured on the demo recipe (docs/runtimes.md, "Fine-tuning with
torch's CPU bf16 autocast"): bf16 only where the CPU computes bf16 natively (the same test
the OpenVINO runtime's ``auto`` uses: ``scoring.runtimes.openvino_rtmdet.cpu_has_bf16``) and only
if ``AUTO_PICKS_BF16_ON_CPU``; on a GPU, "auto" trains as today (fp32).
"""
from __future__ import annotations

from contextlib import contextmanager

PRECISIONS = ("32", "16", "bf16", "auto")

# Whether the demo recipe's measurement supports bf16 for "auto" on CPUs with native bf16
# (the rule: >= 1.3x faster a step AND final segm mAP within 0.01 of fp32's; docs/runtimes.md
# has the numbers). Set from the measurement; see that section before changing it.
AUTO_PICKS_BF16_ON_CPU = True


def cpu_computes_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AMX, AVX512-BF16): OpenVINO's CPU plugin's
    answer, the one place the project decides it. False where OpenVINO is not installed (a
    training environment need not have it) or cannot tell."""
    try:
        from scoring.runtimes.openvino_rtmdet import cpu_has_bf16

        return bool(cpu_has_bf16())
    except Exception:  # noqa: BLE001  (no openvino, or no CPU plugin: no known native bf16)
        return False


def training_precision(requested: str, device: str) -> tuple[str, str | None]:
    """(what training computes in: "32", "16" or "bf16"; a note for the user or None) for the
    ``--precision`` asked for on ``device`` ("cpu" or "cuda")."""
    requested = str(requested)
    if requested == "auto":
        if device == "cuda":
            return "32", None
        if not cpu_computes_bf16():
            return "32", "precision auto: this CPU has no native bf16, training in fp32"
        if not AUTO_PICKS_BF16_ON_CPU:
            return "32", ("precision auto: fp32 (bf16 autocast was not both 1.3x faster and within "
                          "0.01 segm mAP of fp32 on the demo recipe: docs/runtimes.md); "
                          "--precision bf16 asks for it")
        return "bf16", "precision auto: bf16 autocast (this CPU computes bf16 natively)"
    if requested == "16" and device != "cuda":
        return "32", "precision 16 (AMP) needs a GPU: training in 32-bit on CPU"
    if requested == "bf16" and device == "cuda":
        return "32", "precision bf16 is CPU autocast (on a GPU use 16): training in 32-bit"
    if requested == "bf16" and not cpu_computes_bf16():
        return "bf16", ("precision bf16: this CPU has no native bf16, so autocast emulates it "
                        "(slower than fp32)")
    return requested, None


def register_optim_wrapper():
    """Register ``CpuBf16OptimWrapper`` with mmengine's OPTIM_WRAPPERS (imports mmengine)."""
    import torch
    from mmengine.optim import OptimWrapper
    from mmengine.registry import OPTIM_WRAPPERS

    if "CpuBf16OptimWrapper" in OPTIM_WRAPPERS.module_dict:
        return OPTIM_WRAPPERS.get("CpuBf16OptimWrapper")

    @OPTIM_WRAPPERS.register_module()
    class CpuBf16OptimWrapper(OptimWrapper):
        """mmengine's OptimWrapper with the forward and the losses under CPU bf16 autocast:
        fp32 master weights, backward and optimizer step as the plain wrapper does them."""

        @contextmanager
        def optim_context(self, model):
            _losses_in_fp32(getattr(getattr(model, "module", model), "bbox_head", None))
            with super().optim_context(model), torch.autocast("cpu", dtype=torch.bfloat16):
                yield

    return CpuBf16OptimWrapper


def _losses_in_fp32(head) -> None:
    """Run ``head.loss_by_feat`` (the assigner's cost matrix, the losses) outside autocast on
    fp32 copies of the head's outputs: the network computes in bf16, the losses that steer it
    keep fp32's precision (as mmengine's AMP leaves losses in fp32 on GPUs)."""
    import torch

    if head is None or getattr(head, "_losses_in_fp32", False):
        return
    compute = head.loss_by_feat

    def as_fp32(value):
        if isinstance(value, torch.Tensor) and value.dtype == torch.bfloat16:
            return value.float()
        if isinstance(value, (list, tuple)):
            return type(value)(as_fp32(v) for v in value)
        return value

    def loss_by_feat(*args, **kwargs):
        with torch.autocast("cpu", enabled=False):
            return compute(*as_fp32(args), **{k: as_fp32(v) for k, v in kwargs.items()})

    head.loss_by_feat = loss_by_feat
    head._losses_in_fp32 = True
