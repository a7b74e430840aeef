"""mmdet-mlflow convert: AutoML JSONL / MLTable / COCO JSON, any to any."""
from __future__ import annotations


def add_parser(subparsers):
    p = subparsers.add_parser(
        "convert", help="convert instance-segmentation data between AutoML JSONL, MLTable and COCO",
        description="Reads AutoML JSONL, an MLTable folder or COCO JSON (told apart by content) and "
                    "writes the format the output names: .jsonl -> AutoML JSONL, .json -> COCO, "
                    "anything else -> an MLTable folder (with data.jsonl inside). The data is "
                    "validated first; every problem found is listed.")
    p.add_argument("--input", required=True, help="AutoML JSONL file, MLTable folder or COCO JSON")
    p.add_argument("--output", required=True, help="out.jsonl, out.json (COCO) or an MLTable folder")
    p.add_argument("--classes", help="comma-separated class names in category order "
                                     "(default: COCO's order, or the sorted labels of JSONL)")
    p.add_argument("--no-validate", dest="validate", action="store_false",
                   help="do not open the images (existence, decoding, size) before converting")
    p.add_argument("--confine-images", action="store_true",
                   help="refuse image paths outside the folder of the annotation file naming them")
    p.set_defaults(handler=run)


def run(args):
    from mmdet_mlflow.data import convert

    classes = [c.strip() for c in args.classes.split(",")] if args.classes else None
    dataset = convert(args.input, args.output, classes=classes, validate=args.validate,
                      confine_images=args.confine_images)
    instances = sum(len(r.instances) for r in dataset.images)
    print(f"{len(dataset.images)} images, {instances} instances, classes {', '.join(dataset.classes)} "
          f"-> {args.output}")
