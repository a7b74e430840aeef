"""Fine-tuning's precision: bf16 autocast on CPU through our own OptimWrapper (fp32
master weights, finite losses, weights that move), what "auto" picks, and `finetune --runtime
openvino` passing package's bf16 accuracy gate on the validation data. Real tiny fine-tunes on
CPU (a few steps)."""
from __future__ import annotations

import json
import math

import pytest
import torch
from mmengine.hooks import Hook

from helpers import TINY
from finetune_fixtures import fridge, one_torch_thread  # noqa: F401  (fixtures: one torch thread, the fridge set)
from test_finetune import FAST

from mmdet_mlflow.training import FinetuneError, FinetuneSettings, finetune
from mmdet_mlflow.training import precision as training_precisions






class WhatTrainingComputes(Hook):
    """Records the optim wrapper's class and the dtype the backbone's outputs have while
    training (validation runs outside the optim wrapper's context)."""

    def __init__(self):
        self.wrapper = None
        self.training_dtypes = set()
        self.loss_inputs = set()

    def before_train(self, runner) -> None:
        self.wrapper = type(runner.optim_wrapper).__name__
        model = getattr(runner.model, "module", runner.model)

        def record(module, inputs, outputs):
            if module.training:
                self.training_dtypes.add(outputs[-1].dtype)

        model.backbone.register_forward_hook(record)
        head, compute = model.bbox_head, model.bbox_head.loss_by_feat

        def losses(*args, **kwargs):  # what the losses receive, and whether autocast is on
            self.loss_inputs.add((args[0][0].dtype, torch.is_autocast_enabled("cpu")))
            return compute(*args, **kwargs)

        head.loss_by_feat = losses


def test_bf16_autocast_trains_on_cpu_with_fp32_master_weights(fridge, tiny_checkpoint, tmp_path):
    out = tmp_path / "run"
    seen = WhatTrainingComputes()
    result = finetune(fridge / "train.jsonl", fridge / "validation.jsonl", out, config=TINY,
                      checkpoint=str(tiny_checkpoint), progress=False, track=False, device="cpu",
                      extra_hooks=[seen],
                      settings=FinetuneSettings(number_of_epochs=2, precision="bf16", **FAST))

    assert result.precision == "bf16" and result.steps == 4
    assert seen.wrapper == "CpuBf16OptimWrapper"
    assert seen.training_dtypes == {torch.bfloat16}, "the forward ran under bf16 autocast"
    assert seen.loss_inputs == {(torch.float32, False)}, "the losses ran in fp32, outside autocast"
    steps = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    losses = [e["loss"] for e in steps if e["kind"] == "step"]
    assert len(losses) == 4 and all(math.isfinite(loss) for loss in losses), losses

    # fp32 master weights, trained away from the start (the head's new classes aside)
    weights = torch.load(out / "pytorch_model_folder" / "weights.pth", weights_only=True)
    start = torch.load(tiny_checkpoint, weights_only=True)["state_dict"]
    name = "backbone.stem.0.conv.weight"
    assert weights[name].dtype == torch.float32
    assert not torch.equal(weights[name], start[name])
    assert all(torch.isfinite(w).all() for w in weights.values() if w.is_floating_point())

    # which precision trained, where a user looks
    assert json.loads((out / "run.json").read_text())["precision"] == "bf16"
    info = json.loads((out / "pytorch_model_folder" / "model.json").read_text())
    assert info["training_precision"] == "bf16" and info["settings"]["precision"] == "bf16"


def test_the_precision_training_computes_in():
    decide = training_precisions.training_precision
    native = training_precisions.cpu_computes_bf16()
    assert decide("32", "cpu") == ("32", None)
    assert decide("16", "cuda") == ("16", None)
    assert decide("16", "cpu")[0] == "32" and "needs a GPU" in decide("16", "cpu")[1]
    assert decide("bf16", "cpu")[0] == "bf16"
    assert (decide("bf16", "cpu")[1] is None) == native  # emulated bf16 is said to be slow
    assert decide("bf16", "cuda")[0] == "32"
    assert decide("auto", "cuda") == ("32", None)  # GPUs train as before
    picked, note = decide("auto", "cpu")
    assert picked == ("bf16" if native and training_precisions.AUTO_PICKS_BF16_ON_CPU else "32")
    assert note.startswith("precision auto: ")


@pytest.mark.parametrize("value", ["8", "bfloat16", "fp32", "BF16", ""])
def test_a_precision_that_does_not_exist_is_refused_naming_the_choices(value):
    with pytest.raises(FinetuneError, match=r"precision must be 32, 16 \(AMP on a GPU\), bf16 "
                                            r"\(CPU autocast\) or auto \(got '.*'\)"):
        FinetuneSettings(precision=value).check()


def test_accept_accuracy_drop_is_for_the_openvino_runtime_only(fridge, tmp_path):
    with pytest.raises(FinetuneError, match="--accept-accuracy-drop is for --runtime openvino"):
        finetune(fridge / "train.jsonl", fridge / "validation.jsonl", tmp_path / "run", config=TINY,
                 checkpoint="none", progress=False, track=False, accept_accuracy_drop=True,
                 settings=FinetuneSettings(number_of_epochs=1, **FAST))
    assert not (tmp_path / "run").exists()


def test_an_openvino_finetune_is_gated_on_its_validation_data(fridge, tiny_checkpoint, tmp_path):
    """The gate package applies, on the fine-tune's validation data: refused (the MLflow model
    not written, the trained weights kept), then accepted by running again with
    --accept-accuracy-drop, which exports without training again. The limit is one no model can
    meet (bf16 must gain 1.0 mAP), as test_openvino_runtime tests package's gate."""
    from mmdet_mlflow.precision_check import AccuracyDropError

    out = tmp_path / "run"

    def run(**kwargs):
        return finetune(fridge / "train.jsonl", fridge / "validation.jsonl", out, config=TINY,
                        checkpoint=str(tiny_checkpoint), progress=False, track=False, device="cpu",
                        runtime="openvino", max_accuracy_drop=-1.0,
                        settings=FinetuneSettings(number_of_epochs=1, **FAST), **kwargs)

    with pytest.raises(AccuracyDropError, match=r"bf16 loses -?[\d.]+ segm mAP against fp32 on 2 images "
                                                r"of .*validation\.jsonl.*No MLflow model was written, "
                                                r"but the trained weights are kept in .*pytorch_model_folder: "
                                                r"run this finetune again with --accept-accuracy-drop"):
        run()
    assert not (out / "mlflow_model_folder").exists()
    assert (out / "pytorch_model_folder" / "weights.pth").is_file()
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")], "no staging folder left"

    result = run(accept_accuracy_drop=True)
    assert result.steps == 2  # resumed after its last epoch: nothing trained again
    info = json.loads((out / "mlflow_model_folder" / "model" / "model.json").read_text())
    assert info["runtime"] == "openvino"
    check = info["precision_checks"]["bf16"]
    assert check["accepted"] is True and check["images"] == 2 and check["max_segm_AP_drop"] == -1.0
    assert set(check["segm_AP"]) == {"fp32", "bf16"}
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")], "no staging folder left"
