"""What Azure ML's generated scoring script does for a no-code MLflow deployment, reproduced for
tests (Azure does not support testing no-code deployments locally). Facts from Azure's public
documentation and azureml-assets, as summarised in shared/reference/azure-conventions.md:

- at import, the model is loaded with ``mlflow.pyfunc.load_model`` from
  ``os.path.join(AZUREML_MODEL_DIR, MLFLOW_MODEL_FOLDER)``;
- a request has ``input_data`` (for a column-based signature: a DataFrame in ``split``
  orientation, ``{"columns", "index", "data"}``) and an optional ``params`` object;
- ``model.predict(input_data, params=params)``; a DataFrame result is returned as JSON records.

This is not our code and must not import any of it: it is what the model meets on Azure.
"""
import json
import os

import azureml.ai.monitoring  # noqa: F401  (recent generated scripts import it at start)
import mlflow.pyfunc
import pandas as pd

model = mlflow.pyfunc.load_model(os.path.join(os.environ["AZUREML_MODEL_DIR"],
                                              os.environ.get("MLFLOW_MODEL_FOLDER", "")))


def init():
    pass  # the model was loaded at import, as the generated script does


def run(raw_data):
    request = json.loads(raw_data)
    input_data = request["input_data"]
    frame = pd.DataFrame(data=input_data["data"], columns=input_data.get("columns"),
                         index=input_data.get("index"))
    result = model.predict(frame, params=request.get("params"))
    if isinstance(result, pd.DataFrame):
        result = result.to_dict(orient="records")
    return json.dumps(result)
