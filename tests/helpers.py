"""Small test utilities shared by the test modules (real files, real processes)."""
from __future__ import annotations

import base64
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np

TINY = "rtmdet-ins_tiny_8xb32-300e_coco"
# The suite's tiny instance-segmentation model (tests/conftest.py) takes pictures at this input
# size, not its config's 640: a forward pass is most of what a predicting test costs, and the tests
# that use it are about what surrounds the network. What needs the shipped config's own input
# packages it by name.
TINY_TEST_SCALE = (320, 320)
TINY_OD = "rtmdet_tiny_8xb32-300e_coco"  # object detection: boxes only
OD_CLASSES = ("cat", "dog", "bird")  # the object-detection test model's classes
X = "rtmdet-ins_x_8xb16-300e_coco"
VENV_BIN = Path(sys.executable).parent
# What a saved model's network is computed with: a command that refuses bad input from what the
# model's files say must do so in a process where none of these can be imported.
NETWORK_LIBRARIES = ("torch", "torchvision", "mmdet", "mmcv", "mmengine", "onnxruntime", "openvino")


def cli_without(modules, *args, timeout: float = 600) -> subprocess.CompletedProcess:
    """``mmdet-mlflow ARGS`` in a process of its own in which ``modules`` cannot be imported
    (an import of one raises ImportError): what a command must not need, it cannot use."""
    code = ("import sys\n"
            f"for name in {tuple(modules)!r}:\n"
            "    sys.modules[name] = None  # importing it raises ImportError\n"
            "from mmdet_mlflow.cli import main\n"
            "sys.exit(main(sys.argv[1:]))\n")
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


def make_official_checkpoint(path: Path, config: str = TINY, classes=None, seed: int = 0,
                             confident: bool = True) -> Path:
    """A checkpoint in the format mmdet publishes (``{"meta": ..., "state_dict": ...}``), from
    the same config, with randomly initialised weights. ``confident`` lifts the classifier
    biases and widens the mask kernels so that an untrained model still yields detections with
    non-empty masks of varied shapes, worth comparing."""
    import torch
    from mmdet.evaluation import get_classes
    from mmdet.registry import MODELS
    from mmengine.registry import init_default_scope

    from mlflow_model.configs import load_config

    from scoring.families import RTMDET_INS, family_of_config

    classes = list(classes or get_classes("coco"))
    torch.manual_seed(seed)
    init_default_scope("mmdet")
    cfg = load_config(config, num_classes=len(classes))
    model = MODELS.build(cfg.model)
    model.init_weights()
    family = family_of_config(cfg.model)
    if confident:
        with torch.no_grad():
            if family is RTMDET_INS:
                _liven_head(model, seed)
            else:
                _liven_class_biases(model, cfg.model, family)
            if family.name == "sparse-rcnn":
                _calm_staged_regression(model)
    torch.save({"meta": {"mmdet_version": "3.3.0", "dataset_meta": {"classes": tuple(classes)}},
                "state_dict": model.state_dict()}, path)
    return path


def config_with_test_scale(name: str, folder: Path, scale: tuple[int, int]) -> Path:
    """The shipped config ``name`` with its test pipeline's resize at ``scale`` (width, height)
    and a fixed-size padding (RTMDet's) to match, as a config file of the same name in ``folder``:
    the same network on smaller pictures, where a test is about what surrounds the network."""
    from mlflow_model.configs import load_config

    cfg = load_config(name)
    for pipeline in (cfg.get("test_pipeline"), cfg.get("test_dataloader", {}).get("dataset", {}).get("pipeline")):
        for step in pipeline or []:
            kind = str(step.get("type", "")).split(".")[-1]
            if kind.endswith("Resize") and "scale" in step:
                step["scale"] = tuple(scale)
            elif kind == "Pad" and step.get("size"):
                step["size"] = tuple(scale)
    path = folder / f"{name}.py"
    cfg.dump(str(path))
    return path


