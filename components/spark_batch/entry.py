"""The Azure ML Spark component's entry file (components/spark_batch/spark-component.yaml):
``mmdet-mlflow spark-batch`` with the component's arguments, from the uploaded code folder."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)  # the repository root, uploaded as the component's code

from mmdet_mlflow.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["spark-batch", *sys.argv[1:]]))
