"""RTMDet-Ins (instance segmentation): its own torch runtime (masks deferred and windowed), and
an exported graph with numpy post-processing on ONNX Runtime and OpenVINO."""
from scoring.families.base import (EXPORTED_GRAPH_LOADERS, GRAPH_EXPORTERS, ClassLayer, Family,
                                   TrainingRecipe)
from scoring.schema import INSTANCE_SEGMENTATION

FAMILY = Family(
    name="rtmdet-ins",
    title="RTMDet-Ins",
    task=INSTANCE_SEGMENTATION,
    model_types=("RTMDet",),
    head_types=("RTMDetInsHead", "RTMDetInsSepBNHead"),
    config_folders=("rtmdet",),
    shipped_configs=(
        "rtmdet-ins_tiny_8xb32-300e_coco",
        "rtmdet-ins_s_8xb32-300e_coco",
        "rtmdet-ins_m_8xb32-300e_coco",
        "rtmdet-ins_l_8xb32-300e_coco",
        "rtmdet-ins_x_8xb16-300e_coco",
    ),
    class_layer=ClassLayer(r"bbox_head\.rtm_cls\.0\.weight|bbox_head\.rtm_cls\.weight"),
    class_shaped=r"bbox_head\.rtm_cls\..*",
    own_key=r"bbox_head\.rtm_kernel\..*",
    # RTMDet's AdamW at a fine-tune's gentler rate (the config's 0.004 is for 256 pictures a
    # step from ImageNet weights); its pipelines are written for a 640 square.
    training=TrainingRecipe(learning_rate=0.001, weight_decay=0.05, pipeline_scale=(640, 640)),
    fold_batchnorms=True,
    channels_last=True,
    loaders={"torch": "scoring.runtimes.torch_rtmdet:load_torch_predictor", **EXPORTED_GRAPH_LOADERS},
    exporters=GRAPH_EXPORTERS,
)
