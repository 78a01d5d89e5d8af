"""Explain a regression head: the predicted value itself is the explained score.

A model with one output per image (a brightness, an age, a count) is not a classifier: its
``(N, 1)`` output would otherwise read as a single binary logit. ``target=`` a function of the
output says what to explain, in ``explain()`` and ``SaliencyCallback`` alike.

    python examples/regression_target.py
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_saliency import explain


class BrightnessRegressor(nn.Module):
    """A small CNN with a one-value regression head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()
        )
        self.head = nn.Linear(8, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


def predicted_value(outputs: Tensor) -> Tensor:
    """``(N, 1) -> (N,)``: the regression output is the score each map explains."""
    return outputs[:, 0]


def run() -> tuple[Tensor, object]:
    model = BrightnessRegressor().eval()
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    out = explain(model, images, predicted_value, ("gradcam", "integrated_gradients"), ig_steps=32)
    return images, out


def main() -> None:
    _, out = run()
    error = out.extras["ig_completeness_error"]
    print(f"IG attributions add up to the predicted value's change: error {float(error.max()):.4f}")


if __name__ == "__main__":
    main()
