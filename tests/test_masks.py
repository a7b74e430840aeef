"""Masks from low-resolution logits (scoring.runtimes.masks), through public names: the shared
geometry and cutoff, and masks made over windows equal to the whole-picture masks."""
from __future__ import annotations

import math
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from scoring.runtimes.base import keep_ratio_size
from scoring.runtimes.masks import (
    MASK_CHUNK_BYTES,
    MaskGeometry,
    MaskWindow,
    box_window_mask,
    logit_cutoff,
    windowed_resize,
)

ROOT = Path(__file__).resolve().parent.parent

# (width, height): a phone photo, the network's size, small, long and thin, tall
SIZES = [(4032, 3024), (640, 480), (97, 131), (1900, 200), (150, 1300), (320, 240)]


def geometry_for(width: int, height: int, scale=(640, 640)) -> MaskGeometry:
    new_w, new_h = keep_ratio_size(width, height, scale)
    return MaskGeometry.from_scale_factor(8, (new_w / width, new_h / height), (height, width))


def blobs(rng, count: int, size=(80, 80)) -> np.ndarray:
    """Compact masks' logits, as a trained model's: positive in a blob, noisy, negative around."""
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    out = []
    for _ in range(count):
        cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(1, 15)
        out.append(3 - 6 * ((yy - cy) ** 2 + (xx - cx) ** 2) / r ** 2 + rng.normal(0, 1, (h, w)))
    return np.stack(out).astype(np.float32)


def test_logit_cutoff_is_the_sigmoid_threshold():
    x = np.linspace(-30, 30, 20001).astype(np.float32)
    sigmoid = 1 / (1 + np.exp(-x.astype(np.float64)))
    for threshold in (0.05, 0.3, 0.5, 0.7, 0.99):
        cut = logit_cutoff(threshold)
        assert abs(1 / (1 + math.exp(-cut)) - threshold) < 1e-12
        differ = (x > cut) != (sigmoid > threshold)
        assert differ.sum() <= 1  # at most the one value sitting on the cut
    assert logit_cutoff(0) == -math.inf and logit_cutoff(-1) == -math.inf
    assert logit_cutoff(1) == math.inf and logit_cutoff(2) == math.inf



@pytest.mark.parametrize("threshold", [0.05, 0.3, 0.5, 0.7, 0.99])
def test_the_torch_cut_is_torchs_own_sigmoid_threshold(threshold):
    """One comparison of the logits answers as ``sigmoid() > threshold`` on every float32 near
    the cut (where exact-arithmetic logits and torch's rounding part: near 0.5 torch's sigmoid
    is 0.5 for every logit under ~9e-8) and far from it, in long and short tensors alike."""
    import torch

    from scoring.runtimes.torch_rtmdet import above_threshold, sigmoid_cutoff

    cut = sigmoid_cutoff(threshold)
    near = np.float32(cut) + np.float32(max(abs(cut), 1e-7)) * np.linspace(-1e-3, 1e-3, 200_001,
                                                                           dtype=np.float32)
    values = torch.cat([torch.from_numpy(near), torch.randn(100_000) * 10,
                        torch.tensor([0.0, 1e-8, 5e-8, -1e-8, float("inf"), -float("inf"), float("nan")])])
    assert torch.equal(above_threshold(values, threshold), values.sigmoid() > threshold)
    for value in near[::1000]:
        one = torch.tensor([value])
        assert torch.equal(above_threshold(one, threshold), one.sigmoid() > threshold)
    assert sigmoid_cutoff(0.0) is None and sigmoid_cutoff(1.0) is None


