"""Export an mmdet dense-head detector (RTMDet-Ins, RTMDet, YOLOF) to ONNX for
``scoring.runtimes.onnx_rtmdet``, refusing a file whose outputs differ from torch's.

What is exported is the network only: backbone + neck + head, up to the head's raw outputs (per
level the class logits and box regressions; RTMDet-Ins also the dynamic-kernel parameters and
the mask prototype features), with a dynamic batch axis, at the static input size of the
config's test pipeline (``Pad`` size: 640x640 for RTMDet's COCO configs), or with dynamic
spatial axes where the pipeline resizes without padding to a fixed size (YOLOF: the data
preprocessor pads each batch to a multiple of 32, as the runtime does). The family decides the
head's settings and output names (``head_settings``, ``output_names``); the export is one.
Box decoding, NMS and the dynamic mask convolutions stay out of the graph: they are
data-dependent (how many boxes pass the score threshold), and numpy reproduces mmdet's steps
exactly where an ONNX NMS would not (ORT's NonMaxSuppression is not mmcv's rule). The settings the numpy code needs are written to model.json's "onnx" section.

Needs torch, mmdet and onnxruntime (packaging time); the ``onnx`` package for ``quantize_int8``.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np

from scoring.model_dir import ONNX_FILE, ONNX_INFO_KEY, WeightsDir, onnx_data_file, sha256_of
from scoring.errors import MmdetMlflowError
from scoring.families import FAMILIES, RTMDET_INS, family_named

OPSET = 17
INPUT_NAME = "inputs"
# Refuse the export when |ORT - torch| > ATOL + RTOL * max|torch| for any output. Float32 ops
# reordered by ORT's graph optimizations differ by ~1e-6 relative; a wrong export by far more.
ATOL = 1e-4
RTOL = 1e-4


class OnnxExportError(MmdetMlflowError):
    """The model cannot be exported, or its ONNX outputs differ from torch's beyond tolerance."""


# The head's outputs in the order its forward returns them (a list per level, or one tensor);
# a head has the first two, RTMDet-Ins all four.
OUTPUT_KINDS = ("cls_scores", "bbox_preds", "kernel_preds", "mask_feat")


def output_names(strides: Sequence[int], with_masks: bool = True) -> dict:
    names = {"cls_scores": [f"cls_score_s{s}" for s in strides],
             "bbox_preds": [f"bbox_pred_s{s}" for s in strides]}
    if with_masks:
        names.update(kernel_preds=[f"kernel_pred_s{s}" for s in strides], mask_feat="mask_feat")
    return names


def flat_output_names(outputs: dict) -> list[str]:
    """The output names in the order of the head's flattened outputs (``_raw_outputs_module``)."""
    flat = []
    for kind in OUTPUT_KINDS:
        if kind in outputs:
            names = outputs[kind]
            flat.extend([names] if isinstance(names, str) else names)
    return flat


# ----------------------------------------------------------------------------- settings


def _step_type(step: dict) -> str:
    return str(step["type"]).split(".")[-1]


