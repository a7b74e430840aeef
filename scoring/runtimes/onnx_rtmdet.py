"""Dense-head detectors on ONNX Runtime (RTMDet-Ins, RTMDet, YOLOF): the same answers as the
torch runtime without torch, mmcv, mmdet or mmengine (this module imports numpy, OpenCV and
onnxruntime only).

The ONNX file holds the network up to the head's raw outputs (``mlflow_model.onnx_export``):
per level the class logits and box regressions (RTMDet-Ins: also the dynamic-kernel parameters,
and the mask prototype features). Everything around it is reproduced here in numpy, step by
step as mmdet 3.3.0 / mmcv 2.1.0 do it, in float32 like they do, so that the boxes, scores and
masks match:

- ``preprocess``: the config's test pipeline (``Resize`` keep_ratio, ``Pad``) and
  ``DetDataPreprocessor`` (normalize, channel order, the batch padded to its size divisor) ->
  the very tensor mmdet feeds the network;
- ``postprocess``: the family's class filter on the raw class logits, then the head's
  ``predict_by_feat`` -> ``_predict_by_feat_single`` -> ``_bbox_post_process`` /
  ``_bbox_mask_post_process`` (score filter and top-k, box decoding from the priors: RTMDet's
  point distances or YOLOF's anchor deltas, rescale, min size, mmcv's ``batched_nms``,
  ``max_per_img``; RTMDet-Ins: the dynamic mask convolutions, with the full-size masks made a
  chunk at a time as ``scoring.runtimes.torch_rtmdet.MaskResampler`` makes them).

The settings these steps need (input size, normalization, strides, test_cfg, ...) are written
into model.json's ``"onnx"`` section at export time, so no mmengine config is read here.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from scoring.model_dir import INFO_FILE, ONNX_FILE, ONNX_INFO_KEY, ONNX_INT8_FILE, onnx_data_file, sha256_of
from scoring.runtimes.base import ImageDetections, Predictor, forward_batch_size, masks_wanted
from scoring.class_filter import excluded_classes
from scoring.families import RTMDET_INS, family_of
# The settings recorded at export, and the pre- and post-processing in numpy, live in
# scoring.runtimes.rtmdet_numpy; what is here is the runtime: the session and the Predictor.
from scoring.runtimes.rtmdet_numpy import (ImageMeta, NumpyMaskResampler, OnnxModelError, OnnxModelSpec,
                                           anchor_priors, batched_nms, check_fits_input, delta2bbox,
                                           distance2bbox, dynamic_mask_logits, filter_scores_and_topk,
                                           grid_priors, per_prior, resize_like_mmdet, sigmoid)
from scoring.schema import PredictParams
from scoring.settings import network_threads

# ----------------------------------------------------------------------------- the runtime


class OnnxPredictor(Predictor):
    """A dense-head detector (its ``family``'s head: RTMDet-Ins, RTMDet, YOLOF) through ONNX
    Runtime, with mmdet's pre- and post-processing in numpy."""

    runtime = "onnx"

    def __init__(self, session, spec: OnnxModelSpec, class_names: Sequence[str],
                 default_params: PredictParams, batch_size: int = 1, precision: str = "fp32",
                 family=RTMDET_INS):
        super().__init__(family, class_names, default_params, batch_size)
        self.session = session
        self.precision = precision  # "fp32", or "int8" for the quantized network
        self.spec = spec
        self._priors: dict[tuple, np.ndarray] = {}  # (level, feature map size) -> priors
        self._output_names = [name for kind in ("cls_scores", "bbox_preds", "kernel_preds")
                              for name in spec.outputs.get(kind, ())]
        if spec.with_masks:
            self._output_names.append(spec.outputs["mask_feat"])
        self._mean = np.asarray(spec.mean, np.float32).reshape(1, 1, 3)
        self._std = np.asarray(spec.std, np.float32).reshape(1, 1, 3)
        if spec.keep_ratio:
            self.input_scale = tuple(spec.resize_scale_wh)  # Predictor.image_problem reads it
        self.configured_score_threshold = spec.test_cfg.get("score_thr")

    # --- preprocess: mmdet's test pipeline + DetDataPreprocessor

    def resized(self, image: np.ndarray) -> tuple[np.ndarray, ImageMeta]:
        """The test pipeline's Resize (and the check that a fixed Pad size holds it)."""
        spec = self.spec
        resized, scale_factor = resize_like_mmdet(image, spec.resize_scale_wh, spec.keep_ratio)
        if spec.input_hw is not None:
            check_fits_input(resized, spec.input_hw)
        img_hw = tuple(spec.input_hw) if spec.input_hw is not None else resized.shape[:2]
        return resized, ImageMeta(ori_hw=image.shape[:2], img_hw=img_hw, scale_factor=scale_factor)

    def preprocess_into(self, image: np.ndarray, out: np.ndarray,
                        resized: tuple[np.ndarray, ImageMeta] | None = None) -> ImageMeta:
        """One BGR uint8 image (or its ``resized`` one) -> ``out`` (3, H, W) float32 network
        input; returns its meta.

        The same float32 operations as the test pipeline's Resize, Pad and DetDataPreprocessor
        ((x - mean) / std per pixel, a Pad step's value included; the batch's padding to its
        size divisor with the preprocessor's value, after normalizing), so the tensor is
        bit-identical, but written channel by channel straight into the batch: the padding is
        one constant per channel, and no padded, float or transposed copy of the image is made
        on the way."""
        spec = self.spec
        resized, meta = resized or self.resized(image)
        height, width = resized.shape[:2]
        channels = (2, 1, 0) if spec.bgr_to_rgb else (0, 1, 2)
        pad = np.broadcast_to(np.asarray(spec.pad_value, np.uint8), (3,))
        for c, source in enumerate(channels):
            mean, std = self._mean.flat[c], self._std.flat[c]
            plane = out[c]
            np.subtract(resized[:, :, source], mean, out=plane[:height, :width], dtype=np.float32)
            np.divide(plane[:height, :width], std, out=plane[:height, :width])
            padded_value = ((np.float32(pad[source]) - mean) / std if spec.input_hw is not None
                            else np.float32(spec.batch_pad_value))
            plane[height:, :] = padded_value
            plane[:height, width:] = padded_value
        return meta

    def preprocess(self, images: Sequence[np.ndarray]) -> dict:
        if self.spec.input_hw is not None:
            inputs = np.empty((len(images), 3, *self.spec.input_hw), np.float32)
            metas = [self.preprocess_into(image, inputs[i]) for i, image in enumerate(images)]
            return {"inputs": inputs, "metas": metas}
        # mmdet's stack_batch: the largest picture's size, rounded up to the size divisor
        resized = [self.resized(image) for image in images]
        divisor = self.spec.pad_size_divisor
        height, width = (-(-max(r.shape[axis] for r, _ in resized) // divisor) * divisor
                         for axis in (0, 1))
        inputs = np.empty((len(images), 3, height, width), np.float32)
        metas = [self.preprocess_into(image, inputs[i], one)
                 for i, (image, one) in enumerate(zip(images, resized))]
        return {"inputs": inputs, "metas": metas}

    # --- forward: the network only

    def forward(self, batch: dict, params: PredictParams) -> dict:
        outputs = self.session.run(self._output_names, {self.spec.input_name: batch["inputs"]})
        return {"outputs": dict(zip(self._output_names, outputs)), "metas": batch["metas"]}

    # --- postprocess: RTMDetInsHead.predict_by_feat in numpy

    def test_cfg(self, params: PredictParams) -> dict:
        """The model's test_cfg with this request's params, as the torch runtime's test_cfg()."""
        cfg = dict(self.spec.test_cfg)
        cfg["score_thr"] = params.score_threshold
        cfg["iou_threshold"] = params.iou_threshold
        cfg["max_per_img"] = params.max_detections
        cfg["nms_pre"] = max(int(cfg.get("nms_pre", 1000)), params.max_detections)
        cfg["class_agnostic"] = bool(getattr(params, "class_agnostic_nms", False))
        cfg["with_masks"] = masks_wanted(params) and self.spec.with_masks
        return cfg

    def postprocess(self, raw: dict, params: PredictParams) -> list[ImageDetections]:
        cfg = self.test_cfg(params)
        outputs, names = raw["outputs"], self.spec.outputs
        # the family's class filter: it knows how classes lie in its logits (YOLOF: per anchor)
        self.family.exclude_classes([outputs[n] for n in names["cls_scores"]],
                                    excluded_classes(self.class_names, params))
        results = []
        for i, meta in enumerate(raw["metas"]):
            results.append(self._detections_single(
                [outputs[n][i] for n in names["cls_scores"]],
                [outputs[n][i] for n in names["bbox_preds"]],
                [outputs[n][i] for n in names.get("kernel_preds", ())] or None,
                outputs[names["mask_feat"]][i] if self.spec.with_masks else None, meta, cfg))
        return results

    def level_priors(self, level: int, featmap_hw: tuple[int, int]) -> np.ndarray:
        """The priors of one level's feature map, as the head's prior generator makes them:
        points (x, y, stride, stride) of RTMDet's, or YOLOF's anchors (x1, y1, x2, y2), one row
        per cell and anchor. Kept per size (one, for a static input)."""
        key = (level, tuple(featmap_hw))
        if key not in self._priors:
            stride = self.spec.strides[level]
            self._priors[key] = (anchor_priors(self.spec.base_anchors[level], featmap_hw, stride)
                                 if self.spec.base_anchors
                                 else grid_priors(featmap_hw, stride, self.spec.prior_offset))
        return self._priors[key]

    def decode(self, priors: np.ndarray, regressions: np.ndarray, img_hw) -> np.ndarray:
        """The head's box coder: YOLOF's deltas from anchors, RTMDet's distances from points."""
        if self.spec.base_anchors:
            return delta2bbox(priors, regressions, self.spec.coder, img_hw)
        return distance2bbox(priors[:, :2], regressions, img_hw)

    def _detections_single(self, cls_scores, bbox_preds, kernel_preds, mask_feat,
                           meta: ImageMeta, cfg: dict) -> ImageDetections:
        # _predict_by_feat_single: per level, scores -> filter_scores_and_topk; the rows are
        # (cell, anchor) pairs, classes in the columns (one anchor per cell but for YOLOF)
        num_classes = self.spec.num_classes
        level_boxes, level_priors, level_scores, level_labels, level_kernels = [], [], [], [], []
        for level, (cls_score, bbox_pred) in enumerate(zip(cls_scores, bbox_preds)):
            priors = self.level_priors(level, cls_score.shape[-2:])
            scores = sigmoid(per_prior(cls_score).reshape(-1, num_classes))
            scores, labels, keep = filter_scores_and_topk(scores, cfg["score_thr"], cfg["nms_pre"])
            level_boxes.append(per_prior(bbox_pred).reshape(-1, 4)[keep])
            if kernel_preds is not None:
                level_kernels.append(per_prior(kernel_preds[level])[keep])
            level_priors.append(priors[keep])
            level_scores.append(scores)
            level_labels.append(labels)
        priors = np.concatenate(level_priors)
        boxes = self.decode(priors, np.concatenate(level_boxes), meta.img_hw)
        scores = np.concatenate(level_scores)
        labels = np.concatenate(level_labels)
        # (a box-only head: no kernel columns, so one indexing serves both)
        kernels = (np.concatenate(level_kernels) if level_kernels
                   else np.empty((len(priors), 0), np.float32))

        # _bbox_mask_post_process: rescale (scale_boxes by 1/scale_factor, float32 like torch)
        inverse = np.asarray([1 / meta.scale_factor[0], 1 / meta.scale_factor[1]] * 2, np.float32)
        boxes = boxes * inverse
        min_size = cfg.get("min_bbox_size", -1)
        if min_size is not None and min_size >= 0:
            valid = ((boxes[:, 2] - boxes[:, 0]) > min_size) & ((boxes[:, 3] - boxes[:, 1]) > min_size)
            if not valid.all():
                boxes, scores, labels = boxes[valid], scores[valid], labels[valid]
                kernels, priors = kernels[valid], priors[valid]
        if len(boxes):
            keep = batched_nms(boxes, scores, labels, cfg["iou_threshold"], cfg["class_agnostic"],
                               max_num=cfg["max_per_img"])
            boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
            kernels, priors = kernels[keep], priors[keep]
        masks = None
        if cfg["with_masks"]:
            mask_logits = (dynamic_mask_logits(mask_feat, kernels, priors, self.spec) if len(boxes)
                           else np.zeros((0, *mask_feat.shape[-2:]), np.float32))
            masks = NumpyMaskResampler(mask_logits, self.spec.strides[0], meta.scale_factor,
                                       meta.ori_hw, boxes, self.mask_box_margin)
        return ImageDetections(image_size=(meta.ori_hw[1], meta.ori_hw[0]), boxes=boxes,
                               scores=scores, labels=labels, class_names=self.class_names,
                               masks=masks)


# ----------------------------------------------------------------------------- loading


def default_providers() -> list[str]:
    """The CUDA execution provider when onnxruntime-gpu sees a GPU (unless MMDET_MLFLOW_DEVICE
    says cpu), else the CPU one."""
    import onnxruntime as ort

    from scoring.settings import DEVICE

    device = (DEVICE.value() or "").lower()
    available = ort.get_available_providers()
    if "CUDAExecutionProvider" in available and not device.startswith("cpu"):
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def open_session(onnx_path: Path, spec: OnnxModelSpec, num_threads: int | None = None,
                 providers: Sequence[str] | None = None, spin: bool = True):
    """An ORT session on ``onnx_path``, refused with OnnxModelError unless its input and outputs
    are the ones ``spec`` describes (names, channels, spatial sizes). ``spin=False`` stops ORT's
    threads busy-waiting for work after each run, which steals the CPU from anything else in
    the process (torch, the mask encoding) on a machine with few cores."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if num_threads:
        options.intra_op_num_threads = int(num_threads)
    if not spin:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    try:
        session = ort.InferenceSession(str(onnx_path), sess_options=options,
                                       providers=list(providers or default_providers()))
    except Exception as err:  # ORT raises its own Fail / InvalidProtobuf / InvalidGraph types
        raise OnnxModelError(f"{onnx_path} is not a loadable ONNX model: "
                             f"{type(err).__name__}: {str(err).strip()[:500]}") from None
    check_session_fits(session, spec, onnx_path)
    release_freed_heap()
    return session


def release_freed_heap() -> None:
    """Give the heap's free pages back to the system (glibc's ``malloc_trim``; elsewhere nothing).

    Building a session reads the weights and then replaces every convolution's weights with a
    copy in ORT's blocked (NCHWc) layout; the originals are freed, but glibc keeps those pages in
    the process, fragmented among live blocks: trimming them takes a few milliseconds and gives
    back about the size of the weights' first copy (bench/results/design-choices.md)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS, Windows)
        return
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    trim(0)


def check_session_fits(session, spec: OnnxModelSpec, onnx_path: Path) -> None:
    """The network's input and outputs must be what model.json's settings expect, or every
    answer would be wrong (a file from another model, another class count, input size...)."""
    inputs = session.get_inputs()
    problems = []
    if len(inputs) != 1 or inputs[0].name != spec.input_name:
        problems.append(f"inputs {[i.name for i in inputs]}, expected [{spec.input_name!r}]")
    else:
        shape = inputs[0].shape
        if not _fits(shape[1:], [3, *(spec.input_hw or (None, None))]):
            problems.append(f"input shape {shape}, expected [batch, 3, "
                            f"{', '.join(map(str, spec.input_hw or ('height', 'width')))}]")
    got = {o.name: o.shape for o in session.get_outputs()}
    for name, want in spec.expected_outputs().items():
        if name not in got:
            problems.append(f"no output {name!r}")
        elif not _fits(got[name][1:], want[1:]):
            problems.append(f"output {name!r} has shape {got[name]}, expected {list(want)}")
    if problems:
        size = f"{spec.input_hw[1]}x{spec.input_hw[0]}" if spec.input_hw else "of any size"
        raise OnnxModelError(f"{onnx_path} does not fit this model's settings in model.json "
                             f"({len(spec.outputs['cls_scores'])} levels, {spec.num_classes} "
                             f"classes, input {size}): " + "; ".join(problems))


def _fits(shape, want) -> bool:
    """A graph's shape against the one expected, where an expected None (a dynamic size) takes
    anything, and so does a size the graph leaves unknown (None: OpenVINO infers no channels
    for YOLOF's outputs behind its reshape on a dynamic size; the file's sha256 still holds)."""
    return len(shape) == len(want) and all(w is None or s is None or s == w
                                           for s, w in zip(shape, want))


def open_session_checked(onnx_path: Path, spec: OnnxModelSpec, record: dict,
                         num_threads: int | None, providers: Sequence[str] | None, spin: bool):
    """``open_session``, with the ONNX file and its data file checked against the sha256s that
    model.json's ``record`` of them holds (``build_while_checking``)."""
    return build_while_checking(onnx_path, record,
                                lambda: open_session(onnx_path, spec, num_threads, providers, spin))


def build_while_checking(onnx_path: Path, record: dict, build):
    """``build()`` (an ORT session, an OpenVINO compiled model: anything made from the ONNX file),
    with the ONNX file and its data file checked against the sha256s that model.json's
    ``record`` of them holds (``mlflow_model.onnx_export.file_record``).

    The hashes are computed in a thread while the runtime builds the session (both release the
    GIL), so a cold start does not wait for them on top of the build. A changed file is
    reported as such even when the session could not be built either (a damaged file fails
    both ways)."""
    from concurrent.futures import ThreadPoolExecutor

    data_path = onnx_path.parent / onnx_data_file(onnx_path.name)
    expected = {onnx_path: record.get("sha256")}
    if "data" in record:
        if not data_path.is_file():
            raise OnnxModelError(f"the ONNX weights file {data_path} is missing")
        expected[data_path] = record["data"].get("sha256")

    def changed_files() -> list[str]:
        return [path.name for path, sha256 in expected.items() if sha256 and sha256_of(path) != sha256]

    def refuse_if_changed(changed) -> None:
        if changed.result():
            raise OnnxModelError("; ".join(f"{onnx_path.parent / name} is not the file exported with "
                                           f"this model" for name in changed.result())
                                 + f" (sha256 differs from the one in {INFO_FILE}): re-export the model")

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="onnx-sha256") as pool:
        changed = pool.submit(changed_files)
        try:
            session = build()
        except OnnxModelError:
            refuse_if_changed(changed)
            raise
        refuse_if_changed(changed)
    return session


