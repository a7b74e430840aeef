"""mmdet-mlflow synth: write the synthetic fridge-objects data set."""
from __future__ import annotations

from mmdet_mlflow.data.dataset import INSTANCE_SEGMENTATION, TASKS


def add_parser(subparsers):
    p = subparsers.add_parser(
        "synth", help="write a deterministic synthetic fridge-objects instance-segmentation or "
                      "object-detection set",
        description="Fridge-shelf scenes with can, carton, milk_bottle and water_bottle, annotated "
                    "with the polygons of each object's visible part (--task object-detection: "
                    "with their boxes alone). Writes DIR/images/*.jpg, "
                    "DIR/{train,validation}.jsonl (AutoML), DIR/{train,validation}.coco.json, "
                    "MLTable folders DIR/train/ and DIR/validation/, and DIR/preview.png (a few "
                    "images with their annotations drawn). Same seed, same bytes.")
    p.add_argument("--output", required=True, metavar="DIR")
    p.add_argument("--num-images", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--task", choices=TASKS, default=INSTANCE_SEGMENTATION,
                   help="instance-segmentation: polygons; object-detection: the same pictures and "
                        "objects with boxes alone, in every format written (default: %(default)s)")
    p.add_argument("--validation-fraction", type=float, default=0.2)
    p.add_argument("--object-size", type=int, nargs=2, metavar=("MIN", "MAX"), default=None,
                   help="range of the objects' larger side in pixels (default: the demo set's)")
    p.add_argument("--min-visible-fraction", type=float, default=None,
                   help="an object must show at least this fraction of itself behind nearer "
                        "ones to be drawn (default: the demo set's)")
    p.add_argument("--mosaic", type=int, default=1, metavar="N",
                   help="large pictures with small objects: each picture is N x N scenes of the "
                        "ordinary set side by side (N=4: 2560x1920), objects at their usual size "
                        "(the data tiling is for: docs/finetune.md)")
    p.set_defaults(handler=run)


def run(args):
    from mmdet_mlflow.synth import SceneStyle, generate

    chosen = {"object_size": tuple(args.object_size) if args.object_size else None,
              "min_visible_fraction": args.min_visible_fraction}
    style = SceneStyle(**{key: value for key, value in chosen.items() if value is not None})
    datasets = generate(args.output, num_images=args.num_images, seed=args.seed,
                        validation_fraction=args.validation_fraction, style=style,
                        mosaic=args.mosaic, task=args.task)
    counts = ", ".join(f"{split}: {len(d.images)} images / {sum(len(r.instances) for r in d.images)} "
                       f"instances" for split, d in datasets.items())
    print(f"{counts} -> {args.output} (look at {args.output}/preview.png)")
