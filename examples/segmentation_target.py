"""Explain a segmentation model: "the score of class k inside this region" as the target.

The same target as pytorch-grad-cam's ``SemanticSegmentationTarget``, written as a function of
the model's output, so ``explain()``, ``SaliencyCallback(target=...)`` and the command line
(``--target my_module:region_score``) take it alike. Random weights (nothing downloads).

    python examples/segmentation_target.py --out segmentation_saliency.png
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
import torchvision
from torch import Tensor

from lightning_saliency import explain

CLASS = 1


def region_mask(size: int) -> Tensor:
    """The region whose class-``CLASS`` score is explained: the image's central square."""
    mask = torch.zeros(size, size)
    mask[size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 1
    return mask


def region_target(mask: Tensor, category: int = CLASS) -> Any:
    """``(outputs) -> (N,)``: the summed score of ``category`` inside ``mask``, per image."""

    def score(outputs: dict[str, Tensor]) -> Tensor:
        logits = outputs["out"][:, category]
        return (logits * mask.to(logits.device, logits.dtype)).sum(dim=(1, 2))

    return score


def build_model(classes: int = 3) -> torch.nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.segmentation.deeplabv3_mobilenet_v3_large(
        weights=None, weights_backbone=None, num_classes=classes, aux_loss=False
    )
    return model.eval()


def run(size: int = 64) -> tuple[Tensor, Any]:
    """Explain two images; returns them and their ``Explanations``."""
    model = build_model()
    images = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    target = region_target(region_mask(size))
    out = explain(model, images, target, ("gradcam", "integrated_gradients"), ig_steps=16)
    return images, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="segmentation_saliency.png")
    args = parser.parse_args()
    images, out = run()
    from PIL import Image

    from lightning_saliency.figures import comparison_figure

    picture = comparison_figure(images, out, None, None, None)
    Image.fromarray(picture.permute(1, 2, 0).cpu().numpy()).save(args.out)
    print(f"layer {out.layer_name}; IG completeness error "
          f"{float(out.extras['ig_completeness_error'].max()):.3f}; wrote {args.out}")  # fmt: skip


if __name__ == "__main__":
    main()