def _liven_class_biases(model, model_cfg, family) -> None:
    """Lift the class layers' biases (from their prior of 0.01 to 0.5; a softmax head's
    background row down) so that an untrained model of any family finds things to compare."""
    from scoring.runtimes.torch_mmdet import class_shaped_layers

    state = model.state_dict()
    keys = [k for k in state if family.is_class_shaped(k)] or list(class_shaped_layers(model_cfg, family))
    background = family.class_layer.background if family.class_layer else 0
    for key in keys:
        if key.endswith(".bias") and not any(part in key for part in ("reg", "conv_logits")):
            state[key].fill_(0.0)
            if background:
                state[key][-background:] = -5.0
        elif "conv_logits" in key:  # Mask R-CNN: smooth masks (an untrained head's are noise)
            state[key].fill_(2.0 if key.endswith(".bias") else 0.0)



def _calm_staged_regression(model) -> None:
    """Scale the box regression of a head that refines its own boxes in stages (Sparse R-CNN's
    six) down tenfold. Untrained, each stage moves the last stage's boxes by large random steps
    and grows float rounding into other answers: mmdet's own answers on one thread and on two
    then part at the 23rd answer (boxes the picture's size apart, scores 3e-3), so no comparison
    at 0.5 px and 1e-3 could tell anything. A trained head's stages correct by little."""
    for name, parameter in model.named_parameters():
        if re.search(r"bbox_head\.\d+\.fc_reg\.weight$", name):
            parameter.mul_(0.1)

def _liven_head(model, seed: int) -> None:
    """Scale the classifier so its logits spread (std ~2 around -1.5 on a test picture) and
    widen the mask kernels: an untrained model then yields varied scores and masks."""
    import torch
    from mmdet.structures import DetDataSample

    model.eval()
    image = torch.from_numpy(scene_image(320, 320, seed)).permute(2, 0, 1).float()[None]
    feats = model.extract_feat(model.data_preprocessor({"inputs": [image[0]],
                                                       "data_samples": [DetDataSample()]})["inputs"])
    cls_scores = model.bbox_head(feats)[0]
    for conv, logits in zip(model.bbox_head.rtm_cls, cls_scores):
        spread = float(logits.std()) or 1.0
        conv.weight.mul_(2.0 / spread)
        conv.bias.fill_(-1.5)
    for conv in getattr(model.bbox_head, "rtm_kernel", ()):
        conv.weight.normal_(0.0, 0.05)
        conv.bias.normal_(0.0, 1.0)