@pytest.mark.parametrize("width, height", [(640, 640), (640, 480), (97, 131), (320, 240)])
def test_torch_whole_picture_masks_are_mmdets(width, height):
    """mmdet 3.3.0's rule (two bilinear resizes, the crop, sigmoid > threshold), pixel for pixel,
    also where the picture is the network's size and the second resize is skipped, with logits
    that sit on the cut."""
    import torch
    import torch.nn.functional as F

    from scoring.runtimes.torch_rtmdet import MaskResampler

    new_w, new_h = keep_ratio_size(width, height, (640, 640))
    resampler = MaskResampler(8, [width / new_w, height / new_h], (height, width))
    logits = torch.randn(5, 80, 80, generator=torch.Generator().manual_seed(3)) * 4
    logits[0] = 3e-8  # under torch's cut at 0.5: the sigmoid is 0.5 exactly there
    logits[1, ::2] = -3e-8
    assert not resampler.windowed(logits)
    up = F.interpolate(logits.unsqueeze(0), scale_factor=8, mode="bilinear")
    up = F.interpolate(up, size=list(resampler.geometry.upsampled_shape(80, 80)), mode="bilinear",
                       align_corners=False)[..., :height, :width]
    for threshold in (0.5, 0.3):
        exact = (up.sigmoid().squeeze(0) > threshold).numpy()
        assert np.array_equal(np.stack(list(resampler.iter_masks(logits, threshold))), exact)

def test_geometry_is_mmdets():
    phone = geometry_for(4032, 3024)  # resized to 640x480: factor 6.3 both ways
    # 640 x (1 / (640 / 4032)) is a hair over 4032 in floats: mmdet rounds it up too; the height
    # uses the width's factor, as in mmdet
    assert phone.upsampled_shape(80, 80) == (4033, 4033)
    assert not phone.windowed(80, 80)
    assert phone.chunk_size(80, 80) == MASK_CHUNK_BYTES // (4033 * 4033 * 4)
    assert phone.chunk_size(80, 80, budget=1) == 1
    thin = geometry_for(70000, 700)
    assert thin.windowed(80, 80) and thin.chunk_size(80, 80) == 1
    assert phone.cell_pixels() == pytest.approx((8 * 6.3, 8 * 6.3))
    assert phone.box_window((100.2, 50.5, 300.7, 400), margin_cells=0) == (100, 50, 301, 400)
    assert phone.box_window((-50, -50, 5000, 5000)) == (0, 0, 4032, 3024)
    assert phone.box_window((5000, 10, 6000, 20)) == (4032, 0, 4032, 222)  # empty: outside the picture
    window = MaskWindow(np.ones((2, 3), bool), (4, 1), (5, 8))
    full = window.full()
    assert full.shape == (5, 8) and full.sum() == 6 and full[1:3, 4:7].all()


def _upsample_torch(low):
    import torch
    import torch.nn.functional as F

    return F.interpolate(torch.from_numpy(low)[None, None], scale_factor=8, mode="bilinear")[0, 0].numpy()


def _upsample_cv2(low):
    import cv2

    return cv2.resize(low, (low.shape[1] * 8, low.shape[0] * 8), interpolation=cv2.INTER_LINEAR)


@pytest.mark.parametrize("upsample", [_upsample_torch, _upsample_cv2])
def test_a_window_is_the_whole_pictures_mask_cut_out(upsample):
    """Any window, from the few cells it needs, equals the same window of the whole-picture
    mask made as before (first resize by the runtime over all cells, second over the picture)."""
    rng = np.random.default_rng(0)
    for trial in range(36):
        width, height = SIZES[trial % len(SIZES)]
        geometry = geometry_for(width, height)
        low = (rng.standard_normal((80, 80)) * 4).astype(np.float32)
        whole = windowed_resize(upsample(low)[None], geometry.upsampled_shape(80, 80),
                                (height, width), 0.0)[0]
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        x1, y1 = int(rng.integers(x0, width + 1)), int(rng.integers(y0, height + 1))
        if trial % 6 == 0:  # a window of a few pixels: the runtime still sees enough cells
            x1, y1 = min(width, x0 + 3), min(height, y0 + 2)
        window = box_window_mask(low, geometry, (x0, y0, x1, y1), 0.0, upsample)
        assert window.shape == (y1 - y0, x1 - x0)
        assert np.array_equal(window, whole[y0:y1, x0:x1]), (width, height, (x0, y0, x1, y1))


