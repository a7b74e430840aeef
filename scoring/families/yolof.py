"""YOLOF (object detection): one dilated-encoder level, a dense head of anchors x classes; on
torch, and as an exported graph (dynamic input size) with numpy post-processing (its anchors and
delta box coder) on ONNX Runtime and OpenVINO."""
from __future__ import annotations

from typing import Any, Sequence

from scoring.families.base import (EXPORTED_GRAPH_LOADERS, GRAPH_EXPORTERS, ClassLayer, Family,
                                   TrainingRecipe)
from scoring.schema import OBJECT_DETECTION

# The config's anchor generator: ratios [1.0] x scales [1, 2, 4, 8, 16].
ANCHORS = 5


class YolofFamily(Family):
    def exclude_classes(self, class_logits: Sequence[Any], excluded: list[int]) -> None:
        """YOLOF's class logits lie (batch, anchors x classes, h, w), anchor-major: the
        excluded classes' channels of every anchor."""
        if not excluded:
            return
        for logits in class_logits:
            classes = logits.shape[1] // ANCHORS
            channels = [anchor * classes + index for anchor in range(ANCHORS) for index in excluded]
            logits[:, channels] = float("-inf")


FAMILY = YolofFamily(
    name="yolof",
    title="YOLOF",
    task=OBJECT_DETECTION,
    model_types=("YOLOF",),
    config_folders=("yolof",),
    shipped_configs=("yolof_r50-c5_8xb8-1x_coco",),
    class_layer=ClassLayer(r"bbox_head\.cls_score\.weight", per_class=ANCHORS),
    class_shaped=r"bbox_head\.cls_score\..*",
    class_rows="anchor-major",  # as exclude_classes reads them
    # SGD: the config's 0.12 is for 64 pictures a step; a fine-tune takes 8.
    training=TrainingRecipe(learning_rate=0.015),
    fold_batchnorms=True,
    channels_last=True,
    loaders={"torch": "scoring.runtimes.torch_mmdet:load_dense_head_detector", **EXPORTED_GRAPH_LOADERS},
    exporters=GRAPH_EXPORTERS,
)
