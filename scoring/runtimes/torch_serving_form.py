"""A loaded detector put in the form that serves fastest, with the same answers: each batch norm
that directly follows a convolution folded into it, and on a CPU the network's tensors in
channels-last memory (NHWC).

Both are what the network computes, rearranged. A batch norm in eval mode is a fixed per-channel
scale and shift, which the convolution before it can apply itself: one pass over each feature
map fewer (mmdet's own benchmark tool offers the same folding). oneDNN, which runs torch's
convolutions on x86 CPUs, works in channels-last memory; given NCHW tensors it reorders the
input and output of every convolution. Both change results only by float rounding (a 1e-5 of
a score), which the families' tests against mmdet's ``inference_detector`` bound.

Only a detector the runtime owns is put in this form, never one lent to it (a network in the
middle of its fine-tune) or one handed to a user (``mlflow_model.load_model``); and not where
the model's settings ask for mmdet's answers bit for bit (``torch_exact``). A named family takes
the form once its answers are tested equal to mmdet's in it; a detector no family knows (the
generic path) takes it only where its raw outputs on a probe picture show it the same network.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


def prepare_for_serving(detector: nn.Module, family,
                        reload: Callable[[], nn.Module] | None = None) -> nn.Module:
    """``detector`` (in eval mode) in the form its family serves in (``Family.fold_batchnorms``,
    ``Family.channels_last``; the latter on a CPU only), unless the model's settings ask for
    mmdet's exact form (``scoring.settings.TORCH_EXACT``). Changed in place; for a family that
    has its form checked at load (``Family.verify_serving_form``), where the check fails,
    ``reload()`` (the detector loaded afresh) is returned instead, and without a ``reload`` the
    detector stays as mmdet builds it (nothing to go back to)."""
    from scoring import settings

    if settings.TORCH_EXACT.value():
        return detector
    if family.verify_serving_form:
        return detector if reload is None else _checked_on_a_probe(detector, family, reload)
    return _put_in_form(detector, family)


def _put_in_form(detector: nn.Module, family) -> nn.Module:
    if family.fold_batchnorms:
        fold_batchnorms(detector)
    if family.channels_last and next(detector.parameters()).device.type == "cpu":
        to_channels_last(detector)
    return detector


# How far the served form's raw outputs may lie from mmdet's form's on the probe, relative to the
# largest output: float rounding moves them by about 1e-6 of it.
PROBE_TOLERANCE = 1e-4


def _checked_on_a_probe(detector: nn.Module, family, reload: Callable[[], nn.Module]) -> nn.Module:
    """The detector in its served form where the network's raw outputs (mmdet's ``tensor``
    mode: backbone, neck, heads, no post-processing) on a probe picture stay within
    PROBE_TOLERANCE of mmdet's form's. Where they do not, mmdet's own form, loaded again by
    ``reload`` (rather than a copy of the weights kept for the case), with a log line saying so;
    where the network has no tensor mode, the detector as it is. For a detector no family
    knows: an op of its own may read a tensor's memory as NCHW whatever its layout, or a module
    may run its norm elsewhere than its registration order says."""
    import logging

    inputs, samples = _probe(detector)
    expected = _raw_outputs(detector, inputs, samples)
    if expected is None:
        return detector
    served = _put_in_form(detector, family)
    got = _raw_outputs(served, inputs, samples)
    if got is not None and _agree(got, expected):
        return served
    logging.getLogger(__name__).info(
        "%s: serving the network as mmdet builds it (folded batch norms or channels-last memory "
        "changed its outputs on a probe picture)", type(detector).__name__)
    return reload()


def _probe(detector: nn.Module):
    """A 256 x 320 picture of noise through the detector's own data preprocessor."""
    import numpy as np
    from mmdet.structures import DetDataSample

    pixels = np.random.default_rng(0).integers(0, 256, (3, 256, 320), dtype=np.uint8)
    sample = DetDataSample(metainfo={"img_shape": (256, 320), "ori_shape": (256, 320),
                                     "scale_factor": (1.0, 1.0)})
    device = next(detector.parameters()).device
    with torch.inference_mode():
        data = detector.data_preprocessor({"inputs": [torch.from_numpy(pixels).to(device)],
                                           "data_samples": [sample]}, False)
    return data["inputs"], data["data_samples"]


