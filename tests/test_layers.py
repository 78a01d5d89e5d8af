"""Target layers: auto-detection on CNNs and vision transformers, dotted paths, refusals."""

import pytest
import torch
from models import MLP, SmallCNN
from torch import nn

from lightning_saliency import SaliencyConfigError, explain
from lightning_saliency.engine.layers import find_classifier_head, read_layout, resolve_layer


def test_layer_auto_detection_resnet18_and_plain_cnn():
    import torchvision

    resnet = torchvision.models.resnet18(num_classes=10)
    out = explain(resnet, torch.randn(1, 3, 64, 64), methods=("gradcam",))
    assert out.layer_name == "layer4"
    out = explain(SmallCNN(), torch.randn(2, 3, 32, 32), methods=("gradcam",))
    assert out.layer_name == "features"


def test_mlp_is_refused_with_a_clear_message():
    with pytest.raises(SaliencyConfigError, match="no layer whose output reads as a map"):
        explain(MLP(), torch.randn(2, 3, 8, 8), methods=("gradcam",))


def test_unknown_layer_lists_close_matches():
    with pytest.raises(SaliencyConfigError, match="Closest names: features"):
        explain(SmallCNN(), torch.randn(2, 3, 32, 32), target_layer="feature")


class TinyViT(nn.Module):
    """Patch embedding, a class token, two transformer blocks, a head on the class token."""

    def __init__(self, size: int = 32, patch: int = 8, dim: int = 32, classes: int = 4):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(0.02 * torch.randn(1, 1 + (size // patch) ** 2, dim))
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(dim, 4, 64, dropout=0.0, batch_first=True) for _ in range(2)
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls_token.expand(len(x), -1, -1), tokens], 1) + self.pos
        for block in self.blocks:
            tokens = block(tokens)
        return self.head(self.norm(tokens)[:, 0])


def test_vision_transformers_work_through_token_reshape():
    import torchvision

    torch.manual_seed(0)
    vit = torchvision.models.vit_b_16(image_size=64, num_classes=4).eval()
    nn.init.normal_(vit.heads.head.weight, std=0.02)  # torchvision initialises the head to zero
    out = explain(vit, torch.randn(2, 3, 64, 64), methods=("gradcam", "layercam", "eigencam"))
    assert out.layer_name == "encoder.layers.encoder_layer_11.ln_1"  # not conv_proj
    assert out["gradcam"].shape == (2, 64, 64) and out["gradcam"].abs().sum() > 0

    tiny = TinyViT().eval()
    out = explain(tiny, torch.randn(2, 3, 32, 32), methods=("gradcam", "ablationcam"))
    assert out.layer_name == "blocks.0"  # post-norm: after block 1's attention only cls counts
    assert "patch_embed" not in out.layer_name
    assert out["gradcam"].shape == (2, 32, 32) and torch.isfinite(out["ablationcam"]).all()


def test_dotted_paths_and_modules_resolve_to_the_same_layer():
    net = SmallCNN()
    assert resolve_layer(net, "features.4") == resolve_layer(net, net.features[4])
    with pytest.raises(SaliencyConfigError, match="not a submodule"):
        resolve_layer(net, nn.Conv2d(1, 1, 1))


def test_tokens_are_reshaped_onto_their_grid_without_the_class_token():
    tokens = torch.arange(2 * 17 * 3, dtype=torch.float32).reshape(2, 17, 3)
    grid = read_layout(tokens, 2, (16, 16)).to_spatial(tokens)
    assert grid.shape == (2, 3, 4, 4)
    assert torch.equal(grid[:, :, 0, 0], tokens[:, 1])  # token 0 is the class token
    assert read_layout(torch.zeros(2, 196, 8), 2, (224, 224)).prefix == 0
    with pytest.raises(SaliencyConfigError, match="cannot be read"):
        read_layout(torch.zeros(2, 3, 8), 2, (224, 224))


def test_classifier_head_is_the_last_linear_taking_the_channels():
    net = SmallCNN()
    assert find_classifier_head(net, 16) is net.fc
    assert find_classifier_head(net, 99) is None
