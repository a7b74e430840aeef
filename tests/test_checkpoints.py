"""Where weights come from, and refusing the ones that do not fit or are not plain tensors."""
from __future__ import annotations

import collections
import functools
import hashlib
import http.server
import shutil
import threading
import time

import pytest
import torch

import mlflow_model
from helpers import TINY, X
from mlflow_model.checkpoints import download, resolve_checkpoint
from scoring.weights import CheckpointError, read_state_dict
from mlflow_model.configs import official_checkpoint
from scoring.model_dir import ModelDir


class Evil:
    """Any non-tensor class: unpickling it would mean importing and calling arbitrary code."""


@pytest.fixture
def served_folder(tmp_path):
    """A local HTTP server over a folder; yields (folder, base_url, request paths seen)."""
    folder = tmp_path / "www"
    folder.mkdir()
    seen = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            seen.append(self.path)

    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Handler, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield folder, f"http://127.0.0.1:{server.server_port}", seen
    server.shutdown()


def test_official_checkpoint_comes_from_mmdets_metafile():
    published = official_checkpoint(X)
    assert published.url.startswith("https://download.openmmlab.com/mmdetection/v3.0/rtmdet/")
    assert published.url.endswith(f"-{published.sha256_prefix}.pth")
    assert published.sha256_prefix == "33d4595b"


def test_url_checkpoint_is_hash_checked_and_cached(served_folder, tiny_checkpoint, tmp_path, monkeypatch):
    folder, base, seen = served_folder
    monkeypatch.setenv("MMDET_MLFLOW_CACHE", str(tmp_path / "cache"))
    digest = hashlib.sha256(tiny_checkpoint.read_bytes()).hexdigest()
    shutil.copy(tiny_checkpoint, folder / f"tiny-{digest[:8]}.pth")
    path, source = resolve_checkpoint(f"{base}/tiny-{digest[:8]}.pth")
    assert source.sha256 == digest and path.read_bytes() == tiny_checkpoint.read_bytes()
    assert path.parent.parent == tmp_path / "cache" / "checkpoints"
    again, _ = resolve_checkpoint(f"{base}/tiny-{digest[:8]}.pth")
    assert again == path and len([p for p in seen if "tiny-" in p]) == 1, "the second time is cached"


def test_two_urls_ending_in_the_same_file_name_are_cached_apart(served_folder, tiny_checkpoint,
                                                                tmp_path, monkeypatch):
    folder, base, _ = served_folder
    monkeypatch.setenv("MMDET_MLFLOW_CACHE", str(tmp_path / "cache"))
    for run, content in (("run1", tiny_checkpoint.read_bytes()), ("run2", b"other bytes")):
        (folder / run).mkdir()
        (folder / run / "best.pth").write_bytes(content)
    first = download(f"{base}/run1/best.pth")
    second = download(f"{base}/run2/best.pth")
    assert first != second
    assert first.read_bytes() == tiny_checkpoint.read_bytes() and second.read_bytes() == b"other bytes"