def test_nothing_of_a_mask_lies_outside_its_support_window():
    rng = np.random.default_rng(1)
    for trial in range(24):
        width, height = SIZES[trial % len(SIZES)]
        geometry = geometry_for(width, height)
        low = blobs(rng, 1)[0] if trial % 2 else (rng.standard_normal((80, 80)) * 4 - 6).astype(np.float32)
        for threshold in (0.3, 0.5, 0.9):
            cut = logit_cutoff(threshold)
            whole = windowed_resize(_upsample_cv2(low)[None], geometry.upsampled_shape(80, 80),
                                    (height, width), cut)[0]
            x0, y0, x1, y1 = geometry.support_window(low, cut)
            outside = whole.copy()
            outside[y0:y1, x0:x1] = False
            assert not outside.any(), (width, height, threshold)
    empty = geometry_for(640, 480).support_window(np.full((80, 80), -9, np.float32), 0.0)
    assert empty[2] - empty[0] == 0 or empty[3] - empty[1] == 0


def test_torch_masks_made_in_windows_are_the_whole_picture_masks():
    """The torch runtime's masks (windowed, then pasted) are bit for bit its whole-picture ones,
    compact or spread over the picture; the windows of compact masks are a few % of it."""
    import torch

    from scoring.runtimes.torch_rtmdet import DeferredMasks, MaskResampler

    rng = np.random.default_rng(2)
    window_pixels = picture_pixels = 0
    for width, height in SIZES:
        new_w, new_h = keep_ratio_size(width, height, (640, 640))
        resampler = MaskResampler(8, [width / new_w, height / new_h], (height, width))
        for logits in (blobs(rng, 6), (rng.standard_normal((3, 80, 80)) * 4).astype(np.float32)):
            tensor = torch.from_numpy(logits)
            for threshold in (0.5, 0.3):
                whole = list(resampler.iter_masks(tensor, threshold))
                windows = list(DeferredMasks(tensor, resampler).iter_windows(threshold))
                assert len(windows) == len(whole)
                for mask, window in zip(whole, windows):
                    assert np.array_equal(window.full(), mask)
                    if logits.shape[0] == 6:
                        window_pixels += window.pixels.size
                        picture_pixels += mask.size
    assert window_pixels < 0.1 * picture_pixels


def test_onnx_masks_made_in_windows_match_its_whole_picture_masks():
    """The numpy runtime's windows follow torch's rule for the second resize where its whole
    masks used OpenCV's (equal within the last float bits): the same masks but a pixel or so."""
    from scoring.runtimes.rtmdet_numpy import NumpyMaskResampler

    rng = np.random.default_rng(3)
    differ = total = 0
    for width, height in SIZES:
        new_w, new_h = keep_ratio_size(width, height, (640, 640))
        resampler = NumpyMaskResampler(blobs(rng, 6), 8, (new_w / width, new_h / height), (height, width))
        for whole, mask in zip(resampler.iter_whole_masks(0.5), resampler.iter_masks(0.5)):
            differ += int((whole != mask).sum())
            total += int(whole.sum())
    assert total > 100_000 and differ <= 1e-5 * total


@pytest.mark.parametrize("runtime", ["torch", "onnx"])
def test_a_box_margin_cuts_masks_to_their_boxes(runtime):
    import torch

    from scoring.runtimes.rtmdet_numpy import NumpyMaskResampler
    from scoring.runtimes.torch_rtmdet import DeferredMasks, MaskResampler

    rng = np.random.default_rng(4)
    width, height = 1000, 750
    geometry = geometry_for(width, height)
    logits = (rng.standard_normal((4, 80, 80)) * 4).astype(np.float32)  # spread over the picture
    boxes = np.array([[100, 100, 300, 200], [0, 0, 50, 60], [900, 700, 1000, 750], [400, 300, 420, 310]],
                     np.float32)
    scale = (1 / geometry.inverse_scale_factor[0], 1 / geometry.inverse_scale_factor[1])

    def source(margin):
        if runtime == "onnx":
            return NumpyMaskResampler(logits, 8, scale, (height, width), boxes, margin)
        resampler = MaskResampler(8, geometry.inverse_scale_factor, (height, width))
        return DeferredMasks(torch.from_numpy(logits), resampler, boxes, margin)

    exact = list(source(None).iter_masks(0.5))
    for box, whole, window in zip(boxes, exact, source(2).iter_windows(0.5)):
        x0, y0, x1, y1 = geometry.box_window(box, 2)
        assert window.offset == (x0, y0) and window.pixels.shape == (y1 - y0, x1 - x0)
        assert np.array_equal(window.pixels, whole[y0:y1, x0:x1])
        assert window.full().sum() == window.pixels.sum()


