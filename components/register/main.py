"""Azure ML component entry: register an MLflow model folder (mmdet_mlflow.azure_register)."""
import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root: the component's code

from mmdet_mlflow import azure_register  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--dry-run", default="false")
    parser.add_argument("--output", required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    details = azure_register.register(Path(args.model), args.name, Path(args.output),
                                      dry_run=args.dry_run.strip().lower() in ("1", "true", "yes"))
    print(details["id"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
