"""Azure ML entry of the evaluate component (spec.yaml): the same arguments, checks and errors
as ``mmdet-mlflow evaluate`` (mmdet_mlflow.commands.evaluate -> mmdet_mlflow.evaluate)."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the code snapshot's root

from mmdet_mlflow.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