def _raw_outputs(detector: nn.Module, inputs, samples) -> list[torch.Tensor] | None:
    """Every tensor of the network's ``tensor``-mode outputs, flattened; None where it has no such
    mode or answers something else."""
    try:
        with torch.inference_mode():
            outputs = detector(inputs, samples, mode="tensor")
    except Exception:  # noqa: BLE001 - no tensor mode for this detector: nothing to check against
        return None
    flat: list[torch.Tensor] = []

    def walk(value) -> bool:
        if isinstance(value, torch.Tensor):
            flat.append(value.float().contiguous())
            return True
        if isinstance(value, (list, tuple)):
            return all(walk(item) for item in value)
        if isinstance(value, dict):
            return all(walk(item) for item in value.values())
        return value is None

    return flat if walk(outputs) and flat else None


def _agree(got: list[torch.Tensor], expected: list[torch.Tensor]) -> bool:
    if len(got) != len(expected):
        return False
    for a, b in zip(got, expected):
        if a.shape != b.shape or not torch.equal(torch.isfinite(a), torch.isfinite(b)):
            return False
        finite = torch.isfinite(b)
        scale = float(b[finite].abs().max()) if bool(finite.any()) else 0.0
        if bool(finite.any()) and float((a[finite] - b[finite]).abs().max()) > PROBE_TOLERANCE * (1 + scale):
            return False
    return True


def fold_batchnorms(module: nn.Module) -> int:
    """Fold each batch norm that directly follows a plain convolution, among a module's
    children in the order they run, into that convolution (its weight and bias rescaled, the
    norm replaced by an identity); returns how many were folded.

    Children run in the order they are registered in every mmdet and mmcv module but one:
    mmcv's ``ConvModule`` registers its convolution before its norm whatever its ``order``,
    so its pair is folded only where the norm runs right after the convolution. Anything
    between the two (an activation) breaks a pair, and a convolution that transforms its own
    weight when it runs (weight standardization) or is not a convolution of torch's own (a
    deformable one) is left alone."""
    folded = 0
    order = getattr(module, "order", None)
    pairs_allowed = not (isinstance(order, tuple) and {"conv", "norm"} <= set(order)
                         and order.index("norm") != order.index("conv") + 1)
    previous = None
    for name, child in list(module.named_children()):
        if (pairs_allowed and isinstance(child, _BatchNorm) and _is_plain_conv(previous)
                and _foldable(previous, child)):
            _fold(previous, child)
            module._modules[name] = nn.Identity()
            folded += 1
            previous = None
            continue
        if not isinstance(child, (nn.Conv2d, _BatchNorm)):
            folded += fold_batchnorms(child)
        previous = child
    return folded


def _is_plain_conv(module) -> bool:
    from mmcv.cnn.bricks.wrappers import Conv2d as EmptyTensorConv2d  # nn.Conv2d + empty inputs

    return isinstance(module, nn.Conv2d) and type(module).forward in (
        nn.Conv2d.forward, EmptyTensorConv2d.forward)


def _foldable(conv: nn.Conv2d, norm: _BatchNorm) -> bool:
    return (not norm.training and norm.running_mean is not None and norm.running_var is not None
            and norm.num_features == conv.out_channels)


@torch.no_grad()
def _fold(conv: nn.Conv2d, norm: _BatchNorm) -> None:
    scale = torch.rsqrt(norm.running_var + norm.eps)
    if norm.weight is not None:
        scale = scale * norm.weight
    bias = conv.bias if conv.bias is not None else torch.zeros_like(norm.running_mean)
    bias = (bias - norm.running_mean) * scale
    if norm.bias is not None:
        bias = bias + norm.bias
    conv.weight.mul_(scale.reshape(-1, 1, 1, 1))
    conv.bias = nn.Parameter(bias.to(conv.weight.dtype), requires_grad=False)


def to_channels_last(module: nn.Module) -> None:
    """The 4-d weights of ``module`` in channels-last memory (activations follow: a convolution
    with a channels-last weight answers in channels-last). mmcv's compiled ops read their
    tensors as NCHW: their weights stay as they are and their 4-d inputs are made NCHW when
    they are called (a forward pre-hook)."""
    if type(module).__module__.startswith("mmcv.ops"):
        module.register_forward_pre_hook(_nchw_inputs, with_kwargs=True)
        return
    for parameter in module.parameters(recurse=False):
        if parameter.dim() == 4:
            parameter.data = parameter.data.contiguous(memory_format=torch.channels_last)
    for child in module.children():
        to_channels_last(child)


def _nchw(value):
    return value.contiguous() if isinstance(value, torch.Tensor) and value.dim() == 4 else value


def _nchw_inputs(module, args, kwargs):
    return tuple(_nchw(arg) for arg in args), {key: _nchw(arg) for key, arg in kwargs.items()}
