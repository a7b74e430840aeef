"""Validation by tiled inference, for a fine-tune on tiles (``--tile-grid-size``).

mmengine's ValLoop runs ``model.val_step`` on whole validation pictures shrunk to the network's
input. A model fine-tuned on tiles answers with tiles by default (its saved default params), so
that would pick the exported epoch by how well it does on something it will not be asked. Here
each validation picture is scored as the saved model will score it: through the one runner
(``scoring.runner.score_images``), whose tiling (``scoring.tiling``) sends the whole picture and
its tiles through the network in batches and merges their detections (with their masks, for an
instance-segmentation model), run by the network being trained, lent to its family's torch
runtime (``Family.lent_predictor``: any family fine-tunes tiled). The answers go
into the same ``ValidationMetric`` under the same names, and the best epoch is chosen as for any
fine-tune.

Params: the saved model's defaults (the config's test settings, the fine-tune's tiling), at the
score threshold untiled validation scores AP at (the config's ``score_thr``).

Distributed: each rank scores its share of the pictures (the validation sampler's, as
mmengine's ValLoop does) with its own replica of the network, and the metric gathers the shares
on rank 0.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from mmengine.model import is_model_wrapper
from mmengine.registry import LOOPS
from mmengine.runner import ValLoop

from scoring.decode import decode_image
from scoring.families import family_of_config
from scoring.rle import encode_window
from scoring.runner import score_images
from scoring.runtimes.base import ImageDetections
from scoring.schema import PredictParams

DEFAULT_SCORE_THRESHOLD = 0.05  # RTMDet's and Mask R-CNN's configs' score_thr


def validation_params(cfg, tiling: dict) -> PredictParams:
    """The predict params the fine-tuned model is saved with (``family.default_params`` of the
    config's test settings, then the tiling, as ``mlflow_model.save_model`` makes them), at the
    config's ``score_thr``: COCO AP wants the low-score tail, and untiled validation keeps it.
    Masks (as RLE) where the family makes them."""
    family = family_of_config(cfg.model)
    test_cfg = family.detection_cfg(dict(cfg.model.test_cfg))
    return family.default_params(cfg.model.test_cfg).updated(
        {**tiling, "score_threshold": float(test_cfg.get("score_thr", DEFAULT_SCORE_THRESHOLD)),
         "mask_format": "rle" if family.makes_masks else "none"})


def coco_prediction(detections: ImageDetections, params: PredictParams) -> dict:
    """One picture's detections as CocoMetric takes a prediction: boxes in picture pixels,
    scores, class indices, and (an instance-segmentation model's) each mask as COCO RLE (made
    one at a time, each from its window)."""
    prediction = dict(bboxes=torch.from_numpy(np.asarray(detections.boxes, np.float32).reshape(-1, 4)),
                      scores=torch.from_numpy(np.asarray(detections.scores, np.float32)),
                      labels=torch.from_numpy(np.asarray(detections.labels, np.int64)))
    if detections.masks is not None:
        prediction["masks"] = [encode_window(window.pixels, window.offset, window.image_hw)
                               for window in detections.iter_windows(params.mask_threshold)]
    return prediction


@LOOPS.register_module(force=True)
class TiledValLoop(ValLoop):
    """mmengine's ValLoop (same hooks, same evaluator, as many iterations as its data loader
    has batches) scoring each picture with tiled inference. ``tiling``: ``tile_grid_size`` and
    ``tile_overlap_ratio`` (and ``tile_predictions_nms_thresh``, if given)."""

    def __init__(self, runner, dataloader, evaluator, tiling: dict, fp16: bool = False):
        super().__init__(runner, dataloader, evaluator, fp16)
        self.tiling = dict(tiling)
        PredictParams().updated(self.tiling)  # a bad grid: refused when the loop is built

    def picture_batches(self) -> Iterator[list[int]]:
        """This rank's validation pictures (dataset indices), a data-loader batch at a time."""
        size = self.dataloader.batch_size or 1
        batch: list[int] = []
        for index in self.dataloader.sampler:
            batch.append(int(index))
            if len(batch) == size:
                yield batch
                batch = []
        if batch:
            yield batch

    def run(self) -> dict:
        runner = self.runner
        runner.call_hook("before_val")
        runner.call_hook("before_val_epoch")  # the EMA weights go in here
        runner.model.eval()
        dataset = self.dataloader.dataset
        detector = runner.model.module if is_model_wrapper(runner.model) else runner.model
        params = validation_params(runner.cfg, self.tiling)
        family = family_of_config(runner.cfg.model)
        with family.lent_predictor(detector, runner.cfg, dataset.metainfo["classes"], params,
                                   batch_size=self.dataloader.batch_size or 1) as predictor:
            for idx, indices in enumerate(self.picture_batches()):
                self.run_pictures(idx, [dataset.get_data_info(i) for i in indices], predictor, params)
        metrics = self.evaluator.evaluate(len(dataset))
        runner.call_hook("after_val_epoch", metrics=metrics)
        runner.call_hook("after_val")
        return metrics

    @torch.no_grad()
    def run_pictures(self, idx: int, infos: list[dict], predictor, params: PredictParams) -> None:
        """One batch of pictures through tiled inference, into the evaluator."""
        samples = [dict(img_id=info["img_id"], img_path=info["img_path"],
                        ori_shape=(info["height"], info["width"])) for info in infos]
        data_batch = dict(data_samples=samples)
        self.runner.call_hook("before_val_iter", batch_idx=idx, data_batch=data_batch)

        def decode(key, path):
            return decode_image(Path(path).read_bytes(), row=str(path))

        outputs = [dict(sample, pred_instances=scored.response) for sample, scored in zip(
            samples, score_images(predictor, [(i, s["img_path"]) for i, s in enumerate(samples)],
                                  params, encode=coco_prediction, decode=decode))]
        self.evaluator.process(data_samples=outputs, data_batch=data_batch)
        self.runner.call_hook("after_val_iter", batch_idx=idx, data_batch=data_batch, outputs=outputs)