def preprocess_settings(cfg) -> dict:
    """The test pipeline and data preprocessor of ``cfg`` as the numbers the numpy preprocessing
    needs; OnnxExportError for anything it does not reproduce (it reproduces mmdet's RTMDet
    test pipelines: Resize (cv2 bilinear) then Pad to a fixed size, DetDataPreprocessor)."""
    from mmdet.utils import get_test_pipeline_cfg

    resize = pad = None
    for step in get_test_pipeline_cfg(cfg):
        kind = _step_type(step)
        if kind == "Resize":
            resize = step
        elif kind == "Pad":
            pad = step
        elif kind not in ("LoadImageFromFile", "LoadImageFromNDArray", "LoadAnnotations",
                          "PackDetInputs"):
            raise OnnxExportError(f"the test pipeline step {kind} has no numpy equivalent in the "
                                  f"ONNX runtime; supported: Resize, Pad (and loading, packing)")
    if resize is None:
        raise OnnxExportError("the test pipeline has no Resize step: the ONNX model needs a "
                              "static input size")
    if resize.get("scale_factor") is not None or resize.get("scale") is None:
        raise OnnxExportError("the test pipeline's Resize must give a scale, not a scale_factor")
    if resize.get("interpolation", "bilinear") != "bilinear" or resize.get("backend", "cv2") != "cv2":
        raise OnnxExportError("the test pipeline's Resize must use cv2 bilinear interpolation")
    scale = resize["scale"]
    scale_wh = (int(scale), int(scale)) if isinstance(scale, (int, float)) else tuple(map(int, scale))
    keep_ratio = bool(resize.get("keep_ratio", False))
    if pad is not None:
        if pad.get("size") is None or pad.get("pad_to_square") or pad.get("size_divisor"):
            raise OnnxExportError("the test pipeline's Pad must pad to a fixed size")
        if pad.get("padding_mode", "constant") != "constant":
            raise OnnxExportError("the test pipeline's Pad must use constant padding")
        size_wh = tuple(map(int, pad["size"]))
        pad_val = pad.get("pad_val", {"img": 0})
        pad_val = pad_val.get("img", 0) if isinstance(pad_val, dict) else pad_val
        pad_value = [float(v) for v in pad_val] if isinstance(pad_val, (list, tuple)) \
            else [float(pad_val)] * 3
    elif not keep_ratio:
        size_wh, pad_value = scale_wh, [0.0] * 3  # every image is resized to exactly this size
    else:
        # no fixed size: the data preprocessor pads each batch (dynamic spatial axes)
        size_wh, pad_value = None, [0.0] * 3
    pre = cfg.model.data_preprocessor
    if pre.get("batch_augments"):
        raise OnnxExportError("the data preprocessor has batch augments at test time")
    mean = pre.get("mean") or [0.0, 0.0, 0.0]
    std = pre.get("std") or [1.0, 1.0, 1.0]
    bgr_to_rgb = bool(pre.get("bgr_to_rgb", False) or pre.get("rgb_to_bgr", False))
    divisor = int(pre.get("pad_size_divisor", 1))
    if size_wh is not None and (size_wh[0] % divisor or size_wh[1] % divisor):
        raise OnnxExportError(f"the input size {size_wh} is not a multiple of the data "
                              f"preprocessor's pad_size_divisor {divisor}")
    # input_hw None: each batch padded to its largest picture, rounded up to pad_size_divisor,
    # with the data preprocessor's pad_value (after normalization)
    return {"input_hw": None if size_wh is None else [size_wh[1], size_wh[0]],
            "resize_scale_wh": list(scale_wh), "keep_ratio": keep_ratio, "pad_value": pad_value,
            "mean": [float(v) for v in mean], "std": [float(v) for v in std],
            "bgr_to_rgb": bgr_to_rgb, "pad_size_divisor": divisor,
            "batch_pad_value": float(pre.get("pad_value", 0))}


# family -> (its head types the numpy post-processing reproduces, their box coder)
HEADS = {"rtmdet-ins": (RTMDET_INS.head_types, "DistancePointBBoxCoder"),
         "rtmdet": (family_named("rtmdet").head_types, "DistancePointBBoxCoder"),
         "yolof": (("YOLOFHead",), "DeltaXYWHBBoxCoder")}


