"""mmdet-mlflow demo: the whole job end to end, offline (what `make demo` runs)."""
from __future__ import annotations

from pathlib import Path

from mmdet_mlflow.training.precision import PRECISIONS


def add_parser(subparsers):
    p = subparsers.add_parser("demo", help="synthetic data -> fine-tune -> evaluate -> register -> serve -> Azure scripts")
    p.add_argument("--output", default="outputs/demo", help="where everything goes (default: outputs/demo)")
    p.add_argument("--num-images", type=int, default=300, help="synthetic images (train + validation)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--finetune-args", default="--recipe quick-cpu",
                   help="extra `mmdet-mlflow finetune` arguments (default: the measured CPU recipe)")
    p.add_argument("--precision", choices=PRECISIONS, default=None,
                   help="what the fine-tune computes in (default auto: bf16 where the CPU computes it "
                        "natively, fp32 elsewhere; `mmdet-mlflow finetune --help`)")
    p.set_defaults(handler=run)


def run(args):
    import shlex

    from mmdet_mlflow.demo import DemoSettings, run_demo

    run_demo(DemoSettings(Path(args.output), num_images=args.num_images, seed=args.seed,
                          finetune_args=shlex.split(args.finetune_args),
                          **({"precision": args.precision} if args.precision else {})))