def test_official_through_a_mirror_refuses_a_file_whose_hash_differs(served_folder, tiny_checkpoint,
                                                                     tmp_path, monkeypatch):
    folder, base, _ = served_folder
    monkeypatch.setenv("MMDET_MLFLOW_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("MMDET_MLFLOW_CHECKPOINT_MIRROR", base)
    published = official_checkpoint(TINY)
    relative = published.url.removeprefix("https://download.openmmlab.com/")
    (folder / relative).parent.mkdir(parents=True)
    shutil.copy(tiny_checkpoint, folder / relative)  # right path, wrong bytes
    with pytest.raises(CheckpointError, match=f"does not start with {published.sha256_prefix}"):
        resolve_checkpoint("official", TINY)
    assert not any(p.is_file() for p in (tmp_path / "cache" / "checkpoints").rglob("*")), "nothing cached"


def test_official_fails_fast_and_clearly_without_network(tmp_path, monkeypatch):
    monkeypatch.setenv("MMDET_MLFLOW_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("MMDET_MLFLOW_CHECKPOINT_MIRROR", "http://127.0.0.1:9")  # nothing listens
    start = time.monotonic()
    with pytest.raises(CheckpointError, match="could not download .*--checkpoint PATH"):
        resolve_checkpoint("official", TINY)
    assert time.monotonic() - start < 10


def _package(tmp_path, checkpoint, **kwargs):
    return mlflow_model.save_model(tmp_path / "model", TINY, str(checkpoint), **kwargs)


def _official(tmp_path, state_dict, name="ckpt.pth", **meta):
    path = tmp_path / name
    torch.save({"meta": meta, "state_dict": state_dict}, path)
    return path


def test_corrupt_and_truncated_checkpoints_are_refused(tmp_path, tiny_checkpoint):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"\x00not a checkpoint" * 100)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(tiny_checkpoint.read_bytes()[:100_000])
    for bad in (garbage, truncated):
        with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
            _package(tmp_path, bad)
    assert not (tmp_path / "model").exists(), "nothing is written for a bad checkpoint"


def test_pickled_objects_are_never_unpickled(tmp_path, tiny_checkpoint):
    state_dict, _ = read_state_dict(tiny_checkpoint)
    sneaky = _official(tmp_path, state_dict, evil=Evil())
    with pytest.raises(CheckpointError, match="never unpickle"):
        _package(tmp_path, sneaky)


def test_mismatched_checkpoints_say_what_differs(tmp_path, tiny_checkpoint):
    state_dict, _ = read_state_dict(tiny_checkpoint)
    with pytest.raises(CheckpointError, match="trained for 80 classes but the model is set up for 2"):
        _package(tmp_path, tiny_checkpoint, classes=["a", "b"])
    missing = dict(state_dict)
    del missing["bbox_head.rtm_reg.0.weight"]
    with pytest.raises(CheckpointError, match="1 model tensors are missing, e.g. bbox_head.rtm_reg.0.weight"):
        _package(tmp_path, _official(tmp_path, missing, "missing.pth"))
    extra = collections.OrderedDict(state_dict, **{"neck.surprise": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="not in the model, e.g. neck.surprise"):
        _package(tmp_path, _official(tmp_path, extra, "extra.pth"))
    reshaped = dict(state_dict)
    reshaped["neck.out_convs.0.conv.weight"] = torch.zeros(3, 3, 3, 3)
    with pytest.raises(CheckpointError, match="wrong shape"):
        _package(tmp_path, _official(tmp_path, reshaped, "reshaped.pth"))
    assert not (tmp_path / "model").exists()


def test_class_names_come_from_the_checkpoint_or_the_caller(tmp_path, tiny_checkpoint):
    state_dict, _ = read_state_dict(tiny_checkpoint)
    bare = tmp_path / "bare.pth"
    torch.save(state_dict, bare)  # a plain state dict: 80 classes, no names -> COCO's
    _package(tmp_path, bare)
    assert ModelDir(tmp_path / "model").read_info()["classes"][:2] == ["person", "bicycle"]
    shutil.rmtree(tmp_path / "model")
    names = [f"thing{i}" for i in range(80)]
    _package(tmp_path, bare, classes=names)
    assert ModelDir(tmp_path / "model").read_info()["classes"] == names


def test_the_x_model_has_the_cards_parameter_count_and_round_trips_strictly(tmp_path):
    """rtmdet-ins_x: 102.7 M parameters; an official-format checkpoint of it packages with
    every key and shape matched, and the stored weights are exactly the checkpoint's."""
    from mmdet.registry import MODELS
    from mmengine.registry import init_default_scope

    from mlflow_model.configs import load_config

    init_default_scope("mmdet")
    detector = MODELS.build(load_config(X, num_classes=80).model)
    params = sum(p.numel() for p in detector.parameters())
    assert round(params / 1e6, 1) == 102.7
    state_dict = detector.state_dict()
    checkpoint = _official(tmp_path, state_dict, "x.pth",
                           dataset_meta={"classes": tuple(f"c{i}" for i in range(80))})
    del detector
    mlflow_model.save_model(tmp_path / "x-model", X, str(checkpoint))
    stored = torch.load(tmp_path / "x-model" / "model" / "weights.pth", weights_only=True)
    assert stored.keys() == state_dict.keys()
    assert all(torch.equal(stored[k], state_dict[k]) for k in state_dict)
