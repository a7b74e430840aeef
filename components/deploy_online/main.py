"""Azure ML component entry: deploy a registered MLflow model to a managed online endpoint
(mmdet_mlflow.azure_deploy does the work; --dry-run writes the YAML and contacts nothing)."""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root: the component's code

from mmdet_mlflow import azure_deploy  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    azure_deploy.add_arguments(parser, "online")
    return azure_deploy.run_from_args("online", parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
