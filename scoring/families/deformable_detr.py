"""Deformable DETR (object detection): queries, not NMS; ``max_per_img`` top queries by score,
so ``iou_threshold`` and ``class_agnostic_nms`` do not apply. The ``classes`` param is applied to
its answers, the head keeping all of them for it (its scores are a top-k over queries x classes,
which over all of them commutes with the filter)."""
from scoring.families.base import ClassLayer, Family, TrainingRecipe
from scoring.schema import OBJECT_DETECTION

FAMILY = Family(
    name="deformable-detr",
    title="Deformable DETR",
    task=OBJECT_DETECTION,
    model_types=("DeformableDETR",),
    config_folders=("deformable_detr",),
    shipped_configs=("deformable-detr-refine-twostage_r50_16xb2-50e_coco",),
    class_layer=ClassLayer(r"bbox_head\.cls_branches\.0\.weight"),
    class_shaped=r"bbox_head\.cls_branches\..*",
    # AdamW with its gradient clipping: the config's 2e-4 is for 32 pictures a step;
    # transformers fine-tune at about half that.
    # The two-stage variant takes its 300 queries as the top-scoring encoder tokens (one per 8x8
    # pixels and coarser levels): its multi-scale training pipeline, scaled to a 320 input, sets
    # the short side to 115-192 px, which still gives over 300 tokens (160: 58-96 px, too few).
    training=TrainingRecipe(
        learning_rate=0.0001, min_image_size=320,
        min_image_size_reason="its two-stage queries are the top 300 encoder tokens, and smaller "
                              "training pictures have fewer"),
    candidate_counts=("num_queries",),
    fold_batchnorms=True,
    channels_last=True,
    loaders={"torch": "scoring.runtimes.torch_mmdet:load_whole_detector"},
)