def head_settings(head, family: str = RTMDET_INS.name) -> dict:
    """What the numpy post-processing needs to know about the dense head of a ``family`` model:
    its "kind" (the family), strides, classes, and the family's own (RTMDet-Ins: the dynamic
    mask convolutions; YOLOF: its anchors and box coder's settings)."""
    kind = type(head).__name__
    if family not in HEADS:
        title = FAMILIES[family].title if family in FAMILIES else "these"
        raise OnnxExportError(f"{title} models have no ONNX export here (the ONNX runtime "
                              f"reproduces the heads of {', '.join(HEADS)})")
    head_types, coder = HEADS[family]
    if kind not in head_types:
        raise OnnxExportError(f"the head is {kind}, not one of {', '.join(head_types)}: the "
                              f"ONNX export reproduces those heads' post-processing only")
    if not head.use_sigmoid_cls:
        raise OnnxExportError(f"the head's classifier is softmax: the ONNX runtime reproduces "
                              f"the sigmoid one {family} uses")
    if type(head.bbox_coder).__name__ != coder:
        raise OnnxExportError(f"the head's box coder is {type(head.bbox_coder).__name__}, not {coder}")
    strides = head.prior_generator.strides
    if any(sw != sh for sw, sh in strides):
        raise OnnxExportError(f"the head has non-square strides {strides}")
    settings = {"kind": family, "strides": [int(s[0]) for s in strides],
                "num_classes": int(head.cls_out_channels)}
    if family == "yolof":
        return {**settings, **_anchor_settings(head)}
    settings["prior_offset"] = float(head.prior_generator.offset)
    if family == "rtmdet-ins":
        settings.update(num_prototypes=int(head.num_prototypes),
                        dyconv_channels=int(head.dyconv_channels),
                        weight_nums=[int(n) for n in head.weight_nums],
                        bias_nums=[int(n) for n in head.bias_nums])
    return settings


def _anchor_settings(head) -> dict:
    """An anchor head's base anchors per level (the config's anchor generator's, as it made
    them) and its DeltaXYWHBBoxCoder's decoding settings."""
    generator, coder = head.prior_generator, head.bbox_coder
    if type(generator).__name__ != "AnchorGenerator":
        raise OnnxExportError(f"the head's prior generator is {type(generator).__name__}, not "
                              f"AnchorGenerator")
    if getattr(coder, "use_box_type", False):
        raise OnnxExportError("the head's box coder uses box types")
    return {"base_anchors": [anchors.tolist() for anchors in generator.base_anchors],
            "coder": {"means": [float(v) for v in coder.means], "stds": [float(v) for v in coder.stds],
                      "clip_border": bool(coder.clip_border),
                      "add_ctr_clamp": bool(coder.add_ctr_clamp), "ctr_clamp": float(coder.ctr_clamp)}}


def test_settings(test_cfg) -> dict:
    nms = test_cfg.get("nms") or {}
    if nms.get("type", "nms") != "nms":
        raise OnnxExportError(f"the test_cfg's NMS is {nms.get('type')}; the ONNX runtime "
                              f"reproduces mmcv's plain nms")
    return {"nms_pre": int(test_cfg.get("nms_pre", -1)),
            "score_thr": float(test_cfg.get("score_thr", 0.0)),
            "min_bbox_size": float(test_cfg.get("min_bbox_size", -1)),
            "iou_threshold": float(nms.get("iou_threshold", 0.5)),
            "max_per_img": int(test_cfg.get("max_per_img", 100)),
            "mask_thr_binary": float(test_cfg.get("mask_thr_binary", 0.5))}


def onnx_model_spec(detector) -> dict:
    """model.json's "onnx" section (without the files) for ``detector`` and its ``cfg``, as its
    family (``family_of_config``) decides."""
    from scoring.families import family_of_config
    from scoring.runtimes.rtmdet_numpy import ONNX_INFO_FORMAT

    family = family_of_config(detector.cfg.model)
    head = head_settings(getattr(detector, "bbox_head", None), family.name if family else "")
    return {"format": ONNX_INFO_FORMAT, "opset": OPSET, "input_name": INPUT_NAME,
            "preprocess": preprocess_settings(detector.cfg), "head": head,
            "test_cfg": test_settings(detector.bbox_head.test_cfg),
            "outputs": output_names(head["strides"], with_masks=family.makes_masks), "files": {}}


# ----------------------------------------------------------------------------- export


