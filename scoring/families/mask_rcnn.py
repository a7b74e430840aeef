"""Mask R-CNN (instance segmentation), ResNet-50 and Swin-T backbones: a softmax RoI head (a
background row in ``fc_cls``), class-specific boxes, and 28x28 mask logits pasted into each
box only when its mask is asked for (``scoring.runtimes.torch_mask_rcnn``)."""
from scoring.families.base import ClassLayer, Family, TrainingRecipe
from scoring.schema import INSTANCE_SEGMENTATION

FAMILY = Family(
    name="mask-rcnn",
    title="Mask R-CNN",
    task=INSTANCE_SEGMENTATION,
    model_types=("MaskRCNN",),
    config_folders=("mask_rcnn", "swin"),
    shipped_configs=("mask-rcnn_r50_fpn_1x_coco", "mask-rcnn_swin-t-p4-w7_fpn_1x_coco"),
    class_layer=ClassLayer(r"roi_head\.bbox_head\.fc_cls\.weight", background=1),
    class_shaped=r"roi_head\.(bbox_head\.fc_(cls|reg)|mask_head\.conv_logits)\..*",
    # SGD: the config's 0.02 is for 16 pictures a step; a fine-tune takes 8.
    training=TrainingRecipe(learning_rate=0.01),
    candidate_counts=("test_cfg.rpn.max_per_img",),
    fold_batchnorms=True,
    channels_last=True,
    loaders={"torch": "scoring.runtimes.torch_mask_rcnn:load_mask_rcnn_detector"},
)
