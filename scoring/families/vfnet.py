"""VFNet (object detection), R50 and X101-64x4d with modulated deformable convolutions."""
from scoring.families.base import ClassLayer, Family, TrainingRecipe
from scoring.schema import OBJECT_DETECTION

FAMILY = Family(
    name="vfnet",
    title="VFNet",
    task=OBJECT_DETECTION,
    model_types=("VFNet",),
    config_folders=("vfnet",),
    shipped_configs=("vfnet_r50-mdconv-c3-c5_fpn_ms-2x_coco", "vfnet_x101-64x4d-mdconv-c3-c5_fpn_ms-2x_coco"),
    class_layer=ClassLayer(r"bbox_head\.vfnet_cls\.weight"),
    class_shaped=r"bbox_head\.vfnet_cls\..*",
    # SGD: the config's 0.01 is for 16 pictures a step; a fine-tune takes 8.
    training=TrainingRecipe(learning_rate=0.005),
    fold_batchnorms=True,
    channels_last=True,
    loaders={"torch": "scoring.runtimes.torch_mmdet:load_dense_head_detector"},
)