def read_onnx_model(weights_dir_path: str | os.PathLike, onnx_file: str | None = None,
                    info: dict | None = None):
    """(model.json, its OnnxModelSpec, the ONNX file's path, model.json's record of the file) of
    a weights folder; ``onnx_file`` by default the one model.json's "onnx" section serves (fp32
    or int8), ``info`` the model.json when already read. OnnxModelError for a folder without
    model.json, its "onnx" section or the ONNX file. Shared by every runtime that serves the
    exported graph."""
    folder = Path(weights_dir_path)
    if info is None:
        info_path = folder / INFO_FILE
        if not info_path.is_file():
            raise OnnxModelError(f"no {INFO_FILE} in {folder}: not a saved model's weights folder")
        info = json.loads(info_path.read_text())
    if ONNX_INFO_KEY not in info:
        raise OnnxModelError(f"{folder / INFO_FILE} has no {ONNX_INFO_KEY!r} section: this model "
                             f"was not exported to ONNX")
    spec = OnnxModelSpec.from_dict(info[ONNX_INFO_KEY])
    onnx_file = onnx_file or info[ONNX_INFO_KEY].get("serve", ONNX_FILE)
    onnx_path = folder / onnx_file
    if not onnx_path.is_file():
        raise OnnxModelError(f"the ONNX file {onnx_path} is missing")
    record = info[ONNX_INFO_KEY].get("files", {}).get(onnx_file, {})
    return info, spec, onnx_path, record


def load_onnx_predictor(weights_dir_path: str | os.PathLike, batch_size: int | None = None,
                        num_threads: int | None = None, onnx_file: str | None = None,
                        providers: Sequence[str] | None = None, spin: bool = True, *,
                        info: dict | None = None, device: str | None = None) -> OnnxPredictor:
    """The OnnxPredictor of a weights folder holding model.json (with its "onnx" section) and
    the ONNX file (``read_onnx_model``); ``device="cpu"`` keeps ORT off a GPU. Clear
    OnnxModelError for a missing, corrupt or mismatched ONNX file."""
    info, spec, onnx_path, record = read_onnx_model(weights_dir_path, onnx_file, info)
    if providers is None and device == "cpu":
        providers = ["CPUExecutionProvider"]
    session = open_session_checked(onnx_path, spec, record, num_threads or network_threads(),
                                   providers, spin)
    on_gpu = session.get_providers()[0] == "CUDAExecutionProvider"
    return OnnxPredictor(session, spec, info["classes"],
                         PredictParams.from_dict(info["default_params"]),
                         batch_size=batch_size or forward_batch_size(info, on_gpu),
                         precision="int8" if onnx_path.name == ONNX_INT8_FILE else "fp32",
                         family=family_of(info))
