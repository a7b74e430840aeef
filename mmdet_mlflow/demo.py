"""The main job, offline, end to end (``make demo``): synthetic data -> fine-tune -> evaluate ->
register -> serve with ``mlflow models serve`` -> the Azure online entry script under
``azmlinfsrv`` -> batch scoring. Each step is the ``mmdet-mlflow`` command a user would run,
printed before it runs; a step whose inputs have not changed since its last success is reused.
Servers are started on 127.0.0.1 only and stopped on the way out, Ctrl-C included."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from scoring.model_dir import ModelDir, WeightsDir
from mlflow_model.model_dir import finetune_outputs
from mmdet_mlflow import servers
from mmdet_mlflow.interruption import Interruption

MODEL_NAME = "rtmdet-ins-tiny-fridge"
CONFIG = "rtmdet-ins_tiny_8xb32-300e_coco"


@dataclass
class DemoSettings:
    output: Path
    num_images: int = 300
    seed: int = 0
    finetune_args: list[str] = field(default_factory=lambda: ["--recipe", "quick-cpu"])
    # "auto": bf16 where the CPU computes it natively (AMX, AVX512-BF16), fp32 elsewhere; on the
    # demo recipe bf16's final segm mAP matched fp32's across seeds (docs/runtimes.md)
    precision: str = "auto"
    request_images: int = 2


def say(text: str) -> None:
    print(f"\n== {text}", flush=True)


class Steps:
    """Runs commands, skipping one whose key (its command and the keys of what it reads) matches
    its last successful run."""

    def __init__(self, output: Path):
        self.stamps = output / ".stamps"
        self.stamps.mkdir(parents=True, exist_ok=True)
        self.keys: dict[str, str] = {}

    def run(self, name: str, args: list[str], produces: Path, after: tuple[str, ...] = ()) -> bool:
        key = hashlib.sha256(json.dumps([args, [self.keys[a] for a in after]]).encode()).hexdigest()
        self.keys[name] = key
        stamp = self.stamps / name
        shown = " ".join(["mmdet-mlflow", *args])
        if stamp.is_file() and stamp.read_text() == key and produces.exists():
            print(f"$ {shown}\n  (reused: unchanged since the last run)", flush=True)
            return False
        print(f"$ {shown}", flush=True)
        stamp.unlink(missing_ok=True)
        subprocess.run([sys.executable, "-m", "mmdet_mlflow.cli", *args], check=True)
        interruption.check()  # the step saw the Ctrl-C too and may have exited cleanly
        stamp.write_text(key)
        return True


interruption = Interruption()  # the demo's: check() at every step and wait


def run_demo(settings: DemoSettings) -> dict:
    interruption.install()
    try:
        return _run_demo(settings)
    finally:
        interruption.check()


@dataclass(frozen=True)
class DemoFolders:
    """Where the demo's steps write, all under ``out``."""

    out: Path

    @property
    def tracking(self) -> str:  # the embedded MLflow tracking store and registry
        return f"sqlite:///{self.out / 'mlflow.db'}"

    @property
    def data(self) -> Path:
        return self.out / "data"

    @property
    def finetuned(self) -> Path:
        return self.out / "finetune"

    @property
    def model_dir(self) -> Path:  # the fine-tune's MLflow model
        return finetune_outputs(self.finetuned)[0]

    @property
    def evaluation(self) -> Path:
        return self.out / "evaluation"

    @property
    def batch_predictions(self) -> Path:
        return self.out / "batch" / "predictions.jsonl"


def _run_demo(settings: DemoSettings) -> dict:
    folders = DemoFolders(settings.output.resolve())
    folders.out.mkdir(parents=True, exist_ok=True)
    os.environ["MLFLOW_TRACKING_URI"] = folders.tracking
    steps = Steps(folders.out)
    _step_data(steps, folders, settings)
    _step_finetune(steps, folders, settings)
    headline = _step_evaluate(steps, folders)
    model_uri = _step_register(steps, folders)
    request = seed_request(sorted((folders.data / "images").glob("*.jpg")), folders.data,
                           settings.request_images)
    (folders.out / "request.json").write_text(json.dumps(request))
    with contextlib.ExitStack() as running:
        answer = _step_mlflow_serve(running, folders, model_uri, request)
        _step_azure_online(running, folders, request, answer)
    print("  servers stopped")
    _step_batch(steps, folders)
    return _summary(folders, model_uri, headline)


def _step_data(steps: Steps, folders: DemoFolders, settings: DemoSettings) -> None:
    say(f"1/7 synthetic fridge-objects data -> {folders.data}")
    steps.run("synth", ["synth", "--output", str(folders.data), "--num-images", str(settings.num_images),
                        "--seed", str(settings.seed)], produces=folders.data / "validation.coco.json")