def test_polygons_of_a_window_are_the_polygons_of_the_whole_mask():
    from scoring.encode import mask_polygons

    rng = np.random.default_rng(5)
    whole = np.zeros((300, 400), bool)
    whole[0:40, 0:30] = True           # touching the picture's corner
    whole[100:180, 150:260] = True
    whole[130:150, 180:200] = False     # a hole (outer contours only)
    whole[250:300, 350:400] = rng.random((50, 50)) > 0.3  # ragged, at the far corner
    for x0, y0, x1, y1 in [(0, 0, 400, 300), (0, 0, 31, 41), (140, 90, 270, 190), (150, 100, 260, 180),
                           (340, 240, 400, 300)]:
        inside = np.zeros_like(whole)
        inside[y0:y1, x0:x1] = whole[y0:y1, x0:x1]
        for tolerance in (0, 0.5, 2):
            want = mask_polygons(inside, tolerance)
            got = mask_polygons(whole[y0:y1, x0:x1], tolerance, (x0, y0))
            assert len(got) == len(want)
            assert all(np.array_equal(a, b) for a, b in zip(got, want))
    assert mask_polygons(np.zeros((0, 0), bool), 0.5, (10, 10)) == []


def test_cells_that_are_not_numbers_do_not_hide_the_others():
    geometry = geometry_for(640, 480)
    low = np.full((80, 80), -9, np.float32)
    low[10:12, 20:22] = 5
    low[50, 50] = np.nan
    x0, y0, x1, y1 = geometry.support_window(low, 0.0)
    assert x0 <= 20 * 8 and x1 >= 22 * 8 and y0 <= 10 * 8 and y1 >= 12 * 8
    assert (x1 - x0) * (y1 - y0) < 0.05 * 640 * 480
    low[60, 60] = np.inf
    x0, y0, x1, y1 = geometry.support_window(low, 0.0)
    assert x1 >= 61 * 8 and y1 == 480  # the picture ends at row 60 of the cells


# Memory from long, thin images

MASKS_UNDER_AN_ADDRESS_SPACE_LIMIT = textwrap.dedent("""
    import resource, sys
    import torch
    from scoring.runtimes.torch_rtmdet import MaskResampler

    # What the tiny RTMDet-Ins gives a 70000x700 image: resized to 640x6 and padded to 640x640,
    # 80x80 mask logits at stride 8. mmdet's way upsamples them to 70000x70000 (19.5 GiB).
    width, height, detections = 70000, 700, 3
    new_w, new_h = 640, 6
    logits = torch.randn(detections, 80, 80, generator=torch.Generator().manual_seed(0))
    resampler = MaskResampler(8, [width / new_w, height / new_h], (height, width))
    limit = int(sys.argv[1])
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    count = 0
    for mask in resampler.iter_masks(logits, 0.5):
        assert mask.shape == (height, width) and mask.dtype == bool, mask.shape
        count += 1
    print("masks", count)
""")


def _address_space_now() -> int:
    """The address space (VmPeak) a Python that imported torch takes, measured, not guessed."""
    probe = "import torch, scoring.runtimes.torch_rtmdet; print(open('/proc/self/status').read())"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT,
                         env={"PYTHONPATH": str(ROOT), "PATH": ""}, timeout=300, check=True).stdout
    return int(next(line.split()[1] for line in out.splitlines() if line.startswith("VmPeak:"))) * 1024


def test_long_thin_image_masks_fit_a_bounded_address_space():
    """Each mask of a 70000x700 image (49 M pixels, under the pixel limit) is made within ~2 GiB
    more than the interpreter itself needs, instead of the 19.5 GiB of upsampled logits."""
    limit = _address_space_now() + 2 * 1024 ** 3
    result = subprocess.run([sys.executable, "-c", MASKS_UNDER_AN_ADDRESS_SPACE_LIMIT, str(limit)],
                            capture_output=True, text=True, cwd=ROOT, timeout=600,
                            env={"PYTHONPATH": str(ROOT), "PATH": ""})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "masks 3" in result.stdout


