"""Sparse R-CNN (object detection), R50 and R101, 300 learned proposals refined in stages; no
NMS (``iou_threshold`` and ``class_agnostic_nms`` do not apply)."""
from scoring.families.base import ClassLayer, Family
from scoring.schema import OBJECT_DETECTION

FAMILY = Family(
    name="sparse-rcnn",
    title="Sparse R-CNN",
    task=OBJECT_DETECTION,
    model_types=("SparseRCNN",),
    config_folders=("sparse_rcnn",),
    shipped_configs=("sparse-rcnn_r50_fpn_300-proposals_crop-ms-480-800-3x_coco",
                     "sparse-rcnn_r101_fpn_300-proposals_crop-ms-480-800-3x_coco"),
    class_layer=ClassLayer(r"roi_head\.bbox_head\.0\.fc_cls\.weight"),
    class_shaped=r"roi_head\.bbox_head\.\d+\.fc_cls\..*",
    candidate_counts=("rpn_head.num_proposals",),
    loaders={"torch": "scoring.runtimes.torch_mmdet:load_whole_detector"},
    fold_batchnorms=True,
    channels_last=True,
)
