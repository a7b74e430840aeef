"""Our code that relies on MLflow's and mmdet's private internals (scoring.serving_guards,
scoring.runtimes.torch_rtmdet) runs only on the versions it was written for: on those it is in
place, once; on another, a warning says what is lost and the library's own behaviour is kept.
What the wraps do on the pinned MLflow is tested through real servers (tests/test_serve.py,
tests/test_hostile.py, tests/test_runner.py); another version is faked by the version value the
guard reads, MLflow's and mmdet's behaviour left as it is."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _pinned(package: str) -> str:
    import mlflow_model

    return next(line.split("==")[1] for line in mlflow_model.pinned_requirements()
                if line.split("==")[0] == package)


def test_the_guards_are_written_for_the_pinned_mlflow_and_mmdet():
    from scoring.runtimes.torch_rtmdet import COPIED_FROM_MMDET
    from scoring.serving_guards import WRITTEN_FOR_MLFLOW

    assert WRITTEN_FOR_MLFLOW == _pinned("mlflow")
    assert COPIED_FROM_MMDET == _pinned("mmdet")


def test_on_the_pinned_mlflow_the_params_check_is_wrapped_once(tiny_pyfunc):
    import mlflow.pyfunc

    from scoring import serving_guards

    wrapped = mlflow.pyfunc._validate_prediction_input
    assert getattr(wrapped, "refuses_unknown_params", False)
    serving_guards.install()  # what every later load calls
    assert mlflow.pyfunc._validate_prediction_input is wrapped


OTHER_MLFLOW = """
import base64, json, pathlib, sys, warnings
import mlflow, mlflow.pyfunc, pandas as pd
mlflow.__version__ = "3.99.0"  # the value the guard reads; MLflow itself is the pinned one
own = mlflow.pyfunc._validate_prediction_input
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    model = mlflow.pyfunc.load_model(sys.argv[1])
image = base64.b64encode(pathlib.Path(sys.argv[2]).read_bytes()).decode()
answer = model.predict(pd.DataFrame({"image": [image]}), params={"score_thresold": 0.9})
print(json.dumps({"warnings": [str(w.message) for w in caught if "private" in str(w.message)],
                  "untouched": mlflow.pyfunc._validate_prediction_input is own,
                  "answers": len(answer)}))
"""


def test_on_another_mlflow_nothing_is_wrapped_and_a_warning_says_what_is_lost(tiny_model_dir, image_files):
    """A fresh process, as a server's: MLflow's own params check stays, so an unknown param is
    ignored (MLflow's behaviour) instead of refused, and the user was told so at load."""
    done = subprocess.run([sys.executable, "-c", OTHER_MLFLOW, str(tiny_model_dir), str(image_files[0])],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["untouched"] and report["answers"] == 1
    assert len(report["warnings"]) == 1, report
    warning = report["warnings"][0]
    assert "mlflow 3.99.0 is installed" in warning and f"mlflow {_pinned('mlflow')} only" in warning
    assert "params the signature does not declare are ignored instead of refused" in warning

