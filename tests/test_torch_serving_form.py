"""The form a torch runtime serves its detector in (``scoring.runtimes.torch_serving_form``): batch
norms folded into the convolutions before them and channels-last memory keep what the network
computes, leave alone what cannot be folded, and keep mmcv's compiled ops fed NCHW. The
families' tests compare each served family's answers with mmdet's own; these check the parts."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from scoring.runtimes.torch_serving_form import fold_batchnorms, to_channels_last


def with_running_stats(module: nn.Module, seed: int = 0) -> nn.Module:
    """``module`` in eval mode, its batch norms given statistics and affine terms far from the
    identity (a fresh norm would fold into nothing)."""
    generator = torch.Generator().manual_seed(seed)
    for norm in module.modules():
        if isinstance(norm, nn.modules.batchnorm._BatchNorm):
            count = norm.num_features
            norm.running_mean.copy_(torch.randn(count, generator=generator))
            norm.running_var.copy_(torch.rand(count, generator=generator) * 3 + 0.1)
            if norm.affine:
                norm.weight.data.copy_(torch.randn(count, generator=generator))
                norm.bias.data.copy_(torch.randn(count, generator=generator))
    return module.eval()


def remaining_norms(module: nn.Module) -> int:
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())


def test_folding_keeps_what_the_network_computes_and_folds_only_a_norm_right_after_a_conv():
    from mmcv.cnn import ConvModule
    from mmcv.cnn.bricks import ConvWS2d

    network = with_running_stats(nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),  # folded
        nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8, affine=False),  # folded
        ConvModule(8, 8, 3, padding=1, norm_cfg=dict(type="BN")),  # conv, norm, act: folded
        ConvModule(8, 8, 3, padding=1, norm_cfg=dict(type="BN"), order=("norm", "conv", "act")),
        nn.Conv2d(8, 8, 1), nn.ReLU(), nn.BatchNorm2d(8),  # an activation between: kept
        ConvWS2d(8, 8, 1), nn.BatchNorm2d(8),  # standardizes its weight as it runs: kept
    ))
    picture = torch.randn(2, 3, 17, 23)
    with torch.inference_mode():
        expected = network(picture)
    folded = copy.deepcopy(network)
    assert fold_batchnorms(folded) == 3
    assert remaining_norms(folded) == remaining_norms(network) - 3
    with torch.inference_mode():
        torch.testing.assert_close(folded(picture), expected, rtol=1e-4, atol=1e-4)


def test_a_norm_in_training_mode_is_not_folded():
    network = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)).train()
    assert fold_batchnorms(network) == 0


@pytest.mark.parametrize("op", ["DeformConv2dPack", "ModulatedDeformConv2dPack"])
def test_channels_last_keeps_the_answers_of_mmcvs_compiled_ops(op):
    """A deformable convolution (VFNet's backbone and head) between plain ones: its kernel reads
    NCHW memory, so it gets NCHW inputs and keeps its own weights; read as NHWC it answers wrong."""
    import mmcv.ops

    torch.manual_seed(0)
    network = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), getattr(mmcv.ops, op)(8, 8, 3, padding=1),
                            nn.Conv2d(8, 4, 1)).eval()
    with torch.no_grad():  # offsets that move the samples: a zero offset hides a wrong layout
        network[1].conv_offset.weight.normal_(0, 0.3)
    picture = torch.randn(1, 3, 20, 28)
    with torch.inference_mode():
        expected = network(picture)
    to_channels_last(network)
    assert network[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert network[1].weight.is_contiguous()
    with torch.inference_mode():
        torch.testing.assert_close(network(picture), expected, rtol=1e-4, atol=1e-4)


def test_a_served_model_runs_folded_and_channels_last_and_load_model_hands_out_mmdets_form(tiny_model_dir):
    import mlflow.pyfunc

    import mlflow_model

    served = mlflow.pyfunc.load_model(str(tiny_model_dir)).get_raw_model().detector
    assert remaining_norms(served) == 0  # RTMDet-Ins: every norm follows a convolution
    assert served.backbone.stem[0].conv.weight.is_contiguous(memory_format=torch.channels_last)
    handed_out = mlflow_model.load_model(str(tiny_model_dir))
    assert remaining_norms(handed_out) > 0
    assert handed_out.backbone.stem[0].conv.weight.is_contiguous()


def test_torch_exact_serves_the_network_as_mmdet_builds_it(tiny_model_dir):
    import mlflow.pyfunc

    exact = mlflow.pyfunc.load_model(str(tiny_model_dir), model_config={"torch_exact": True})
    detector = exact.get_raw_model().detector
    assert remaining_norms(detector) > 0
    assert detector.backbone.stem[0].conv.weight.is_contiguous()


class ReadsMemoryAsNchw(nn.Module):
    """An op of a detector's own that reads its 4-d inputs' memory as NCHW whatever their layout,
    as a compiled extension that skips ``.contiguous()`` would; around the detector's neck."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, features):
        return self.inner(tuple(f.as_strided(f.shape, torch.empty(f.shape).stride()) for f in features))


def generic_detector(wrap_neck: bool = False) -> nn.Module:
    """RetinaNet R18 (no family of its own: the generic path), random weights and norm statistics."""
    from mmdet.registry import MODELS
    from mmengine.registry import init_default_scope

    from mlflow_model.configs import load_config

    init_default_scope("mmdet")
    torch.manual_seed(0)
    detector = MODELS.build(load_config("retinanet_r18_fpn_1x_coco", num_classes=3).model)
    detector.init_weights()
    if wrap_neck:
        detector.neck = ReadsMemoryAsNchw(detector.neck)
    return with_running_stats(detector)


@pytest.mark.parametrize("reads_nchw", [False, True], ids=["plain", "an-op-reading-nchw-memory"])
def test_an_unknown_detector_takes_the_form_only_where_a_probe_shows_the_same_network(reads_nchw):
    """The generic path folds and goes channels-last where the network's raw outputs on a probe
    picture stay mmdet's form's; a detector whose own op reads memory as NCHW (wrong in
    channels-last) is served exactly as mmdet builds it, its outputs bit for bit as before."""
    from scoring.families import FAMILIES
    from scoring.runtimes.torch_serving_form import _probe, _raw_outputs, prepare_for_serving

    detector = generic_detector(wrap_neck=reads_nchw)
    inputs, samples = _probe(detector)
    before = _raw_outputs(detector, inputs, samples)
    served = prepare_for_serving(detector, FAMILIES["mmdet-detection"],
                                 reload=lambda: generic_detector(wrap_neck=reads_nchw))
    after = _raw_outputs(served, inputs, samples)
    first_conv = served.backbone.conv1.weight
    if reads_nchw:
        assert remaining_norms(served) > 0 and first_conv.is_contiguous()
        assert all(torch.equal(a, b) for a, b in zip(after, before))
    else:
        assert remaining_norms(served) == 0
        assert first_conv.is_contiguous(memory_format=torch.channels_last)
        for a, b in zip(after, before):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