def _step_finetune(steps: Steps, folders: DemoFolders, settings: DemoSettings) -> None:
    say(f"2/7 fine-tune {CONFIG} from scratch on it (tracked in {folders.tracking})")
    data = folders.data
    steps.run("finetune", ["finetune", "--config", CONFIG, "--checkpoint", "none",
                           "--training-data", str(data / "train.jsonl"),
                           "--validation-data", str(data / "validation"),
                           "--output", str(folders.finetuned), "--precision", settings.precision,
                           *settings.finetune_args],
              produces=ModelDir(folders.model_dir).mlmodel, after=("synth",))


def _step_evaluate(steps: Steps, folders: DemoFolders) -> dict:
    """Evaluate the fine-tuned model; returns the headline metrics it printed."""
    evaluation = folders.evaluation
    say(f"3/7 evaluate on the validation set -> {evaluation}")
    steps.run("evaluate", ["evaluate", "--model", str(folders.model_dir), "--test",
                           str(folders.data / "validation.coco.json"), "--output", str(evaluation)],
              produces=evaluation / "metrics.json", after=("finetune",))
    metrics = json.loads((evaluation / "metrics.json").read_text())
    headline = {"segm mAP@[.5:.95]": metrics["segm"]["AP"], "segm AP50": metrics["segm"]["AP50"],
                "bbox mAP@[.5:.95]": metrics["bbox"]["AP"],
                "mean_average_precision": metrics.get("mean_average_precision"),
                "precision": metrics.get("precision"), "recall": metrics.get("recall")}
    for name, value in headline.items():
        print(f"  {name}: {value:.4f}" if isinstance(value, float) else f"  {name}: {value}")
    print(f"  pictures: {', '.join(sorted(p.name for p in evaluation.glob('*.png')))}")
    return headline


def _step_register(steps: Steps, folders: DemoFolders) -> str:
    """Register the fine-tuned model; returns its models:/ URI."""
    say(f"4/7 register the model in the embedded MLflow registry as {MODEL_NAME!r}")
    version = register(folders.finetuned, steps.keys["finetune"])
    model_uri = f"models:/{MODEL_NAME}/{version}"
    print(f"  {model_uri}")
    return model_uri


def _step_mlflow_serve(running: contextlib.ExitStack, folders: DemoFolders, model_uri: str,
                       request: dict) -> list:
    """Serve the registered model with ``mlflow models serve`` (kept running in ``running``) and
    ask it ``request``; returns its answer, drawn on the request's pictures."""
    out = folders.out
    say(f"5/7 mlflow models serve -m {model_uri}, the model card's request (request.json)")
    port = servers.free_port()
    running.enter_context(servers.serve(servers.mlflow_serve_command(model_uri, port),
                                        f"http://127.0.0.1:{port}/ping", out / "mlflow-serve.log"))
    print(f"  serving on http://127.0.0.1:{port} (log: mlflow-serve.log)", flush=True)
    # MLflow's scoring server reads the same columns/index/data under "dataframe_split".
    body = {"dataframe_split": request["input_data"], "params": request["params"]}
    answer = post(f"http://127.0.0.1:{port}/invocations", body)["predictions"]
    show_response(answer)
    pictures = draw(request["files"], answer, out / "serving")
    print(f"  annotated: {', '.join(str(p.relative_to(out)) for p in pictures)}")
    return answer


def _step_azure_online(running: contextlib.ExitStack, folders: DemoFolders, request: dict,
                       mlflow_answer: list) -> None:
    """Serve the model with the Azure ML online entry script under azmlinfsrv (kept running in
    ``running``), ask it the same request and compare with ``mlflow models serve``'s answer."""
    out = folders.out
    say("6/7 the Azure ML online entry script (scoring/azureml/score.py) under azmlinfsrv, same request")
    port = servers.free_port()
    app = servers.azure_app_folder(out / "azure-app")
    running.enter_context(servers.serve(servers.azmlinfsrv_command(folders.model_dir, port),
                                        f"http://127.0.0.1:{port}/", out / "azmlinfsrv.log",
                                        cwd=app, env=servers.azmlinfsrv_env(app)))
    print(f"  serving on http://127.0.0.1:{port}/score (log: azmlinfsrv.log)", flush=True)
    azure_answer = post_when_ready(f"http://127.0.0.1:{port}/score",
                                   {"input_data": request["input_data"], "params": request["params"]})
    show_response(azure_answer)
    same = [len(a["boxes"]) for a in azure_answer] == [len(a["boxes"]) for a in mlflow_answer]
    print(f"  same detections as mlflow models serve: {same}")


def _step_batch(steps: Steps, folders: DemoFolders) -> None:
    say("7/7 batch scoring over the validation images, as Azure's batch driver runs it")
    validation_images = folders.out / "validation-images"
    link_validation_images(folders.data, validation_images)
    steps.run("batch", ["batch", "--model", str(folders.model_dir), "--input", str(validation_images),
                        "--output", str(folders.batch_predictions)],
              produces=folders.batch_predictions, after=("finetune",))