@pytest.mark.parametrize("width, height", [(1900, 200), (150, 1300)])
def test_windowed_masks_equal_the_exact_ones(width, height):
    """On a moderately elongated image, both paths run: the windowed masks are mmdet's."""
    import torch
    import torch.nn.functional as F

    from scoring.runtimes.base import keep_ratio_size
    from scoring.runtimes.torch_rtmdet import MaskResampler

    new_w, new_h = keep_ratio_size(width, height, (640, 640))
    resampler = MaskResampler(8, [width / new_w, height / new_h], (height, width))
    logits = torch.randn(4, 80, 80, generator=torch.Generator().manual_seed(1)) * 4
    assert resampler.windowed(logits), "the case must take the windowed path"
    windowed = np.stack(list(resampler.iter_masks(logits, 0.5)))
    # mmdet 3.3.0's _bbox_mask_post_process: two bilinear resizes, then the crop
    up = F.interpolate(logits.unsqueeze(0), scale_factor=8, mode="bilinear")
    up = F.interpolate(up, size=list(resampler.geometry.upsampled_shape(80, 80)), mode="bilinear",
                       align_corners=False)[..., :height, :width]
    exact = (up.sigmoid().squeeze(0) > 0.5).numpy()
    assert windowed.shape == (4, height, width)
    # mmdet scales the height by the width's factor, so for a tall image its upsampled mask can
    # be a row or two short of the image (1298 of 1300 rows here): equal wherever mmdet has pixels
    rows, cols = exact.shape[1:]
    assert rows >= height - 2 and cols >= width - 2
    assert np.array_equal(windowed[:, :rows, :cols], exact)


@pytest.mark.parametrize("fixture", ["tiny_model_dir", "tiny_onnx_model_dir"])
def test_the_box_margin_setting_cuts_a_served_models_masks_to_their_boxes(request, monkeypatch, fixture):
    """MMDET_MLFLOW_MASK_BOX_MARGIN=4 (cells) bounds each mask of a loaded model by its box grown
    by 4 cells (the untrained test model's masks spread over the picture: here they are cut),
    and leaves them exactly as they are inside that window; unset, masks are mmdet's; a value
    that is not a number of cells is refused at load, naming the variable."""
    from helpers import scene_image
    from scoring.runtimes import load_predictor
    from scoring.settings import SettingError

    folder = request.getfixturevalue(fixture) / "model"
    image = scene_image(640, 480, 3)
    exact = load_predictor(folder, device="cpu")
    monkeypatch.setenv("MMDET_MLFLOW_MASK_BOX_MARGIN", "4")
    cut = load_predictor(folder, device="cpu")
    assert (exact.mask_box_margin, cut.mask_box_margin) == (None, 4.0)
    params = exact.default_params
    want, got = exact([image], params)[0], cut([image], params)[0]
    assert np.array_equal(want.boxes, got.boxes) and len(want) > 0
    geometry = geometry_for(image.shape[1], image.shape[0], exact.input_scale)
    outside = 0
    for i, (whole, window) in enumerate(zip(want.masks.iter_masks(params.mask_threshold),
                                            got.masks.iter_windows(params.mask_threshold))):
        x0, y0, x1, y1 = geometry.box_window(want.boxes[i], 4)
        full = window.full()
        assert not full[:y0].any() and not full[y1:].any()
        assert not full[:, :x0].any() and not full[:, x1:].any()
        assert np.array_equal(full[y0:y1, x0:x1], whole[y0:y1, x0:x1])
        outside += int(whole.sum() - whole[y0:y1, x0:x1].sum())
    assert outside > 0  # the untrained model's masks do reach past their boxes: the cut did work
    monkeypatch.setenv("MMDET_MLFLOW_MASK_BOX_MARGIN", "four")
    with pytest.raises(SettingError, match="MMDET_MLFLOW_MASK_BOX_MARGIN"):
        load_predictor(folder, device="cpu")
