"""What a map explains, beyond one class: multi-label targets, and a function of the model's
output (a segmentation region, a regression value), in explain(), the callback and the CLI."""

from __future__ import annotations

import copy
import os
import runpy
import sys

import torch
from helpers import minmax, per_image_corr, tiny_datamodule, tiny_model, trainer
from PIL import Image
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import SemanticSegmentationTarget
from torch import nn

from lightning_saliency import SaliencyCallback, explain

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")
METHODS = ("gradcam", "guided_gradcam", "dff", "integrated_gradients", "occlusion", "scorecam")


def example(name: str) -> dict:
    sys.path.insert(0, EXAMPLES)
    try:
        return runpy.run_path(os.path.join(EXAMPLES, f"{name}.py"), run_name="example")
    finally:
        sys.path.remove(EXAMPLES)


def test_a_function_target_equals_the_class_it_scores():
    model = tiny_model(width=4).eval()
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    by_class = explain(model, images, 2, METHODS, ig_steps=8)
    by_function = explain(model, images, lambda out: out[:, 2], METHODS, ig_steps=8)
    for method in METHODS:
        assert torch.allclose(by_function[method], by_class[method], atol=1e-5), method


def test_multi_hot_targets_explain_the_sum_of_the_labels():
    """IG is linear in the explained score: the map of two labels is the sum of their maps."""
    model = tiny_model(width=4).eval()
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    both = torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0]])
    out = explain(model, images, both, ("integrated_gradients", "gradcam"), ig_steps=16)
    first = explain(model, images, [0, 2], ("integrated_gradients",), ig_steps=16)
    second = explain(model, images, [1, 3], ("integrated_gradients",), ig_steps=16)
    summed = first["integrated_gradients"] + second["integrated_gradients"]
    assert torch.allclose(out["integrated_gradients"], summed, atol=1e-4)
    assert set(out.targets.tolist()) <= {0, 1, 2, 3}  # captions: the stronger label


def test_segmentation_example_matches_pytorch_grad_cam():
    seg = example("segmentation_target")
    images, out = seg["run"]()
    assert out.layer_name == "backbone.16"
    scores = out.extras["target_scores"]
    assert float((scores[0] - scores[1]).abs()) > 1e-3  # the photographs score differently
    ig = out["integrated_gradients"].flatten(1)
    assert bool(torch.isfinite(ig).all()) and float(ig.std(1).min()) > 0
    model = seg["build_model"](calibration=images)
    mask = seg["region_mask"](images.shape[-1])

    class Unwrapped(nn.Module):  # pytorch-grad-cam's SegmentationModelOutputWrapper
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x)["out"]

    reference = Unwrapped(copy.deepcopy(model))
    layer = reference.inner.backbone["16"]
    with GradCAM(reference, [layer]) as cam:
        targets = [SemanticSegmentationTarget(seg["CLASS"], mask.numpy())] * 2
        ref = torch.from_numpy(cam(images, targets))
    corr = per_image_corr(minmax(out["gradcam"]), ref)
    assert float(corr.min()) >= 0.99, corr


def test_regression_example_attributes_the_predicted_value():
    images, out = example("regression_target")["run"]()
    assert float(out.extras["ig_completeness_error"].max()) < 0.01
    assert float(out["gradcam"].flatten(1).std(1).min()) > 0


def test_the_callback_explains_a_function_target(tmp_path):
    callback = SaliencyCallback(
        methods=("gradcam", "ig"), num_samples=4, ig_steps=4, target=lambda out: out[:, 1]
    )
    tr = trainer(str(tmp_path), [callback], max_epochs=1, limit_train_batches=2)
    tr.fit(tiny_model(width=4), tiny_datamodule(size=16, n_train=32, n_val=16))
    assert sorted(callback.history[0].means) == ["gradcam", "integrated_gradients"]


def test_the_command_line_takes_a_function_target(tmp_path, capsys, monkeypatch):
    from lightning_saliency.cli import main

    Image.fromarray((torch.rand(32, 32, 3) * 255).byte().numpy()).save(tmp_path / "a.png")
    monkeypatch.chdir(EXAMPLES)
    code = main(["explain", "--model", "regression_target:BrightnessRegressor",
                 "--target", "regression_target:predicted_value", "--image",
                 str(tmp_path / "a.png"), "--size", "32", "--methods", "gradcam,ig",
                 "--ig-steps", "8", "--out", str(tmp_path / "f.png")])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    assert (tmp_path / "f.png").exists()
