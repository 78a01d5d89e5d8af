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


def build_model(classes: int = 3, calibration: Tensor | None = None) -> torch.nn.Module:
    """DeepLabV3 (MobileNetV3 backbone) with random weights. Its BatchNorm statistics are
    measured on ``calibration`` images: with the initial ones a random MobileNet's activations
    shrink to ~1e-9 and every image gets the same output."""
    torch.manual_seed(0)
    model = torchvision.models.segmentation.deeplabv3_mobilenet_v3_large(
        weights=None, weights_backbone=None, num_classes=classes, aux_loss=False
    )
    if calibration is not None:
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.reset_running_stats()
                module.momentum = None  # a plain average over the calibration passes
        model.train()
        with torch.no_grad():
            model(calibration)
    return model.eval()


def photographs(size: int) -> Tensor:
    """Two of scikit-image's photographs (an astronaut, a cat) at ``size``, or noise without
    scikit-image."""
    try:
        from skimage import data
    except ImportError:
        return torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    import torch.nn.functional as F

    pictures = [
        torch.from_numpy(getattr(data, n)()).permute(2, 0, 1) for n in ("astronaut", "chelsea")
    ]
    batch = [
        F.interpolate(p[None].float() / 255, size=(size, size), mode="area")[0] for p in pictures
    ]
    mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    return (torch.stack(batch) - mean) / std


def run(size: int = 96) -> tuple[Tensor, Any]:
    """Explain two photographs; returns them and their ``Explanations``."""
    images = photographs(size)
    model = build_model(calibration=images)
    target = region_target(region_mask(size))
    out = explain(model, images, target, ("gradcam", "integrated_gradients"), ig_steps=16)
    return images, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="segmentation_saliency.png")
    args = parser.parse_args()
    images, out = run()
    from PIL import Image

    from lightning_saliency.viz.figures import comparison_figure

    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    picture = comparison_figure(images, out, None, mean, std)
    Image.fromarray(picture.permute(1, 2, 0).cpu().numpy()).save(args.out)
    print(f"layer {out.layer_name}; IG completeness error "
          f"{float(out.extras['ig_completeness_error'].max()):.3f}; wrote {args.out}")  # fmt: skip


if __name__ == "__main__":
    main()