def scene_image(width: int, height: int, seed: int) -> np.ndarray:
    """A BGR test picture: textured background with a few filled shapes (red and blue differ,
    so a channel swap changes what the model sees)."""
    import cv2

    rng = np.random.default_rng(seed)
    img = np.full((height, width, 3), (40, 90, 160), np.uint8)
    img[:] = (img + rng.integers(0, 40, img.shape)).clip(0, 255).astype(np.uint8)
    for _ in range(4):
        color = tuple(int(c) for c in rng.integers(0, 255, 3))
        x, y = int(rng.integers(0, width - 40)), int(rng.integers(0, height - 40))
        w, h = int(rng.integers(20, width // 2)), int(rng.integers(20, height // 2))
        if rng.random() < 0.5:
            cv2.rectangle(img, (x, y), (x + w, y + h), color, -1)
        else:
            cv2.ellipse(img, (x, y), (w // 2, h // 2), 0, 0, 360, color, -1)
    return img


def write_png(path: Path, image_bgr: np.ndarray) -> Path:
    import cv2

    cv2.imwrite(str(path), image_bgr)
    return path


def b64(path: Path) -> str:
    return base64.b64encode(Path(path).read_bytes()).decode()




from mmdet_mlflow.servers import free_port  # noqa: E402,F401  (the tests import it from here)


def port_is_open(port: int) -> bool:
    import socket

    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def wait_until_closed(port: int, timeout: float = 30) -> bool:
    """Whether ``port`` on 127.0.0.1 stops accepting connections within ``timeout`` seconds."""
    import time

    deadline = time.monotonic() + timeout
    while port_is_open(port) and time.monotonic() < deadline:
        time.sleep(0.5)
    return not port_is_open(port)


def running(cmd: list[str], health_url: str, log_path: Path, env=None, cwd=None, timeout: float = 180):
    """Start a server process, wait until ``health_url`` answers 200, stop it afterwards."""
    from mmdet_mlflow.servers import serve

    return serve(cmd, health_url, log_path, cwd=cwd, env=env, timeout=timeout)


def with_visible_outputs(checkpoint: Path, radius: float = 0.5, cls_weight_scale: float = 1e7,
                         cls_bias: float = -3.5) -> Path:
    """Rewrite a tiny RTMDet-Ins checkpoint from ``make_official_checkpoint(..., confident=False)``
    so its random outputs are worth measuring on any picture, with known shapes: masks that are
    never empty and top scores on both sides of 0.3 (evaluation tests and bench/evaluate.py).
    Plain random weights give mask logits of ~1e-9 (empty masks) and scores that are one
    constant per class. Here:
    - masks: the dynamic kernels become constants giving ``radius - |dx| - |dy|`` (relative
      coordinates, in units of 8 strides), a visible diamond around each detection's prior;
    - scores: the classifier weights are scaled up so scores vary with the image (and so do the
      classes), and the biases set so the top detections straddle 0.3 (0.15..0.65)."""
    import torch

    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True)
    state = ckpt["state_dict"]
    w0 = torch.zeros(8, 10)               # 8 out x (2 coords + 8 prototypes) in
    w0[0, 0], w0[1, 0], w0[2, 1], w0[3, 1] = 1.0, -1.0, 1.0, -1.0
    w1 = torch.zeros(8, 8)
    w1[:4, :4] = torch.eye(4)
    w2 = torch.zeros(1, 8)
    w2[0, :4] = -1.0
    kernel = torch.cat([w0.ravel(), w1.ravel(), w2.ravel(), torch.zeros(8), torch.zeros(8),
                        torch.tensor([radius])])
    for key in list(state):
        if key.startswith("bbox_head.rtm_kernel."):
            if key.endswith(".weight"):
                state[key] = torch.zeros_like(state[key])
            else:
                assert state[key].shape == kernel.shape, "expected the tiny config's 169 kernel parameters"
                state[key] = kernel.clone()
        elif key.startswith("bbox_head.rtm_cls."):
            state[key] = state[key] * cls_weight_scale if key.endswith(".weight") \
                else torch.full_like(state[key], cls_bias)
    torch.save(ckpt, checkpoint)
    return checkpoint


def assert_same_detections(got: dict, want: dict, share: float = 0.9) -> None:
    """Two responses for one image, from differently composed batches: batched convolutions
    differ in the last float bits, which can reorder near-tied detections of an untrained model,
    so detections are matched as sets (label, box to 1e-3, score to 1e-4)."""
    a, b = got["boxes"], want["boxes"]
    assert len(a) == len(b)

    def close(x, y):
        return (x["label"] == y["label"] and abs(x["score"] - y["score"]) < 1e-4
                and all(abs(x["box"][k] - y["box"][k]) < 1e-3 for k in x["box"]))

    matched = sum(any(close(x, y) for y in b) for x in a)
    assert matched >= share * len(a), f"{matched} of {len(a)} detections match"


def b64_png(image_bgr) -> str:
    """A BGR array as base64 PNG, a request's image."""
    import base64

    import cv2

    return base64.b64encode(cv2.imencode(".png", image_bgr)[1].tobytes()).decode()


def copied_model_folder(folder: Path, tmp_path: Path, forget_checksums: bool = False) -> Path:
    """A copy of a weights folder to damage; with ``forget_checksums``, model.json keeps no
    sha256 of its graph files, so what loading says is the runtime's own verdict."""
    import shutil

    copy = Path(shutil.copytree(folder, tmp_path / "model"))
    if forget_checksums:
        info = json.loads((copy / "model.json").read_text())
        info["onnx"]["files"] = {}
        (copy / "model.json").write_text(json.dumps(info))
    return copy


def truncate_graph(folder: Path) -> None:
    data = (folder / "model.onnx").read_bytes()
    (folder / "model.onnx").write_bytes(data[: len(data) // 3])


def claim_classes(folder: Path, count: int) -> None:
    """model.json says the head has ``count`` classes (e.g. a fine-tuned model.json beside a
    COCO graph)."""
    info = json.loads((folder / "model.json").read_text())
    info["onnx"]["head"]["num_classes"] = count
    (folder / "model.json").write_text(json.dumps(info))


def found_again(reference, other, images, params) -> tuple[int, int]:
    """(detections of ``reference`` on ``images``, how many ``other`` finds too: same label,
    box within 2 px, score within 0.05): a cheaper precision against fp32."""
    found = close = 0
    for image in images:
        [a], [b] = reference([image], params), other([image], params)
        found += len(a)
        for i in range(len(a)):
            close += any(b.labels[j] == a.labels[i] and np.abs(b.boxes[j] - a.boxes[i]).max() <= 2
                         and abs(float(b.scores[j]) - float(a.scores[i])) <= 0.05
                         for j in range(len(b)))
    return found, close


def odd_entries(folder: Path, picture: bytes, unreadable: bool = True,
                folder_loop: bool = True) -> dict[str, str | None]:
    """Entries of an input folder that are no picture to read, each with what its one error
    record must name (None: a picture, to be scored): an empty file, a FIFO (which must never be
    opened: reading one waits for a writer), a unix socket, a symlink loop, a dangling symlink,
    a link to the folder that holds it, a folder named like a picture (descended into) and,
    where the tests do not run as root (who reads anything), a file we may not read. A hidden
    picture is not listed at all."""
    import contextlib
    import os
    import socket

    folder.mkdir(parents=True, exist_ok=True)
    expected: dict[str, str | None] = {}
    (folder / "empty.jpg").write_bytes(b"")
    expected["empty.jpg"] = "empty file (0 bytes)"
    os.mkfifo(folder / "pipe.jpg")
    expected["pipe.jpg"] = "not a regular file: a FIFO (named pipe)"
    with contextlib.chdir(folder), socket.socket(socket.AF_UNIX) as sock:
        sock.bind("socket.jpg")  # relative: a socket's path may not be over 107 bytes
    expected["socket.jpg"] = "not a regular file: a socket"
    (folder / "loop.jpg").symlink_to("loop.jpg")
    expected["loop.jpg"] = "a symlink loop"
    (folder / "dangling.jpg").symlink_to("nowhere.jpg")
    expected["dangling.jpg"] = "a dangling symlink: its target nowhere.jpg does not exist"
    (folder / "d.jpg").mkdir()
    (folder / "d.jpg" / "inside.png").write_bytes(picture)
    expected["d.jpg/inside.png"] = None
    if folder_loop:
        (folder / "d.jpg" / "back.jpg").symlink_to("..")
        expected["d.jpg/back.jpg"] = f"a symlink loop: a link to the folder {folder.resolve()}, which holds it"
    (folder / ".hidden.png").write_bytes(picture)
    if unreadable and os.geteuid() != 0:
        (folder / "locked.png").write_bytes(picture)
        (folder / "locked.png").chmod(0)
        expected["locked.png"] = "cannot read the file: permission denied"
    return expected


def assert_object_detection_answers(answers: list[dict]) -> None:
    """Each image's answer follows AutoML's object-detection schema: ``{"boxes": [{"box",
    "label", "score"}]}``, boxes normalized to 0..1, no mask key of any kind; and the
    object-detection test model finds something to check."""
    assert any(answer["boxes"] for answer in answers), "the object-detection test model finds something"
    for answer in answers:
        assert set(answer) == {"boxes"}
        for det in answer["boxes"]:
            assert set(det) == {"box", "label", "score"}, det
            assert set(det["box"]) == {"topX", "topY", "bottomX", "bottomY"}
            assert all(0.0 <= v <= 1.0 for v in det["box"].values())
            assert det["box"]["topX"] <= det["box"]["bottomX"] and det["box"]["topY"] <= det["box"]["bottomY"]
            assert det["label"] in OD_CLASSES and 0.0 < det["score"] <= 1.0
