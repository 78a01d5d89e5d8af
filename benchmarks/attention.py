"""What the attention methods cost on a ViT, as a ratio to one training forward-backward of the
same batch (docs/methods.md's transformer table).

    python benchmarks/attention.py [--n 2] [--size 224] [--device cpu]

torchvision's ``vit_b_16`` and timm's ``vit_small_patch16_224`` (random weights), ``n`` images
at ``size`` px. The forward-backward is the model in training mode, cross-entropy on random
labels, ``backward()`` into the parameters (what one training step costs without the
optimiser). Each method alone through ``explain()``, after one warm-up, the best of 3 runs;
Grad-CAM on the last block's tokens is the baseline a ViT user has today.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from lightning_saliency import explain
from lightning_saliency.engine.methods import available_attention_methods

METHODS = ("gradcam", *available_attention_methods())


def best_of(run: Callable[[], object], times: int = 3) -> float:
    run()  # warm-up
    best = float("inf")
    for _ in range(times):
        start = time.perf_counter()
        run()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def models(size: int) -> dict[str, torch.nn.Module]:
    import timm
    import torchvision

    torch.manual_seed(0)
    return {
        "torchvision vit_b_16": torchvision.models.vit_b_16(image_size=size, num_classes=10),
        "timm vit_small_patch16_224": timm.create_model(
            "vit_small_patch16_224", pretrained=False, num_classes=10, img_size=size
        ),
    }


def main() -> None:
    from methods import batch_arguments

    args = batch_arguments()
    device = torch.device(args.device)
    x = torch.randn(args.n, 3, args.size, args.size, device=device)
    labels = torch.zeros(args.n, dtype=torch.long, device=device)
    print(f"{args.n} images, {args.size} px, {device}, {torch.get_num_threads()} threads\n")
    print("| model | forward-backward (s) | " + " | ".join(f"`{m}`" for m in METHODS) + " |")
    print("|---|---|" + "---|" * len(METHODS))
    for name, model in models(args.size).items():
        model = model.to(device)

        def step(model: torch.nn.Module = model) -> None:
            model.train()
            F.cross_entropy(model(x), labels).backward()
            model.zero_grad(set_to_none=True)

        base = best_of(step)
        model.eval()
        cells = []
        for method in METHODS:
            seconds = best_of(lambda m=method, model=model: explain(model, x, methods=(m,)))
            cells.append(f"{seconds / base:.2f}x")
        print(f"| {name} | {base:.2f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