def _summary(folders: DemoFolders, model_uri: str, headline: dict) -> dict:
    """Where everything is (summary.json), printed."""
    say("done")
    summary = {"data": str(folders.data), "model": str(folders.model_dir), "registered": model_uri,
               "evaluation": str(folders.evaluation), "metrics": headline,
               "serving_pictures": str(folders.out / "serving"),
               "batch_predictions": str(folders.batch_predictions),
               "mlflow_ui": f"MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false mlflow ui --backend-store-uri "
                            f"{folders.tracking} --workers 1"}
    (folders.out / "summary.json").write_text(json.dumps(summary, indent=2))
    for name, value in summary.items():
        print(f"  {name}: {value}")
    return summary


def register(finetuned: Path, key: str) -> int:
    """Log the fine-tuned weights as our flavor and register them; reuse the version already
    registered from the same fine-tuning run."""
    import mlflow
    from mlflow import MlflowClient

    import mlflow_model

    client = MlflowClient()
    with contextlib.suppress(Exception):
        for version in client.search_model_versions(f"name='{MODEL_NAME}'"):
            if version.tags.get("demo_key") == key:
                print(f"  (reused: version {version.version} holds this fine-tuning run)")
                return int(version.version)
    mlflow_dir, pytorch_dir = finetune_outputs(finetuned)
    pytorch = WeightsDir(pytorch_dir)
    info = ModelDir(mlflow_dir).data.read_info()
    # not mlflow.set_experiment: it exports MLFLOW_EXPERIMENT_ID to the steps started after this
    experiment = client.get_experiment_by_name("mmdet-mlflow-demo")
    experiment_id = experiment.experiment_id if experiment else client.create_experiment("mmdet-mlflow-demo")
    with mlflow.start_run(run_name="register", experiment_id=experiment_id):
        logged = mlflow_model.log_model(str(pytorch.config), str(pytorch.weights),
                                        name="model", classes=info["classes"],
                                        registered_model_name=MODEL_NAME)
    version = int(logged.registered_model_version)
    client.set_model_version_tag(MODEL_NAME, str(version), "demo_key", key)
    return version


# Class-agnostic NMS: one object gets one answer. Class-aware NMS (mmdet's default) keeps a
# bottle's "milk_bottle" and "water_bottle" boxes both, as two objects.
DEMO_PARAMS = {"class_agnostic_nms": True}


def seed_request(images: list[Path], data: Path, count: int) -> dict:
    """The model card's request: base64 images of the validation set, with the demo's params."""
    import base64

    validation = json.loads((data / "validation.coco.json").read_text())["images"]
    names = {Path(im["file_name"]).name for im in validation}
    chosen = [p for p in images if p.name in names][:count]
    return {"input_data": {"columns": ["image"], "index": list(range(len(chosen))),
                           "data": [base64.b64encode(p.read_bytes()).decode() for p in chosen]},
            "params": dict(DEMO_PARAMS), "files": [str(p) for p in chosen]}


def link_validation_images(data: Path, target: Path) -> None:
    validation = json.loads((data / "validation.coco.json").read_text())["images"]
    target.mkdir(exist_ok=True)
    for image in validation:
        source = (data / image["file_name"]).resolve() if not Path(image["file_name"]).is_absolute() \
            else Path(image["file_name"])
        link = target / source.name
        if not link.exists():
            link.symlink_to(source)


def show_response(predictions: list) -> None:
    for i, prediction in enumerate(predictions):
        boxes = prediction["boxes"]
        shown = [{"label": b["label"], "score": round(b["score"], 3),
                  "box": {k: round(v, 3) for k, v in b["box"].items()},
                  "polygon": f"{len(b['polygon'])} segment(s), {sum(len(s) for s in b['polygon']) // 2} points"}
                 for b in boxes[:3]]
        more = f" (+{len(boxes) - 3} more)" if len(boxes) > 3 else ""
        print(f"  image {i}: {len(boxes)} detections{more}: {json.dumps(shown)}")


def draw(files: list[str], predictions: list, folder: Path) -> list[Path]:
    import cv2

    from mmdet_mlflow.visualize import draw_detections

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for file, prediction in zip(files, predictions):
        target = folder / f"{Path(file).stem}.png"
        cv2.imwrite(str(target), draw_detections(cv2.imread(file), prediction["boxes"]))
        written.append(target)
    return written


def post(url: str, body: dict):
    import requests

    response = requests.post(url, json=body, timeout=300)
    if response.status_code != 200:
        raise RuntimeError(f"{url} answered {response.status_code}: {response.text[:500]}")
    return response.json()


def post_when_ready(url: str, body: dict, timeout: float = 300):
    """azmlinfsrv answers its health route before the entry script's init() has loaded the
    model; retry while it says it is not ready."""
    import requests

    deadline = time.monotonic() + timeout
    while True:
        interruption.check()
        try:
            response = requests.post(url, json=body, timeout=300)
            if response.status_code == 200:
                return response.json()
            if response.status_code < 500 or time.monotonic() > deadline:
                raise RuntimeError(f"{url} answered {response.status_code}: {response.text[:500]}")
        except requests.ConnectionError:
            if time.monotonic() > deadline:
                raise
        time.sleep(1)
