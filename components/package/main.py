"""Azure ML component entry: package an RTMDet-Ins config + checkpoint as an MLflow model.
Only parses arguments; mlflow_model.save_model does the work."""
import argparse
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root: the component's code

import mlflow_model  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", required=True)
    parser.add_argument("--checkpoint", default="official")
    parser.add_argument("--checkpoint-file", help="overrides --checkpoint")
    parser.add_argument("--classes")
    parser.add_argument("--output", required=True)
    args = parser.parse_args(argv)
    output = Path(args.output)
    if output.is_dir() and not any(output.iterdir()):
        output.rmdir()  # Azure ML creates the output folder; save_model wants to create it
    classes = [c.strip() for c in args.classes.split(",")] if args.classes else None
    mlflow_model.save_model(output, args.config, args.checkpoint_file or args.checkpoint, classes=classes)
    print(f"packaged {args.config} into {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
