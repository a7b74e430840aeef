"""RTMDet (object detection): a dense head whose class logits lie (batch, classes, h, w), served
through mmdet's own post-processing (``predict_by_feat``) on torch, and as an exported graph with
RTMDet-Ins' numpy post-processing without the masks on ONNX Runtime and OpenVINO."""
from scoring.families.base import (EXPORTED_GRAPH_LOADERS, GRAPH_EXPORTERS, ClassLayer, Family,
                                   TrainingRecipe)
from scoring.schema import OBJECT_DETECTION

FAMILY = Family(
    name="rtmdet",
    title="RTMDet",
    task=OBJECT_DETECTION,
    model_types=("RTMDet",),
    head_types=("RTMDetHead", "RTMDetSepBNHead"),
    config_folders=("rtmdet",),
    shipped_configs=(
        "rtmdet_tiny_8xb32-300e_coco",
        "rtmdet_s_8xb32-300e_coco",
        "rtmdet_m_8xb32-300e_coco",
        "rtmdet_l_8xb32-300e_coco",
        "rtmdet_x_8xb32-300e_coco",
    ),
    class_layer=ClassLayer(r"bbox_head\.rtm_cls\.0\.weight|bbox_head\.rtm_cls\.weight"),
    class_shaped=r"bbox_head\.rtm_cls\..*",
    # RTMDet's AdamW at a fine-tune's gentler rate (the config's 0.004 is for 256 pictures a
    # step from ImageNet weights); its pipelines are written for a 640 square.
    training=TrainingRecipe(learning_rate=0.001, weight_decay=0.05, pipeline_scale=(640, 640)),
    fold_batchnorms=True,
    channels_last=True,
    loaders={"torch": "scoring.runtimes.torch_mmdet:load_dense_head_detector", **EXPORTED_GRAPH_LOADERS},
    exporters=GRAPH_EXPORTERS,
)
