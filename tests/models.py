"""Small models the tests share."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SmallCNN(nn.Module):
    """Conv-BN-ReLU blocks, Dropout and a linear head: the shape of a real classifier."""

    def __init__(self, num_classes: int = 4, in_channels: int = 3, inplace: bool = False) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(inplace=inplace),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(inplace=inplace),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(0.2)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(self.pool(self.features(x)).flatten(1)))


class FunctionalCNN(nn.Module):
    """The same maths as an nn.ReLU CNN but calling ``F.relu`` and ``torch.relu_``."""

    def __init__(self, num_classes: int = 4) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = self.conv2(x)
        torch.relu_(x)
        return self.fc(x.mean(dim=(2, 3)))


class ModuleCNN(nn.Module):
    """FunctionalCNN with ``nn.ReLU`` modules: what captum's GuidedBackprop understands."""

    def __init__(self, num_classes: int = 4) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(self.relu1(self.conv1(x)), 2)
        x = self.relu2(self.conv2(x))
        return self.fc(x.mean(dim=(2, 3)))


class MLP(nn.Module):
    """Flat vectors in: nothing spatial to explain."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(), nn.Linear(3 * 8 * 8, 16), nn.Tanh(), nn.Linear(16, 2)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class SmallViT(nn.Module):
    """torchvision's ViT at 32 px in 8-px patches, 2 blocks of 2 heads, with dropout: what the
    attention methods explain where the others explain :class:`SmallCNN`."""

    def __init__(self, num_classes: int = 4) -> None:
        super().__init__()
        from torchvision.models import VisionTransformer

        self.vit = VisionTransformer(
            32, 8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32, dropout=0.1,
            attention_dropout=0.1, num_classes=num_classes,
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.vit(x)
        return logits


def small_model_for(method: str) -> nn.Module:
    """A :class:`SmallViT` for a method that reads attention, else a :class:`SmallCNN`."""
    from lightning_saliency.engine.methods import METHODS

    return SmallViT() if METHODS[method].needs_attention else SmallCNN()


def seeded(model: nn.Module, seed: int = 0, scale: float = 0.3) -> nn.Module:
    """Re-initialise a model's parameters and BN statistics from ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
            if name.endswith("running_var"):
                tensor.copy_(0.5 + torch.rand(tensor.shape, generator=gen))
            elif name.endswith("running_mean"):
                tensor.copy_(0.1 * torch.randn(tensor.shape, generator=gen))
            elif tensor.is_floating_point():
                tensor.copy_(scale * torch.randn(tensor.shape, generator=gen))
    return model
