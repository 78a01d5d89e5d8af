"""The "Can I trust this map?" tables (docs/trust.md): the sanity check and the faithfulness
test on a model trained here on the generated shapes (no shortcut), and what they cost.

    python benchmarks/sanity.py demo       # the demo CNN, 48 px, 4 epochs on 1000 images
    python benchmarks/sanity.py resnet18   # torchvision's resnet18, 64 px, 4 epochs on 3000
    python benchmarks/sanity.py vit        # a small torchvision ViT, 48 px, 8 epochs on 3000,
                                           # with the attention methods

Eight held-out images, their labels as targets, the cascade compared at 4 depths (the
callback's default), IG with 16 steps. Prints Markdown.
"""

from __future__ import annotations

import argparse
import os
import time
import warnings

import torch
import torch.nn.functional as F

from lightning_saliency import explain, faithfulness, sanity_check
from lightning_saliency.demos.classifier import ShapesClassifier
from lightning_saliency.demos.shapes import ShortcutShapes
from lightning_saliency.engine.methods import available_attention_methods

METHODS = (
    "gradcam",
    "guided_gradcam",
    "integrated_gradients",
    "gradcam++",
    "layercam",
    "cam",
    "saliency",
    "input_x_gradient",
    "guided_backprop",
    "deconvolution",
    "gradient_shap",
    "smoothgrad",
    "smoothgrad_sq",
    "vargrad",
)

VIT_METHODS = ("gradcam", *available_attention_methods(), "integrated_gradients", "saliency")


def train(model: torch.nn.Module, size: int, epochs: int, lr: float, n: int) -> float:
    """Adam on ``n`` clean shapes; returns the accuracy on 256 held-out ones."""
    data = ShortcutShapes(n, size, None, seed=0)
    x = torch.stack([data[i]["image"] for i in range(len(data))])
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    order = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(epochs):
        for batch in torch.randperm(len(x), generator=order).split(64):
            loss = F.cross_entropy(model(x[batch]), data.labels[batch])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    model.eval()
    test = ShortcutShapes(256, size, None, seed=5)
    with torch.no_grad():
        xt = torch.stack([test[i]["image"] for i in range(len(test))])
        return float((model(xt).argmax(1) == test.labels).float().mean())


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model", choices=["demo", "resnet18", "vit"])
    p.add_argument("--figure", default=None, help="save the sanity check's figure here")
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    torch.manual_seed(0)  # the model's initial weights
    methods = METHODS
    if args.model == "demo":
        model, size, epochs, lr, n = ShapesClassifier(), 48, 4, 2e-3, 1000
    elif args.model == "vit":
        from torchvision.models import VisionTransformer

        model = VisionTransformer(48, 6, num_layers=4, num_heads=4, hidden_dim=64, mlp_dim=128,
                                  num_classes=4)  # fmt: skip
        size, epochs, lr, n, methods = 48, 8, 1e-3, 3000, VIT_METHODS
    else:
        import torchvision

        model, size, epochs, lr, n = torchvision.models.resnet18(num_classes=4), 64, 4, 1e-3, 3000
    accuracy = train(model, size, epochs, lr, n)
    held_out = ShortcutShapes(64, size, None, seed=5)
    images = torch.stack([held_out[i]["image"] for i in range(8)])
    labels = held_out.labels[:8]
    start = time.perf_counter()
    out = explain(model, images, labels, methods, ig_steps=16, on_error="collect")
    once = time.perf_counter() - start
    start = time.perf_counter()
    report = sanity_check(model, images, labels, methods, original=out, ig_steps=16)
    checked = time.perf_counter() - start
    start = time.perf_counter()
    faith = faithfulness(model, images, {m: out[m] for m in report.methods}, labels)
    faithful = time.perf_counter() - start
    print(
        f"{args.model}: {size} px, trained {epochs} epochs on {n} images, held-out accuracy "
        f"{accuracy:.2f}; "
        f"8 images; explain() of all {len(methods)} methods {once:.1f} s, the sanity check "
        f"{checked:.1f} s ({len(report.layers)} depths), faithfulness {faithful:.1f} s\n"
    )
    print(report.table())
    print()
    print(faith.table())
    if args.figure:
        report.figure().savefig(args.figure, dpi=100)


if __name__ == "__main__":
    main()
