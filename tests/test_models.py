"""Models that are not shaped like resnet18: outputs, layouts, checkpointing, linear probes,
compiled and channels-last models. Each is explained right or refused with a message; never a
silently wrong or all-zero map."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_datamodule, trainer
from torch import nn
from torch.utils.checkpoint import checkpoint

from lightning_saliency import SaliencyCallback, SaliencyConfigError, explain
from lightning_saliency.demos.classifier import ShapesClassifier

METHODS = ("gradcam", "guided_gradcam", "dff", "integrated_gradients")
IMAGES = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))


def body() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()
    )


class Plain(nn.Module):
    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.features = body()
        self.fc = nn.Linear(8, classes)

    def forward(self, x: torch.Tensor):
        return self.fc(self.features(x).mean((2, 3)))


class Checkpointed(Plain):
    def __init__(self, reentrant: bool) -> None:
        super().__init__()
        self.reentrant = reentrant

    def forward(self, x: torch.Tensor):
        f = checkpoint(self.features, x, use_reentrant=self.reentrant)
        return self.fc(f.mean((2, 3)))


class LinearProbe(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = body()
        self.adapter = nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor):
        with torch.no_grad():
            f = self.backbone(x)
        return self.fc(torch.relu(self.adapter(f)).mean((2, 3)))


class Outputs(Plain):
    """Returns its class scores in another container."""

    def __init__(self, kind: str) -> None:
        super().__init__(classes=1 if kind == "binary" else 3)
        self.kind = kind

    def forward(self, x: torch.Tensor):
        feats = self.features(x).mean((2, 3))
        logits = self.fc(feats)
        if self.kind == "tuple":
            return feats, logits
        if self.kind == "dict":
            return {"embedding": feats, "scores": logits}
        if self.kind == "attribute":
            return type("ModelOutput", (), {"logits": logits})()
        return logits  # binary: one logit


class Mul(nn.Module):
    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor


class Scaled(Plain):
    """Activations of the target layer x ``factor``; the scores do not change."""

    def __init__(self, factor: float) -> None:
        super().__init__()
        self.features.append(Mul(factor))
        self.factor = factor

    def forward(self, x: torch.Tensor):
        return self.fc(self.features(x).mean((2, 3)) / self.factor)


def test_dff_is_scale_invariant():
    maps = {
        f: explain(Scaled(f).eval(), IMAGES, methods=("dff",), target_layer="features")["dff"]
        for f in (1e-12, 1.0, 1e6)
    }
    assert float(maps[1.0].flatten(1).std(1).min()) > 0.01  # concepts, not constant maps
    for factor in (1e-12, 1e6):
        assert torch.allclose(maps[factor], maps[1.0], atol=1e-4), factor


def test_checkpointing_without_reentrancy_gives_the_same_maps():
    plain, ckpt = Plain().eval(), Checkpointed(reentrant=False).eval()
    ckpt.load_state_dict(plain.state_dict())
    ours = explain(ckpt, IMAGES, methods=METHODS, ig_steps=4, on_error="collect")
    ref = explain(plain, IMAGES, methods=METHODS, ig_steps=4, on_error="collect")
    for method in ("gradcam", "dff", "integrated_gradients"):
        assert torch.allclose(ours[method], ref[method], atol=1e-5), method
    # The guided ReLU is an autograd function of its own, which the recomputation replays.
    guided = ("guided_gradcam", "guided_backprop", "deconvolution")
    ours = explain(ckpt, IMAGES, methods=guided)
    ref = explain(plain, IMAGES, methods=guided)
    for method in guided:
        assert torch.allclose(ours[method], ref[method], atol=1e-5), method


def test_reentrant_checkpointing_is_refused_never_zero(tmp_path):
    model = Checkpointed(reentrant=True).eval()
    out = explain(model, IMAGES, methods=METHODS, ig_steps=4, on_error="collect")
    assert set(out.errors) == set(METHODS) and not out.maps
    assert "use_reentrant=False" in str(out.errors["gradcam"])
    with pytest.raises(SaliencyConfigError, match="use_reentrant"):
        _fit_with(model, ("gradcam",), tmp_path)


def test_linear_probe_explains_the_layers_after_no_grad(tmp_path):
    model = LinearProbe().eval()
    auto = explain(model, IMAGES, methods=("gradcam", "dff"))
    assert auto.layer_name == "adapter"
    with pytest.raises(SaliencyConfigError, match="no_grad"):
        explain(model, IMAGES, methods=("gradcam",), target_layer="backbone")
    with pytest.raises(SaliencyConfigError, match="no_grad"):
        _fit_with(model, ("integrated_gradients",), tmp_path)


def test_compiled_and_channels_last_models_match_eager():
    model = Plain().eval()
    ref = explain(model, IMAGES, methods=METHODS, ig_steps=4)
    compiled = explain(torch.compile(model, backend="eager"), IMAGES, methods=METHODS, ig_steps=4)
    assert compiled.layer_name == ref.layer_name == "features"
    last = Plain().eval().to(memory_format=torch.channels_last)
    channels_last = explain(
        last, IMAGES.to(memory_format=torch.channels_last), methods=METHODS, ig_steps=4
    )
    for method in METHODS:
        assert torch.allclose(compiled[method], ref[method], atol=1e-5), method
        assert torch.allclose(channels_last[method], ref[method], atol=1e-4), method


def test_a_single_logit_is_two_classes():
    model = Outputs("binary").eval()
    out = explain(model, IMAGES, methods=("gradcam", "integrated_gradients"), ig_steps=4)
    z = model(IMAGES)[:, 0]
    assert torch.allclose(out.logits.softmax(1)[:, 1], torch.sigmoid(z), atol=1e-6)
    assert torch.equal(out.targets, (z > 0).long())
    assert float(out["integrated_gradients"].abs().sum()) > 0


@pytest.mark.parametrize("kind, message", [("tuple", "output_transform"), ("dict", "logits")])
def test_ambiguous_outputs_are_errors_naming_output_transform(kind, message):
    with pytest.raises(SaliencyConfigError, match=message):
        explain(Outputs(kind).eval(), IMAGES, methods=("gradcam",))


@pytest.mark.parametrize(
    "kind, transform",
    [("tuple", lambda out: out[1]), ("dict", lambda out: out["scores"]), ("attribute", None)],
)
def test_output_transform_and_logits_attribute(kind, transform):
    model = Outputs(kind).eval()
    out = explain(model, IMAGES, methods=METHODS, ig_steps=4, output_transform=transform)
    plain = Plain().eval()
    plain.load_state_dict(model.state_dict(), strict=False)
    ref = explain(plain, IMAGES, methods=METHODS, ig_steps=4)
    for method in METHODS:
        assert torch.allclose(out[method], ref[method], atol=1e-5), method


def test_layout_and_reshape_read_a_channels_last_layer():
    class ChannelsLast(Plain):
        def forward(self, x):
            f = self.features(x).permute(0, 2, 3, 1)  # (N, H, W, C), as Swin's blocks
            return self.fc(self.last(f).mean((1, 2)))

        def __init__(self):
            super().__init__()
            self.last = nn.LayerNorm(8)

    model = ChannelsLast().eval()
    auto = explain(model, IMAGES, methods=("gradcam",), target_layer="last")
    told = explain(model, IMAGES, methods=("gradcam",), target_layer="last", layout="nhwc")
    reshaped = explain(
        model, IMAGES, methods=("gradcam",), target_layer="last",
        reshape=lambda t: t.permute(0, 3, 1, 2),
    )  # fmt: skip
    assert torch.allclose(auto["gradcam"], told["gradcam"])
    assert torch.allclose(auto["gradcam"], reshaped["gradcam"])
    wrong = explain(model, IMAGES, methods=("gradcam",), target_layer="last", layout="nchw")
    assert not torch.allclose(auto["gradcam"], wrong["gradcam"])


def test_a_layer_whose_dim_0_is_not_the_batch_is_refused():
    class Folded(Plain):
        def forward(self, x):
            f = self.features(x)
            folded = self.fold(f.reshape(-1, 8, 4, 4))  # (N*4, 8, 4, 4), as MobileViT inside
            return self.fc(folded.reshape(x.shape[0], -1, 8, 4, 4).mean((1, 3, 4)))

        def __init__(self):
            super().__init__()
            self.fold = nn.Identity()

    model = Folded().eval()
    with pytest.raises(SaliencyConfigError, match="dim 0 is not the batch"):
        explain(model, torch.rand(2, 3, 8, 8), methods=("gradcam",), target_layer="fold")
    assert explain(model, torch.rand(2, 3, 8, 8), methods=("gradcam",)).layer_name == "features"


def test_the_callback_takes_output_transform_and_layout(tmp_path):
    class TupleClassifier(ShapesClassifier):
        def forward(self, x):
            return x.mean((1, 2, 3)), super().forward(x)

        def training_step(self, batch, batch_idx):
            return nn.functional.cross_entropy(self(batch["image"])[1], batch["label"])

        def validation_step(self, batch, batch_idx, dataloader_idx=0):
            return None

    callback = SaliencyCallback(
        methods=("gradcam", "ig"), num_samples=4, ig_steps=4,
        output_transform=lambda out: out[1], layout="nchw",
    )  # fmt: skip
    tr = trainer(str(tmp_path), [callback], max_epochs=1, limit_train_batches=2)
    tr.fit(TupleClassifier(width=4), tiny_datamodule(size=16, n_train=32, n_val=16))
    assert sorted(callback.history[0].means) == ["gradcam", "integrated_gradients"]


def _fit_with(model: nn.Module, methods, log_dir):
    """A short fit of ``model`` wrapped in a LightningModule, logging under ``log_dir``: the
    callback's dry run."""
    import lightning as L

    class Wrapped(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = model

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            return self(batch["image"]).sum() * 0

        def validation_step(self, batch, batch_idx, dataloader_idx=0):
            return None

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    callback = SaliencyCallback(methods=methods, num_samples=2, ig_steps=4)
    tr = trainer(
        str(log_dir), [callback], max_epochs=1, limit_train_batches=1, num_sanity_val_steps=2
    )
    tr.fit(Wrapped(), tiny_datamodule(size=16, n_train=8, n_val=8, num_classes=3))