def _raw_outputs_module(detector):
    import torch

    class RawHeadOutputs(torch.nn.Module):
        """Backbone + neck + head forward, the head's outputs flattened into one tuple."""

        def __init__(self):
            super().__init__()
            self.detector = detector

        def forward(self, inputs):
            flat = []
            for part in self.detector.bbox_head(self.detector.extract_feat(inputs)):
                flat.extend(part if isinstance(part, (list, tuple)) else [part])
            return tuple(flat)

    return RawHeadOutputs().eval()


def export_onnx(detector, onnx_path: str | os.PathLike, spec: dict) -> Path:
    """Write the detector's network (raw head outputs) to ``onnx_path``, its weights beside it
    (``move_weights_out``): legacy TorchScript exporter, opset 17, dynamic batch axis, static
    spatial size where the pipeline pads to one (else dynamic height and width too)."""
    import torch

    onnx_path = Path(onnx_path)
    pre = spec["preprocess"]
    names = flat_output_names(spec["outputs"])
    module = _raw_outputs_module(detector.cpu())
    if pre["input_hw"] is not None:
        height, width = pre["input_hw"]
        axes = {n: {0: "batch"} for n in [INPUT_NAME, *names]}
    else:  # any size the pipeline makes: its scale's, padded as the data preprocessor pads
        divisor = pre["pad_size_divisor"]
        height, width = (-(-side // divisor) * divisor for side in sorted(pre["resize_scale_wh"]))
        # each its own names: an output's size is not its input's
        axes = {n: {0: "batch", 2: f"{n}_height", 3: f"{n}_width"} for n in [INPUT_NAME, *names]}
    dummy = torch.zeros(1, 3, height, width)
    with torch.no_grad():
        torch.onnx.export(module, (dummy,), str(onnx_path), dynamo=False, opset_version=OPSET,
                          input_names=[INPUT_NAME], output_names=names, dynamic_axes=axes,
                          do_constant_folding=True)
    move_weights_out(onnx_path)
    return onnx_path


def move_weights_out(onnx_path: Path) -> Path:
    """Rewrite ``onnx_path`` with its weights in the file ``onnx_data_file`` names beside it.

    Embedded weights are parsed out of the protobuf into a copy, then copied again into ORT's
    own layout; from external data ORT reads them straight into place, so a session builds
    faster and the process peaks lower while loading (the same RSS once loaded; docs/onnx.md
    has the measurement). Returns the data file."""
    import onnx

    data = onnx_path.parent / onnx_data_file(onnx_path.name)
    model = onnx.load(str(onnx_path))
    data.unlink(missing_ok=True)  # onnx appends to an existing data file
    onnx.save_model(model, str(onnx_path), save_as_external_data=True,
                    all_tensors_to_one_file=True, location=data.name, size_threshold=1024)
    return data


def install_onnx(staged: Path, target: Path) -> None:
    """Move a staged ONNX file and its data file into place (the data first: the graph names it)."""
    data = staged.parent / onnx_data_file(staged.name)
    if data.is_file():
        os.replace(data, target.parent / onnx_data_file(target.name))
    os.replace(staged, target)


def sample_images(count: int = 3, seed: int = 0) -> list[np.ndarray]:
    """Deterministic BGR pictures of different sizes and aspect ratios (landscape, portrait,
    small) with smooth shapes on noise, for the export check when no photos are given."""
    import cv2

    rng = np.random.default_rng(seed)
    sizes = [(640, 480), (360, 540), (200, 150), (1000, 700)]
    images = []
    for width, height in (sizes * count)[:count]:
        img = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        img = cv2.GaussianBlur(img, (0, 0), 3)
        for _ in range(5):
            center = (int(rng.integers(0, width)), int(rng.integers(0, height)))
            axes = (int(rng.integers(10, width // 3)), int(rng.integers(10, height // 3)))
            color = tuple(int(c) for c in rng.integers(0, 256, 3))
            cv2.ellipse(img, center, axes, float(rng.integers(0, 180)), 0, 360, color, -1)
        images.append(img)
    return images


def network_inputs(spec: dict, images: Sequence[np.ndarray]) -> np.ndarray:
    """The (N, 3, H, W) tensor the runtime's numpy preprocessing makes for ``images``."""
    from scoring.runtimes.onnx_rtmdet import OnnxPredictor
    from scoring.runtimes.rtmdet_numpy import OnnxModelSpec
    from scoring.schema import PredictParams

    predictor = OnnxPredictor(None, OnnxModelSpec.from_dict(spec), [], PredictParams())
    return predictor.preprocess(images)["inputs"]


def compare_with_torch(detector, onnx_path: Path, spec: dict, inputs: np.ndarray,
                       atol: float = ATOL, rtol: float = RTOL, run=None, label: str = "ORT") -> dict:
    """Run torch and ORT (or ``run(output_names, inputs)``, another runtime, named ``label``) on
    the same inputs (a batch of two or more: the batch axis is dynamic); raise OnnxExportError,
    naming the output and the max difference, where they differ beyond
    ``atol + rtol * max|torch output|``. Returns {output: max abs difference}."""
    import torch

    names = flat_output_names(spec["outputs"])
    module = _raw_outputs_module(detector.cpu())
    with torch.no_grad():
        want = [t.numpy() for t in module(torch.from_numpy(inputs))]
    if run is None:
        import onnxruntime as ort

        session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        got = session.run(names, {INPUT_NAME: inputs})
    else:
        got = run(names, inputs)
    diffs, failures = {}, []
    for name, a, b in zip(names, got, want):
        if a.shape != b.shape:
            failures.append(f"{name}: shape {a.shape} vs torch {b.shape}")
            continue
        diff = float(np.abs(a - b).max())
        allowed = atol + rtol * float(np.abs(b).max())
        diffs[name] = diff
        if not diff <= allowed:  # also catches NaN
            failures.append(f"{name}: max |{label} - torch| = {diff:.3g} > {allowed:.3g}")
    worst = max(diffs.values(), default=float("nan"))
    print(f"ONNX export check on {len(inputs)} images: max |{label} - torch| = {worst:.3g} "
          f"over {len(names)} outputs (allowed {atol:g} + {rtol:g} x max |torch output|)")
    if failures:
        raise OnnxExportError(f"the ONNX model's outputs on {label} differ from torch's: "
                              f"{'; '.join(failures)}")
    return diffs


def check_openvino_against_torch(weights_dir: str | os.PathLike, detector,
                                 images: Sequence[np.ndarray] | None = None) -> float:
    """The exported graph on OpenVINO Runtime at fp32 against torch, as ``compare_with_torch``
    checks ORT (same tolerance): an OpenVINO model serves fp32 only where this passes. Records
    the max difference in model.json's record of model.onnx; returns it."""
    from scoring.runtimes.openvino_rtmdet import load_openvino_predictor

    folder = WeightsDir(weights_dir)
    predictor = load_openvino_predictor(folder.path, precision="fp32", quiet=True)
    info = folder.read_info()
    spec = info[ONNX_INFO_KEY]

    def run(names, inputs):
        outputs = predictor.forward({"inputs": inputs, "metas": None}, None)["outputs"]
        return [outputs[name] for name in names]

    images = list(images) if images is not None else sample_images()
    diffs = compare_with_torch(detector, folder.onnx, spec, network_inputs(spec, images), run=run,
                               label="OpenVINO fp32")
    worst = max(diffs.values())
    spec["files"][ONNX_FILE]["max_abs_diff_openvino_fp32_vs_torch"] = worst
    folder.write_info(info)
    return worst


def file_record(path: Path, **extra) -> dict:
    """model.json's record of an ONNX file: its sha256 and size, and those of its data file."""
    
    record = {"sha256": sha256_of(path), "bytes": path.stat().st_size, **extra}
    data = path.parent / onnx_data_file(path.name)
    if data.is_file():
        record["data"] = {"file": data.name, "sha256": sha256_of(data), "bytes": data.stat().st_size}
    return record


def export_to_weights_dir(weights_dir: str | os.PathLike, detector=None,
                          images: Sequence[np.ndarray] | None = None) -> dict:
    """Export the model of a weights folder (config.py, weights.pth, model.json) to its
    ``model.onnx``, check it against torch on ``images`` (default: ``sample_images()``), and
    record the "onnx" section in its model.json. Nothing is written if the check fails.
    Returns the section."""
    folder = WeightsDir(weights_dir)
    if detector is None:
        from scoring.runtimes.torch_mmdet import load_detector

        detector, _ = load_detector(folder, device="cpu")
    spec = onnx_model_spec(detector)
    images = list(images) if images is not None else sample_images()
    with tempfile.TemporaryDirectory(dir=folder.path) as tmp:
        staged = export_onnx(detector, Path(tmp) / ONNX_FILE, spec)
        diffs = compare_with_torch(detector, staged, spec, network_inputs(spec, images))
        spec["files"][ONNX_FILE] = file_record(staged, precision="fp32",
                                               max_abs_diff_vs_torch=max(diffs.values()))
        install_onnx(staged, folder.onnx)
    info = folder.read_info()
    info[ONNX_INFO_KEY] = spec
    folder.write_info(info)
    return spec


# ----------------------------------------------------------------------------- int8


def quantize_int8(onnx_path: str | os.PathLike, calibration_images: Sequence[np.ndarray],
                  out_path: str | os.PathLike, spec: dict) -> Path:
    """ORT static quantization of ``onnx_path`` to int8 (weights beside it, as
    ``move_weights_out`` writes them), QDQ format, per-channel signed int8
    weights, unsigned int8 activations calibrated (MinMax) on ``calibration_images`` preprocessed
    as the runtime does. U8 activations x S8 weights is the pair ORT's x86 kernels are fast for
    (VPMADDUBSW on AVX2); S8 x S8 is not."""
    import onnx
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    inputs = network_inputs(spec, calibration_images)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self._batches = iter([{INPUT_NAME: inputs[i : i + 1]} for i in range(len(inputs))])

        def get_next(self):
            return next(self._batches, None)

    out_path = Path(out_path)
    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        # given as a loaded model: from a path, it copies the graph without its data file
        quant_pre_process(onnx.load(str(onnx_path)), str(prepared), skip_symbolic_shape=True)
        quantize_static(str(prepared), str(out_path), Reader(), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8)
    move_weights_out(out_path)
    return out_path


def add_int8_to_weights_dir(weights_dir: str | os.PathLike,
                            calibration_images: Sequence[np.ndarray]) -> dict:
    """Quantize a weights folder's model.onnx to model.int8.onnx (``quantize_int8``) and record
    it in model.json's "onnx" files; ``load_onnx_predictor(..., onnx_file=ONNX_INT8_FILE)``
    serves it. Returns its record."""
    from scoring.model_dir import ONNX_INT8_FILE

    folder = WeightsDir(weights_dir)
    info = folder.read_info()
    spec = info[ONNX_INFO_KEY]
    with tempfile.TemporaryDirectory(dir=folder.path) as tmp:
        staged = quantize_int8(folder.onnx, calibration_images, Path(tmp) / ONNX_INT8_FILE, spec)
        record = file_record(staged, precision="int8", quantization="static QDQ, per-channel "
                             "s8 weights, u8 activations (MinMax)",
                             calibration_images=len(calibration_images))
        install_onnx(staged, folder.onnx_int8)
    spec["files"][ONNX_INT8_FILE] = record
    folder.write_info(info)
    return record


def _main() -> None:  # pragma: no cover - a developer's shortcut
    import argparse

    parser = argparse.ArgumentParser(description="Export a saved model's weights folder to ONNX")
    parser.add_argument("weights_dir")
    args = parser.parse_args()
    print(json.dumps(export_to_weights_dir(args.weights_dir), indent=2))


if __name__ == "__main__":  # pragma: no cover
    _main()
